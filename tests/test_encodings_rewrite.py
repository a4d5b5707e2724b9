"""AIMET encodings, MHA -> SHA and back: what ``mha_to_sha``, ``sha_to_mha``, ``split_entry`` and ``join_entries`` do.

Proves, against real AIMET exports (golden/generate.py): the split per-channel (and LPBQ) weight encodings equal
what AIMET computes on the SHA model itself, never the converter's own output; per-tensor encodings are copied to
every head and join back; q/k/v activation encodings land on the names AIMET gives the SHA graph and attention
internals are dropped; the report counts what was done; one entry splits into its heads' slices and joins back
(per-channel, per-tensor, PER_BLOCK, LPBQ); the rewrites pass unknown keys through and share no structure with
their input; a file the rewrite cannot map one to one is refused, naming the entry.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from encodings_helpers import (
    VERSIONS,
    WEIGHTS,
    activations,
    close,
    containers,
    golden,
    params,
    per_block_entry,
    v0_channel,
)
from pasd_verify.encodings import (
    EncodingsError,
    detect_prefix,
    convert_version,
    join_entries,
    load_encodings,
    mha_to_sha,
    sha_to_mha,
    split_entry,
)
from pasd_verify.encodings_check import check_encodings, required_sha_encodings
from strategies import per_channel_encodings


# --- MHA -> SHA equals what AIMET gives the SHA model ---------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_converted_per_channel_encodings_equal_aimets_own_sha_encodings(name_map, version):
    converted, report = mha_to_sha(golden("mha", "per_channel", version), name_map)
    reference = params(golden("sha", "per_channel", version))
    assert report.params_split == len(name_map)
    # per-channel weight encodings depend only on each channel's weights, so AIMET's SHA calibration must agree
    assert params(converted).keys() == reference.keys()
    assert all(close(params(converted)[k], reference[k]) for k in reference)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_key_set_after_conversion_is_the_sha_models_quantized_parameters(name_map, version, weights):
    converted, _ = mha_to_sha(golden("mha", weights, version), name_map)
    assert params(converted).keys() == params(golden("sha", weights, version)).keys()
    mha_names = {"unet." + k for k in name_map}
    assert not mha_names & params(converted).keys()


@pytest.mark.parametrize("version", VERSIONS)
def test_per_tensor_copies_are_identical_to_their_source(name_map, version):
    mha = golden("mha", "per_tensor", version)
    converted, report = mha_to_sha(mha, name_map)
    assert report.params_copied == len(name_map)
    source, out = params(mha), params(converted)
    for mha_name, sha_names in name_map.items():
        for sha_name in sha_names:
            a, b = source["unet." + mha_name], out["unet." + sha_name]
            if version == "1.0.0":
                a, b = {k: v for k, v in a.items() if k != "name"}, {k: v for k, v in b.items() if k != "name"}
            assert a == b


@pytest.mark.aimet
def test_aimets_own_lpbq_encodings_split_into_the_lpbq_encodings_aimet_gives_the_sha_model(name_map, sha_shapes,
                                                                                         tmp_path):
    """A real AIMET export of LPBQ weights (4-bit blocks of 16 input channels under 8-bit per-channel scales,
    format 1.0.0), not a hand-made entry: the converted MHA file holds what AIMET computes on the SHA model
    (per-channel scales and ``per_block_int_scale`` depend only on each output channel's weights), validates
    against the SHA model, and joins back into the MHA file."""
    import torch
    from aimet_torch.quantsim.config_utils import set_grouped_blockwise_quantization_for_weights

    from pasd_verify.kinds import graph_of
    from pasd_verify.presets import build_unet, unet_inputs
    from pasd_verify.quant import export_encodings, quantize
    from pasd_verify.sha import convert_to_sha

    def lpbq(sim):
        set_grouped_blockwise_quantization_for_weights(
            sim, lambda m: isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.shape[1] % 16 == 0,
            bitwidth=4, symmetric=True, decompressed_bw=8, block_size=16)

    mha_model = build_unet("tiny", seed=0)
    sha_model = copy.deepcopy(mha_model)
    convert_to_sha(sha_model)
    inputs = unet_inputs(mha_model, batch=1, seed=0)
    dummy = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    exported = {}
    for form, model in (("mha", mha_model), ("sha", sha_model)):
        sim = quantize(graph_of(model).module, dummy, configure=lpbq)
        exported[form] = load_encodings(export_encodings(sim, dummy, tmp_path / f"{form}.encodings"))

    mha, aimet_sha = exported["mha"], params(exported["sha"])
    lpbq = {n: e for n, e in params(mha).items() if e["enc_type"] == "LPBQ" and n.removeprefix("unet.") in name_map}
    assert lpbq and all(len(e["per_block_int_scale"]) > len(e["scale"]) for e in lpbq.values())
    converted, report = mha_to_sha(mha, name_map)
    assert report.params_split == len(lpbq)
    sha_names = ["unet." + sha for mha_name in lpbq for sha in name_map[mha_name.removeprefix("unet.")]]
    assert all(close(params(converted)[n], aimet_sha[n]) for n in sha_names)
    assert params(converted).keys() == aimet_sha.keys()
    assert check_encodings(converted, sha_shapes, required=required_sha_encodings(mha, name_map)) == []
    back, _ = sha_to_mha(converted, name_map)
    assert params(back) == params(mha)


# --- activation encodings: q/k/v outputs per head, attention internals dropped, the rest kept -----------------

@pytest.mark.parametrize("version", VERSIONS)
def test_qkv_activation_encodings_land_on_names_aimet_gives_the_sha_graph(name_map, version):
    converted, report = mha_to_sha(golden("mha", "per_channel", version), name_map)
    sha_names = activations(golden("sha", "per_channel", version)).keys()
    attention_heads = [len(v) for k, v in name_map.items() if k.endswith("to_q.weight")]
    projected = [n for n in activations(converted) if "_convs/" in n]
    assert report.activations_copied == 3 * len(attention_heads)  # q, k and v outputs of every attention
    assert len(projected) == 3 * sum(attention_heads)
    assert set(projected) <= set(sha_names)


@pytest.mark.parametrize("version", VERSIONS)
def test_only_a_projection_scopes_output_0_takes_the_heads_encodings(name_map, version):
    """In the ONNX graph a q/k/v projection's output is ``<scope>/<op>_output_0``; another tensor of that scope
    (a second output) is an attention internal the SHA graph does not have: dropped, never copied to the heads."""
    from pasd_verify.name_map import onnx_scope

    mha = copy.deepcopy(golden("mha", "per_channel", version))
    module = next(k for k in name_map if k.endswith("to_q.weight")).rsplit(".", 2)[0]
    other = f"{onnx_scope('unet.' + module)}/to_q/MatMul_output_1"
    entry = copy.deepcopy(next(iter(activations(mha).values())))
    if version == "0.6.1":
        mha["activation_encodings"][other] = entry
    else:
        mha["activation_encodings"].append(dict(entry, name=other))
    converted, report = mha_to_sha(mha, name_map)
    assert other in report.activations_dropped and other not in activations(converted)


@pytest.mark.parametrize("version", VERSIONS)
def test_activations_outside_attention_pass_through_unchanged(name_map, version):
    """Only attention internals may be dropped: every other activation (convs, norms, resnets: no ``attn`` in its
    ONNX name) comes through with its encoding as it was."""
    mha = golden("mha", "per_channel", version)
    converted, _ = mha_to_sha(mha, name_map)
    outside = {n: e for n, e in activations(mha).items() if "attn" not in n}
    assert outside and all(activations(converted).get(n) == e for n, e in outside.items())


@pytest.mark.parametrize("version", VERSIONS)
def test_an_attentions_to_out_activations_are_kept(name_map, version):
    """``to_out`` is the same Linear in both graphs: its activations (AIMET's ``<scope>/to_out/...`` tensors) are
    copied as they are, never dropped as attention internals."""
    mha = golden("mha", "per_channel", version)
    kept = {n: e for n, e in activations(mha).items() if "/to_out/" in n}
    converted, report = mha_to_sha(mha, name_map)
    assert kept and all(activations(converted).get(n) == e for n, e in kept.items())
    assert not set(kept) & set(report.activations_dropped)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_biased_projections_output_named_by_its_last_node_takes_the_heads_encodings(name_map, version):
    """AIMET names the output of a projection that exports as several nodes (a Linear with a bias on tokens: MatMul,
    then Add) ``<scope>#1.end/Add_output_0``, as in the text encoder's and the VAE's files: it is the projection's
    output, copied to every head's conv like ``<scope>/MatMul_output_0``; and CLIP's output projection named that
    way (``out_proj#1.end``) is kept, not dropped as an attention internal (diffusers' ``to_out/0#1.end`` is in the
    golden file already: the UNet's to_out has a bias)."""
    from pasd_verify.name_map import onnx_scope

    mha = copy.deepcopy(golden("mha", "per_channel", version))
    module = next(k for k in name_map if k.endswith("to_v.weight")).rsplit(".", 2)[0]
    scope = onnx_scope("unet." + module)
    assert f"{scope}/to_out/0#1.end/Add_output_0" in activations(mha)
    sources = list(activations(mha).values())
    biased, out_proj = f"{scope}/to_v#1.end/Add_output_0", f"{scope}/out_proj#1.end/Add_output_0"
    added = {biased: sources[0], out_proj: sources[1]}
    assert _unnamed(sources[0]) != _unnamed(sources[1])
    plain = {n for n in activations(mha) if n.startswith(f"{scope}/to_v/")}  # replaced by the biased form
    if version == "0.6.1":
        for name in plain:
            del mha["activation_encodings"][name]
        mha["activation_encodings"].update(copy.deepcopy(added))
    else:
        mha["activation_encodings"] = [e for e in mha["activation_encodings"] if e["name"] not in plain]
        mha["activation_encodings"] += [dict(copy.deepcopy(e), name=n) for n, e in added.items()]
    converted, report = mha_to_sha(mha, name_map)
    out = activations(converted)
    heads = len(name_map[f"{module}.to_v.weight"])
    for i in range(heads):
        assert _unnamed(out[f"{scope}/to_v_convs/to_v_convs.{i}/Conv_output_0"]) == _unnamed(sources[0])
    assert _unnamed(out[out_proj]) == _unnamed(sources[1]) and out_proj not in report.activations_dropped
    assert biased not in out


def _unnamed(entry):
    """An activation entry without its name (1.0.0 entries carry it, 0.6.1 ones are keyed by it)."""
    return {k: v for k, v in entry.items() if k != "name"} if isinstance(entry, dict) else entry


# --- the report `pasd-verify convert` prints ------------------------------------------------------------------

@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("version", VERSIONS)
def test_the_rewrite_report_counts_what_was_split_and_copied(name_map, version, weights):
    """The counts `pasd-verify convert` prints, against the files: of the MHA entries the name map covers, the
    per-channel ones are split and the per-tensor ones copied to every head; the rest pass through uncounted, and
    the SHA file holds one entry per head of each covered one."""
    mha = golden("mha", weights, version)
    converted, report = mha_to_sha(mha, name_map)
    counts, prefix = report.as_dict(), report.prefix
    covered = {n: e for n, e in params(mha).items() if n.removeprefix(prefix) in name_map}
    per_channel = [n for n, e in covered.items()
                   if (len(e) > 1 if version == "0.6.1" else e["enc_type"] == "PER_CHANNEL")]
    assert prefix and covered
    assert (counts["param_encodings_split"], counts["param_encodings_copied"], counts["param_encodings_joined"],
            counts["name_prefix"]) == (len(per_channel), len(covered) - len(per_channel), 0, prefix)
    heads = sum(len(name_map[n.removeprefix(prefix)]) for n in covered)
    assert len(params(converted)) == len(params(mha)) - len(covered) + heads


@pytest.mark.parametrize("version", VERSIONS)
def test_the_rewrite_report_counts_activations_copied_and_dropped_against_the_files(name_map, version):
    """Each copied q/k/v output becomes one per head; each dropped one (attention internals the SHA graph lacks)
    disappears; everything else passes through: so the counts account for the SHA file's activation entries."""
    mha = golden("mha", "per_channel", version)
    converted, report = mha_to_sha(mha, name_map)
    counts = report.as_dict()
    assert set(counts) == {"param_encodings_split", "param_encodings_copied", "param_encodings_joined",
                           "activation_encodings_copied", "activation_encodings_dropped", "name_prefix"}
    heads = sum(len(v) for k, v in name_map.items() if k.endswith("to_q.weight"))
    assert counts["activation_encodings_copied"] == 3 * sum(1 for k in name_map if k.endswith("to_q.weight"))
    assert len(activations(converted)) == (len(activations(mha)) - counts["activation_encodings_dropped"]
                                           - counts["activation_encodings_copied"] + 3 * heads)
    assert not set(report.activations_dropped) & set(activations(converted))


# --- SHA -> MHA joins the heads back --------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_sha_to_mha_restores_the_parameter_encodings(name_map, version, weights):
    mha = golden("mha", weights, version)
    sha, _ = mha_to_sha(mha, name_map)
    back, report = sha_to_mha(sha, name_map)
    assert report.params_joined == len(name_map)
    assert params(back) == params(mha)


@pytest.mark.parametrize("version", VERSIONS)
def test_per_tensor_copies_join_back_without_sharing_structure(name_map, version):
    """AIMET's own SHA files hold per-head calibrations; the per-tensor copies mha_to_sha makes join back to the
    MHA entry, in a new structure."""
    mha = golden("mha", "per_tensor", version)
    sha, _ = mha_to_sha(mha, name_map)
    inputs = containers(sha)
    back, report = sha_to_mha(sha, name_map)
    assert params(back) == params(mha) and report.params_joined == len(name_map)
    assert not inputs.keys() & containers(back).keys()


def _one_head_pair(version: str):
    """An MHA parameter encoding (of to_q) of a one-head attention, and the name map of that attention."""
    entry = ([v0_channel()] if version == "0.6.1" else
             {"name": "a.to_q.weight", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False,
              "scale": [0.5], "offset": [-2]})
    body = {"a.to_q.weight": entry} if version == "0.6.1" else [entry]
    return ({"version": version, "activation_encodings": {} if version == "0.6.1" else [], "param_encodings": body},
            {f"a.to_{p}.weight": [f"a.to_{p}_convs.0.weight"] for p in "qkv"})


@pytest.mark.parametrize("version", VERSIONS)
def test_a_one_head_attention_rewrites_both_ways(version):
    mha, name_map = _one_head_pair(version)
    sha, _ = mha_to_sha(mha, name_map)
    back, report = sha_to_mha(sha, name_map)
    assert back == mha and report.params_joined == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_sha_to_mha_follows_the_per_tensor_override_and_names_a_join_it_refuses(name_map, version):
    mha = golden("mha", "per_tensor", version)
    sha, _ = mha_to_sha(mha, name_map)
    key = next(iter(name_map))
    heads = len(name_map[key])
    # told the MHA encoding was per-channel, identical per-tensor heads join as one channel per head
    back, _ = sha_to_mha(sha, name_map, per_tensor={key: False})
    joined = params(back)["unet." + key]
    assert (len(joined) if version == "0.6.1" else len(joined["scale"])) == heads
    # told it was per-tensor, heads AIMET calibrated apart cannot join
    aimet_sha = golden("sha", "per_tensor", version)
    with pytest.raises(EncodingsError) as info:
        sha_to_mha(aimet_sha, name_map, per_tensor={key: True})
    assert str(info.value) == (f"encodings: {key}: per-tensor encodings of the heads differ; they cannot join "
                               "losslessly")


@pytest.mark.parametrize("version", VERSIONS)
def test_sha_to_mha_reports_the_prefix_and_names_a_missing_head(name_map, version):
    sha, forward = mha_to_sha(golden("mha", "per_channel", version), name_map)
    _, back = sha_to_mha(sha, name_map)
    assert back.prefix == forward.prefix == "unet." and back.as_dict()["name_prefix"] == "unet."
    mha_key = next(k for k, v in name_map.items() if len(v) > 1)
    gone = ["unet." + h for h in name_map[mha_key][1:]]  # every head but the first
    broken = copy.deepcopy(sha)
    if version == "0.6.1":
        for h in gone:
            del broken["param_encodings"][h]
    else:
        broken["param_encodings"] = [e for e in broken["param_encodings"] if e["name"] not in gone]
    with pytest.raises(EncodingsError) as info:
        sha_to_mha(broken, name_map)
    assert str(info.value) == f"encodings: {gone[0]!r} is missing; cannot join the heads of {mha_key!r}"


# --- one entry: split into the heads' slices, joined back -----------------------------------------------------

@given(case=per_channel_encodings())
def test_per_channel_split_then_join_is_identity(case):
    version, heads, entry = case
    names = [f"w{i}" for i in range(heads)]
    parts = split_entry(entry, version, names, "test")
    assert len(parts) == heads
    # each head holds its contiguous slice, checked by hand
    count = len(entry) if version == "0.6.1" else len(entry["scale"])
    size = count // heads
    for i, part in enumerate(parts):
        expected = entry[i * size:(i + 1) * size] if version == "0.6.1" else entry["scale"][i * size:(i + 1) * size]
        assert (part if version == "0.6.1" else part["scale"]) == expected
    assert join_entries(parts, version, "w", "test", per_tensor=False) == entry


@given(kind=st.sampled_from(["PER_BLOCK", "LPBQ"]), heads=st.integers(1, 4), head_channels=st.integers(1, 3),
       blocks=st.integers(1, 3))
def test_a_per_block_entry_splits_into_the_entries_of_each_heads_channels(kind, heads, head_channels, blocks):
    """Each head's encoding is the one AIMET would write for that head's output channels alone, every per-channel
    and per-block list included; joined back, the heads give the MHA entry."""
    whole = per_block_entry(kind, range(heads * head_channels), blocks, "w")
    names = [f"h{i}" for i in range(heads)]
    split = split_entry(whole, "1.0.0", names, "w")
    assert split == [per_block_entry(kind, range(i * head_channels, (i + 1) * head_channels), blocks, n)
                     for i, n in enumerate(names)]
    assert join_entries(split, "1.0.0", "w", "w", per_tensor=False) == whole


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("per_tensor", [True, False])
def test_a_single_head_joins_to_itself(version, per_tensor):
    entry = ([{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "offset": -3, "scale": 0.5, "min": -1.5,
               "max": 126.0}] if version == "0.6.1" else
             {"name": "h0", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR" if per_tensor else "PER_CHANNEL",
              "is_sym": False, "scale": [0.5], "offset": [-3]})
    joined = join_entries([copy.deepcopy(entry)], version, "w", "test", per_tensor=per_tensor)
    assert joined == (entry if version == "0.6.1" else dict(entry, name="w"))


def test_heads_that_do_not_divide_the_channels_are_named(name_map):
    enc = golden("mha", "per_channel", "1.0.0")
    entry = next(e for e in enc["param_encodings"] if e["name"].endswith("to_q.weight"))
    entry["scale"] = entry["scale"][:-1]
    entry["offset"] = entry["offset"][:-1]
    with pytest.raises(EncodingsError, match=f"{entry['name']}: 31 per-channel encodings do not split into 2 heads"):
        mha_to_sha(enc, name_map)


def test_a_per_block_list_that_does_not_divide_into_the_heads_is_named():
    entry = per_block_entry("LPBQ", range(2), 2, "w")
    entry["per_block_int_scale"] = entry["per_block_int_scale"][:3]
    with pytest.raises(EncodingsError) as info:
        split_entry(entry, "1.0.0", ["h0", "h1"], "f.encodings: w")
    assert str(info.value) == "f.encodings: w: 3 values of 'per_block_int_scale' do not split into 2 heads"


@pytest.mark.parametrize("version", VERSIONS)
def test_per_tensor_heads_that_differ_do_not_join(version):
    one = ([{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "offset": 0, "scale": 0.5, "min": 0.0,
             "max": 127.5}] if version == "0.6.1" else
           {"name": "h", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False, "scale": [0.5],
            "offset": [0]})
    other = copy.deepcopy(one)
    (other[0] if version == "0.6.1" else other)["offset" if version == "0.6.1" else "scale"] = \
        1 if version == "0.6.1" else [0.25]
    with pytest.raises(EncodingsError) as info:
        join_entries([one, other], version, "w", "enc: w", per_tensor=True)
    assert str(info.value) == "enc: w: per-tensor encodings of the heads differ; they cannot join losslessly"


def test_per_channel_heads_of_different_bitwidths_do_not_join_into_one_1_0_0_entry():
    """Each 0.6.1 channel carries its own bitwidth; a 1.0.0 entry has one for all channels, so heads quantized at
    different bitwidths (or symmetries) have no joined 1.0.0 form: refused, not silently given the first's."""
    heads = [{"name": f"h{i}", "bw": bw, "dtype": "INT", "enc_type": "PER_CHANNEL", "is_sym": False,
              "scale": [0.5, 0.25], "offset": [0, -1]} for i, bw in enumerate([8, 16])]
    with pytest.raises(EncodingsError) as info:
        join_entries(heads, "1.0.0", "w", "enc: w", per_tensor=False)
    assert str(info.value) == ("enc: w: the heads' encodings differ in ['bw']; they cannot join into one "
                               "per-channel encoding losslessly")


# --- the model's name prefix ----------------------------------------------------------------------------------

def _with_entry(encodings: dict, section: str, name: str, entry) -> dict:
    """A copy of ``encodings`` with ``entry`` added to ``section`` under ``name`` (last, in either format)."""
    out = copy.deepcopy(encodings)
    if out["version"] == "0.6.1":
        out[section][name] = copy.deepcopy(entry)
    else:
        out[section].append(dict(copy.deepcopy(entry), name=name))
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_a_parameter_outside_the_models_prefix_is_never_renamed(name_map, version):
    """AIMET prefixes the model's names (``unet.``); an entry of another submodule of the same wrapper that happens
    to end like an attention weight (``cnet.<same path>``) is not the model's: it passes through untouched."""
    mha = golden("mha", "per_channel", version)
    key = next(k for k in name_map if k.endswith("to_q.weight"))
    stranger = "cnet." + key  # as long as the "unet." prefix: cutting the prefix off would make it the model's key
    with_stranger = _with_entry(mha, "param_encodings", stranger, params(mha)["unet." + key])
    converted, _ = mha_to_sha(with_stranger, name_map)
    assert params(converted)[stranger] == params(with_stranger)[stranger]
    assert params(converted).keys() - {stranger} == params(mha_to_sha(mha, name_map)[0]).keys()


def test_no_prefix_is_found_where_no_name_matches():
    assert detect_prefix(["a.b", "c"], ["x.y"]) == ""


# --- everything else passes through, and nothing is shared with the input -------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_unknown_top_level_keys_pass_through_every_rewrite(name_map, version):
    mha = golden("mha", "per_channel", version)
    mha["vendor_notes"] = {"calibrated_on": ["astronaut"], "nested": [1, 2.5, None]}
    sha, _ = mha_to_sha(mha, name_map)
    back, _ = sha_to_mha(sha, name_map)
    other = convert_version(sha, "1.0.0" if version == "0.6.1" else "0.6.1")
    for out in (sha, back, other):
        assert out["vendor_notes"] == mha["vendor_notes"]
        assert out["excluded_layers"] == mha["excluded_layers"] and out["quantizer_args"] == mha["quantizer_args"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_rewrites_never_share_structure_with_their_input(name_map, version, weights):
    """No dict or list of a rewrite's output is one of its input's: changing the output cannot change the input."""
    mha, sha = golden("mha", weights, version), golden("sha", weights, version)
    other = "1.0.0" if version == "0.6.1" else "0.6.1"
    rewrites = {
        "mha_to_sha": (mha, lambda: mha_to_sha(mha, name_map)[0]),
        "sha_to_mha": (sha, lambda: sha_to_mha(sha, name_map)[0]),
        "convert_version": (mha, lambda: convert_version(mha, other)),
        "convert_version to its own version": (sha, lambda: convert_version(sha, version)),
    }
    for label, (source, rewrite) in rewrites.items():
        before = copy.deepcopy(source)
        inputs = containers(source)
        output = rewrite()
        shared = inputs.keys() & containers(output).keys()
        assert not shared, f"{label}: {len(shared)} containers shared with the input"
        assert source == before, label


@pytest.mark.parametrize("version", VERSIONS)
def test_nested_top_level_values_are_not_shared_with_the_input(name_map, version):
    """An unknown top-level key with nested values (a later AIMET's metadata) is deep-copied like the rest."""
    mha = copy.deepcopy(golden("mha", "per_channel", version))
    mha["metadata"] = {"calibration": {"samples": [1, 2]}}
    converted, _ = mha_to_sha(mha, name_map)
    converted["metadata"]["calibration"]["samples"].append(3)
    assert mha["metadata"] == {"calibration": {"samples": [1, 2]}}


def test_a_split_1_0_0_entry_shares_no_list_with_its_heads():
    """Every list of a per-channel 1.0.0 entry, those the split leaves whole included, is copied per head."""
    entry = {"name": "w", "bw": 8, "dtype": "INT", "enc_type": "PER_CHANNEL", "is_sym": False,
             "scale": [0.5, 0.25], "offset": [-2, -3], "extra": [1]}
    heads = split_entry(entry, "1.0.0", ["h0", "h1"], "w")
    heads[0]["extra"].append(2)
    assert entry["extra"] == [1] and heads[1]["extra"] == [1]


# --- refusals: a file the rewrite cannot map one to one, named ------------------------------------------------

@pytest.mark.parametrize("rewrite", ["mha_to_sha", "sha_to_mha"])
def test_a_malformed_parameter_section_is_named_with_the_source(name_map, rewrite):
    bad = {"version": "1.0.0", "param_encodings": {"not": "a list"}, "activation_encodings": []}
    function = {"mha_to_sha": mha_to_sha, "sha_to_mha": sha_to_mha}[rewrite]
    with pytest.raises(EncodingsError) as info:
        function(bad, name_map, source="my.encodings")
    assert str(info.value) == "my.encodings: param_encodings must be a list in version 1.0.0"


@pytest.mark.parametrize("version", VERSIONS)
def test_an_mha_file_already_holding_a_head_weight_is_refused_naming_it(name_map, version):
    """A half-converted file (one SHA head weight among the MHA ones) is refused before anything is rewritten."""
    mha = golden("mha", "per_channel", version)
    head = "unet." + next(iter(name_map.values()))[0]
    mixed = _with_entry(mha, "param_encodings", head, next(iter(params(mha).values())))
    with pytest.raises(EncodingsError) as info:
        mha_to_sha(mixed, name_map, source="mixed.encodings")
    assert str(info.value) == f"mixed.encodings: already holds SHA encodings, e.g. {head!r}"


@pytest.mark.parametrize("version", VERSIONS)
def test_a_weight_held_with_and_without_the_prefix_is_refused_naming_the_head_both_would_give(name_map, version):
    """``unet.x.to_q.weight`` and a bare ``x.to_q.weight`` in one file both split into ``unet.x.to_q_convs.*``:
    refused, the head named, rather than one silently replacing the other."""
    mha = golden("mha", "per_channel", version)
    key = next(k for k in name_map if k.endswith("to_q.weight"))
    mixed = _with_entry(mha, "param_encodings", key, params(mha)["unet." + key])
    with pytest.raises(EncodingsError) as info:
        mha_to_sha(mixed, name_map, source="mixed.encodings")
    assert str(info.value) == f"mixed.encodings: param_encodings names {'unet.' + name_map[key][0]!r} twice"


def test_a_parameter_named_twice_in_a_list_is_refused_by_the_rewrite(name_map):
    """A 1.0.0 section is a list and can name a weight twice; the rewrite refuses it, naming it, where a 0.6.1
    output would keep only one of the two."""
    mha = golden("mha", "per_channel", "1.0.0")
    first = mha["param_encodings"][0]
    with pytest.raises(EncodingsError) as info:
        mha_to_sha(_with_entry(mha, "param_encodings", first["name"], first), name_map, source="twice.encodings")
    assert str(info.value) == f"twice.encodings: param_encodings names {first['name']!r} twice"


@pytest.mark.parametrize("version", VERSIONS)
def test_an_activation_file_already_holding_a_head_output_is_refused_naming_it(name_map, version):
    """aimet-torch names activations by module (``x.to_q``); a file that has both ``x.to_q`` and a head's own
    ``x.to_q_convs.0`` would get two encodings for that head: refused, the duplicate named."""
    mha = golden("mha", "per_channel", version)
    module = "unet." + next(k for k in name_map if k.endswith("to_q.weight")).rsplit(".", 1)[0]  # x.to_q
    head = module.replace(".to_q", ".to_q_convs.0")
    entry = next(iter(activations(mha).values()))
    mixed = mha
    for name in (module, head):  # after golden's own activations: the duplicate is not the first name
        mixed = _with_entry(mixed, "activation_encodings", name, entry)
    with pytest.raises(EncodingsError) as info:
        mha_to_sha(mixed, name_map, source="mixed.encodings")
    assert str(info.value) == f"mixed.encodings: activation_encodings names {head!r} twice"


@pytest.mark.aimet
@pytest.mark.parametrize("kind", ["text-encoder", "vae-decoder"])
def test_the_other_networks_encodings_convert_into_what_aimet_gives_their_sha_form(kind, tmp_path):
    """Real AIMET (aimet-torch) exports of the tiny text encoder (transformers' q_proj naming, Linear projections on
    tokens) and VAE decoder (diffusers' to_q naming, a group norm before them): the MHA file's per-channel weight
    encodings, converted, are AIMET's own on the SHA model; the q/k/v output encodings land on tensor names AIMET
    gives the SHA graph; the converted file validates against the SHA model and joins back into the MHA file."""
    from pasd_verify.kinds import preset_model
    from pasd_verify.quant import export_encodings, quantize

    mha = preset_model("tiny", kind, form="mha")
    sha = preset_model("tiny", kind, form="sha")
    [sample] = mha.kind.seeded_samples(mha.model, 1, latent=(2, 2), seed=0)
    dummy = tuple(mha.kind.graph(mha.model).feeds(sample).values())
    exported = {}
    for form, loaded in (("mha", mha), ("sha", sha)):
        sim = quantize(loaded.kind.graph(loaded.model).module, dummy)
        exported[form] = load_encodings(export_encodings(sim, dummy, tmp_path / f"{form}.encodings"))
    name_map = sha.name_map
    converted, report = mha_to_sha(exported["mha"], name_map)
    aimet_sha = params(exported["sha"])
    assert report.params_split == sum(k.endswith(".weight") for k in name_map)  # AIMET quantizes no bias
    assert params(converted).keys() == aimet_sha.keys()
    assert all(close(params(converted)[n], aimet_sha[n]) for n in aimet_sha)
    projected = [n for n in activations(converted) if "_convs" in n]
    assert report.activations_copied == 3 * len(name_map.modules)
    assert len(projected) == 3 * sum(name_map.modules.values())
    assert set(projected) <= set(activations(exported["sha"]))
    # the unchanged output projection's output (AIMET names a biased one <scope>#1.end/Add_output_0) is kept
    outputs = [n for n in activations(exported["mha"]) if "/out_proj#" in n or "/to_out/" in n]
    assert outputs and set(outputs) <= set(activations(converted)) & set(activations(exported["sha"]))
    sha_shapes = {n: tuple(p.shape) for n, p in sha.model.state_dict().items()}
    assert check_encodings(converted, sha_shapes, required=required_sha_encodings(exported["mha"], name_map)) == []
    back, _ = sha_to_mha(converted, name_map)
    assert params(back) == params(exported["mha"])
