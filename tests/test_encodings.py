"""AIMET encodings: formats, the MHA -> SHA rewrite against AIMET's own SHA encodings, validation, bad input.

The golden files are real AIMET exports (golden/generate.py); the reference for a converted file is what AIMET
computes on the SHA model directly, never the converter's own output.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pasd_verify.encodings import (
    EncodingsError,
    check_encodings,
    compare_encodings,
    detect_prefix,
    convert_version,
    dumps_encodings,
    join_entries,
    load_encodings,
    mha_to_sha,
    parse_encodings,
    required_sha_encodings,
    save_encodings,
    sha_to_mha,
    split_entry,
)

GOLDEN = Path(__file__).parent.parent / "golden"
VERSIONS = ["0.6.1", "1.0.0"]
WEIGHTS = ["per_channel", "per_tensor"]


def golden(form: str, weights: str, version: str) -> dict:
    return load_encodings(GOLDEN / f"unet_tiny_{form}_{weights}_{version}.encodings")


@pytest.fixture(scope="module")
def name_map():
    return json.loads((GOLDEN / "unet_tiny_name_map.json").read_text())


def params(encodings: dict) -> dict:
    body = encodings["param_encodings"]
    return dict(body) if encodings["version"] == "0.6.1" else {e["name"]: e for e in body}


def activations(encodings: dict) -> dict:
    body = encodings["activation_encodings"]
    return dict(body) if encodings["version"] == "0.6.1" else {e["name"]: e for e in body}


def close(a, b, rel=1e-6) -> bool:
    """Equal structure and names, numbers equal to float tolerance."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
    return a == b


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
def test_qkv_activation_encodings_land_on_names_aimet_gives_the_sha_graph(name_map, version):
    converted, report = mha_to_sha(golden("mha", "per_channel", version), name_map)
    sha_names = activations(golden("sha", "per_channel", version)).keys()
    attention_heads = [len(v) for k, v in name_map.items() if k.endswith("to_q.weight")]
    projected = [n for n in activations(converted) if "_convs/" in n]
    assert report.activations_copied == 3 * len(attention_heads)  # q, k and v outputs of every attention
    assert len(projected) == 3 * sum(attention_heads)
    assert set(projected) <= set(sha_names)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_sha_to_mha_restores_the_parameter_encodings(name_map, version, weights):
    mha = golden("mha", weights, version)
    sha, _ = mha_to_sha(mha, name_map)
    back, report = sha_to_mha(sha, name_map)
    assert report.params_joined == len(name_map)
    assert params(back) == params(mha)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("form", ["mha", "sha"])
def test_aimet_files_read_and_write_back_byte_identical(form, version, tmp_path):
    path = GOLDEN / f"unet_tiny_{form}_per_channel_{version}.encodings"
    save_encodings(load_encodings(path), tmp_path / "out.encodings")
    assert (tmp_path / "out.encodings").read_bytes() == path.read_bytes()


def test_converted_golden_encodings_validate_against_the_sha_model(name_map):
    from pasd_verify.presets import build_unet
    from pasd_verify.sha import convert_to_sha

    model = build_unet("tiny")
    convert_to_sha(model)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    for version in VERSIONS:
        for weights in WEIGHTS:
            mha = golden("mha", weights, version)
            converted, _ = mha_to_sha(mha, name_map)
            assert check_encodings(converted, shapes, required=required_sha_encodings(mha, name_map)) == []
            assert check_encodings(golden("sha", weights, version), shapes) == []


@pytest.mark.aimet
def test_aimets_own_lpbq_encodings_split_into_the_lpbq_encodings_aimet_gives_the_sha_model(name_map, sha_shapes,
                                                                                         tmp_path):
    """A real AIMET export of LPBQ weights (4-bit blocks of 16 input channels under 8-bit per-channel scales,
    format 1.0.0), not a hand-made entry: the converted MHA file holds what AIMET computes on the SHA model
    (per-channel scales and ``per_block_int_scale`` depend only on each output channel's weights), validates
    against the SHA model, and joins back into the MHA file."""
    import torch
    from aimet_torch.quantsim.config_utils import set_grouped_blockwise_quantization_for_weights

    from pasd_verify.presets import build_unet, unet_inputs
    from pasd_verify.quant import UNetForQuantization, export_encodings, quantize
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
        sim = quantize(UNetForQuantization(model), dummy, configure=lpbq)
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


# --- properties of one entry ---------------------------------------------------------------------------------

@st.composite
def per_channel_entries(draw):
    """A per-channel encoding of either format, with a channel count that ``heads`` divides."""
    version = draw(st.sampled_from(VERSIONS))
    heads = draw(st.integers(1, 8))
    channels = heads * draw(st.integers(1, 6))
    bw = draw(st.sampled_from([4, 8, 16]))
    scales = draw(st.lists(st.floats(1e-6, 1.0), min_size=channels, max_size=channels))
    offsets = draw(st.lists(st.integers(-(2**bw - 1), 0), min_size=channels, max_size=channels))
    if version == "0.6.1":
        entry = [{"bitwidth": bw, "dtype": "int", "is_symmetric": "False", "offset": o, "scale": s,
                  "min": o * s, "max": (o + 2**bw - 1) * s} for s, o in zip(scales, offsets)]
    else:
        entry = {"name": "w", "bw": bw, "dtype": "INT", "enc_type": "PER_CHANNEL", "is_sym": False,
                 "scale": scales, "offset": offsets}
    return version, heads, entry


@given(case=per_channel_entries())
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


@given(case=per_channel_entries(), version=st.sampled_from(VERSIONS))
def test_dumps_parse_is_byte_stable(case, version):
    _, _, entry = case
    v = "0.6.1" if isinstance(entry, list) else "1.0.0"
    body = {"w": entry} if v == "0.6.1" else [entry]
    encodings = {"version": v, "param_encodings": body, "activation_encodings": {} if v == "0.6.1" else [],
                 "excluded_layers": [], "quantizer_args": {"activation_bitwidth": 16}}
    text = dumps_encodings(encodings)
    assert parse_encodings(text) == encodings
    assert dumps_encodings(parse_encodings(text)) == text


# --- validation: every problem, all at once -------------------------------------------------------------------

def _mutated(version: str, mutate) -> dict:
    enc = copy.deepcopy(golden("sha", "per_channel", version))
    mutate(enc)
    return enc


@pytest.fixture(scope="module")
def sha_shapes():
    from pasd_verify.presets import build_unet
    from pasd_verify.sha import convert_to_sha

    model = build_unet("tiny")
    convert_to_sha(model)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def _first_qconv(enc):
    key = next(k for k in params(enc) if "to_q_convs.0.weight" in k)
    return key, params(enc)[key]


@pytest.mark.parametrize("version", VERSIONS)
def test_validator_reports_every_problem_kind(version, sha_shapes, name_map):
    def mutate(enc):
        key, entry = _first_qconv(enc)
        if version == "0.6.1":
            body = enc["param_encodings"]
            body["unet.no_such.weight"] = copy.deepcopy(entry)            # names no parameter
            body[key] = entry[:-1]                                         # wrong per-channel length
            other = next(k for k in body if "to_k_convs.0.weight" in k)
            body[other][0]["scale"] = -1.0                                # scale not positive
            third = next(k for k in body if "to_v_convs.0.weight" in k)
            body[third][0]["offset"] = 7                                   # offset outside the range
            fourth = next(k for k in body if "to_out.0.weight" in k)
            body[fourth][0]["min"] = 123.0                                 # min/max contradict scale/offset
            del body[next(k for k in body if "to_q_convs.1.weight" in k)]  # SHA weight without encoding
        else:
            body = enc["param_encodings"]
            extra = copy.deepcopy(entry)
            extra["name"] = "unet.no_such.weight"
            body.append(extra)
            entry["scale"] = entry["scale"][:-1]
            entry["offset"] = entry["offset"][:-1]
            other = next(e for e in body if "to_k_convs.0.weight" in e["name"])
            other["scale"][0] = 0.0
            third = next(e for e in body if "to_v_convs.0.weight" in e["name"])
            third["offset"][0] = 3                                         # symmetric needs -2^(bw-1)
            body.append(copy.deepcopy(other))                              # duplicate name
            body.remove(next(e for e in body if "to_q_convs.1.weight" in e["name"]))

    enc = _mutated(version, mutate)
    required = required_sha_encodings(golden("mha", "per_channel", version), name_map)
    problems = "\n".join(check_encodings(enc, sha_shapes, source="x.encodings", required=required))
    assert "no_such.weight: names no parameter" in problems
    assert "per-channel encodings for" in problems
    assert "is not a positive number" in problems
    assert "offset" in problems
    assert "to_q_convs.1.weight has no encoding" in problems
    if version == "0.6.1":
        assert "min/max" in problems
    else:
        assert "more than once" in problems


# --- bad input: always the documented error -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(value=json_values)
def test_random_json_is_refused_with_encodings_error(value):
    with pytest.raises(EncodingsError):
        parse_encodings(json.dumps(value), "random.encodings")


@given(data=st.data(), version=st.sampled_from(VERSIONS))
def test_damaged_golden_file_gets_the_documented_error(data, version, tmp_path_factory):
    text = (GOLDEN / f"unet_tiny_mha_per_tensor_{version}.encodings").read_text()
    cut = data.draw(st.integers(1, len(text) - 2))
    with pytest.raises(EncodingsError, match="truncated.encodings"):
        parse_encodings(text[:cut], "truncated.encodings")


@given(version=st.sampled_from(VERSIONS), field=st.sampled_from(["scale", "offset", "bw", "bitwidth"]),
       value=st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=2), max_size=2), st.booleans()))
def test_wrong_field_types_are_named(version, field, value):
    enc = copy.deepcopy(golden("mha", "per_tensor", version))
    if version == "0.6.1":
        name, entry = next(iter(enc["param_encodings"].items()))
        target = entry[0]
        if field == "bw":
            field = "bitwidth"
    else:
        target = enc["param_encodings"][0]
        name = target["name"]
        if field == "bitwidth":
            field = "bw"
    target[field] = value
    with pytest.raises(EncodingsError) as info:
        parse_encodings(json.dumps(enc), "typed.encodings")
    assert "typed.encodings" in str(info.value) and name in str(info.value) and field in str(info.value)


def test_unknown_version_is_named():
    with pytest.raises(EncodingsError, match=r"v.encodings: version '9.9' is not one of"):
        parse_encodings(json.dumps({"version": "9.9", "param_encodings": {}, "activation_encodings": {}}), "v.encodings")


def test_duplicate_json_key_is_refused():
    text = '{"version": "0.6.1", "param_encodings": {"a": [], "a": []}, "activation_encodings": {}}'
    with pytest.raises(EncodingsError, match="duplicate key 'a'"):
        parse_encodings(text, "dup.encodings")


def test_heads_that_do_not_divide_the_channels_are_named(name_map):
    enc = golden("mha", "per_channel", "1.0.0")
    entry = next(e for e in enc["param_encodings"] if e["name"].endswith("to_q.weight"))
    entry["scale"] = entry["scale"][:-1]
    entry["offset"] = entry["offset"][:-1]
    with pytest.raises(EncodingsError, match=f"{entry['name']}: 31 per-channel encodings do not split into 2 heads"):
        mha_to_sha(enc, name_map)


# --- between formats ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["mha", "sha"])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_0_6_1_to_1_0_0_gives_exactly_aimets_1_0_0_parameter_encodings(form, weights):
    converted = convert_version(golden(form, weights, "0.6.1"), "1.0.0")
    assert converted["version"] == "1.0.0"
    assert params(converted) == params(golden(form, weights, "1.0.0"))


@pytest.mark.parametrize("form", ["mha", "sha"])
def test_1_0_0_to_0_6_1_gives_aimets_0_6_1_parameter_encodings(form):
    converted = convert_version(golden(form, "per_channel", "1.0.0"), "0.6.1")
    # min/max are derived from scale and offset; AIMET stored them rounded to float32
    assert close(params(converted), params(golden(form, "per_channel", "0.6.1")), rel=1e-6)
    assert convert_version(converted, "1.0.0")["param_encodings"] == golden(form, "per_channel", "1.0.0")["param_encodings"]


def test_a_1_0_0_entry_without_dtype_converts_as_the_integer_grid_it_holds():
    """dtype is required in 1.0.0 and check_encodings reports an entry without it; converting such an entry keeps
    the scale and offset it carries (only an integer grid has them) rather than turning it into a bare float."""
    enc = copy.deepcopy(golden("sha", "per_channel", "1.0.0"))
    entry = enc["param_encodings"][0]
    del entry["dtype"]
    v0 = convert_version(enc, "0.6.1")["param_encodings"][entry["name"]]
    assert [c["dtype"] for c in v0] == ["int"] * len(entry["scale"])
    assert [(c["scale"], c["offset"]) for c in v0] == list(zip(entry["scale"], entry["offset"]))


def test_per_block_encodings_have_no_0_6_1_form():
    enc = golden("mha", "per_channel", "1.0.0")
    enc["param_encodings"][0]["enc_type"] = "PER_BLOCK"
    with pytest.raises(EncodingsError, match="PER_BLOCK encodings have no 0.6.1 form"):
        convert_version(enc, "0.6.1")


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


# --- comparing two calibrations (REFERENCE section 9) -------------------------------------------------------

def _shifted(entry, version: str, *, steps: int = 0, scale_factor: float = 1.0):
    """An encoding as another CPU's calibration could give it: the grid moved by ``steps`` (offset and min/max
    together), the scale multiplied by ``scale_factor``."""
    entry = copy.deepcopy(entry)
    for enc in entry if version == "0.6.1" else [entry]:
        if version == "0.6.1":
            enc["offset"] -= steps
            enc["scale"] *= scale_factor
            enc["min"], enc["max"] = enc["offset"] * enc["scale"], (enc["offset"] + 2 ** enc["bitwidth"] - 1) * enc["scale"]
        else:
            enc["offset"] = [o - steps for o in enc["offset"]]
            enc["scale"] = [s * scale_factor for s in enc["scale"]]
    return entry


def _replace_activation(encodings: dict, name: str, entry) -> dict:
    out = copy.deepcopy(encodings)
    if out["version"] == "0.6.1":
        out["activation_encodings"][name] = entry
    else:
        out["activation_encodings"] = [entry if e["name"] == name else e for e in out["activation_encodings"]]
    return out


_ASYMMETRIC = [n for n, e in activations(golden("sha", "per_tensor", "0.6.1")).items() if e[0]["is_symmetric"] == "False"]


@given(version=st.sampled_from(VERSIONS), name=st.sampled_from(_ASYMMETRIC), steps=st.sampled_from([-1, 0, 1]),
       scale_factor=st.sampled_from([1.0, 1 - 1.3e-7, 1 + 1.3e-7, 1 + 5e-6]))
def test_a_recalibration_one_grid_step_away_is_the_same_encoding(version, name, steps, scale_factor):
    reference = golden("sha", "per_tensor", version)
    moved = _replace_activation(reference, name, _shifted(activations(reference)[name], version, steps=steps,
                                                          scale_factor=scale_factor))
    assert compare_encodings(reference, moved) == []
    assert compare_encodings(moved, reference) == []


@given(version=st.sampled_from(VERSIONS), name=st.sampled_from(_ASYMMETRIC), steps=st.sampled_from([-2, 2, 3]))
def test_a_grid_two_or_more_steps_away_is_a_different_encoding(version, name, steps):
    reference = golden("sha", "per_tensor", version)
    moved = _replace_activation(reference, name, _shifted(activations(reference)[name], version, steps=steps))
    problems = compare_encodings(reference, moved)
    assert len(problems) >= 1 and all(repr(name) in p and "grid step" in p for p in problems), problems


@given(version=st.sampled_from(VERSIONS), name=st.sampled_from(_ASYMMETRIC), sign=st.sampled_from([-1, 1]))
def test_a_scale_off_by_1e_3_is_a_different_encoding(version, name, sign):
    reference = golden("sha", "per_tensor", version)
    moved = _replace_activation(reference, name, _shifted(activations(reference)[name], version,
                                                          scale_factor=1 + sign * 1e-3))
    problems = compare_encodings(reference, moved)
    assert problems and repr(name) in problems[0] and "scales" in problems[0]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("section", ["param_encodings", "activation_encodings"])
def test_a_missing_name_is_a_different_encoding(version, section):
    reference = golden("mha", "per_channel", version)
    smaller = copy.deepcopy(reference)
    if version == "0.6.1":
        name = sorted(smaller[section])[3]
        del smaller[section][name]
    else:
        name = smaller[section].pop(3)["name"]
    assert compare_encodings(reference, smaller) == [f"encodings: {section}[{name!r}] is only in the first"]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_different_bitwidth_or_channel_count_is_a_different_encoding(version):
    reference = golden("mha", "per_channel", version)
    name = next(iter(params(reference)))
    changed = copy.deepcopy(reference)
    entry = params(changed)[name]
    if version == "0.6.1":
        entry[0]["bitwidth"] = 4
    else:
        entry["bw"] = 4
    assert any(repr(name) in p and "bw" in p for p in compare_encodings(reference, changed))
    fewer = copy.deepcopy(reference)
    entry = params(fewer)[name]
    if version == "0.6.1":
        entry.pop()
    else:
        entry["scale"].pop(), entry["offset"].pop()
    assert any(repr(name) in p and "channel" in p for p in compare_encodings(reference, fewer))


def test_the_two_formats_of_one_calibration_hold_the_same_parameter_encodings():
    # (AIMET's 1.0.0 export also names a few Constant outputs its 0.6.1 export leaves out, so only parameters)
    for form in ("mha", "sha"):
        for weights in WEIGHTS:
            assert compare_encodings(golden(form, weights, "0.6.1"), golden(form, weights, "1.0.0"),
                                     sections=("param_encodings",)) == []


def _containers(value, found=None) -> dict[int, object]:
    """Every dict and list reachable from ``value``, by id (kept alive in the result, so ids stay unique)."""
    found = {} if found is None else found
    if isinstance(value, (dict, list)):
        found[id(value)] = value
        for item in value.values() if isinstance(value, dict) else value:
            _containers(item, found)
    return found


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
        inputs = _containers(source)
        output = rewrite()
        shared = inputs.keys() & _containers(output).keys()
        assert not shared, f"{label}: {len(shared)} containers shared with the input"
        assert source == before, label


@given(version=st.sampled_from(VERSIONS), data=st.data())
def test_a_symmetric_grid_is_accepted_signed_or_unsigned_and_at_no_other_offset(version, data, sha_shapes):
    """AIMET's symmetric grids sit at offset -2^(bw-1) (signed) or 0 (unsigned, for non-negative tensors); any other
    offset with is_symmetric set is a defect, whatever else is right about the entry."""
    enc = copy.deepcopy(golden("sha", "per_channel", version))
    body = enc["param_encodings"]
    name = sorted(body)[0] if version == "0.6.1" else body[0]["name"]
    entry = _channels_of(body, name, version)
    bw = entry[0]["bitwidth"] if version == "0.6.1" else entry["bw"]
    offset = data.draw(st.one_of(st.sampled_from([0, -(2 ** (bw - 1))]), st.integers(-(2**bw - 1), 0)), label="offset")
    if version == "0.6.1":
        channel = entry[0]
        channel.update(is_symmetric="True", offset=offset, min=offset * channel["scale"],
                       max=(offset + 2**bw - 1) * channel["scale"])
    else:
        entry["is_sym"], entry["offset"][0] = True, offset
    problems = check_encodings(enc, sha_shapes, source="x.encodings")
    flagged = any(f"{name}[0]: symmetric encoding with offset {offset}" in p for p in problems)
    assert flagged == (offset not in (0, -(2 ** (bw - 1)))), problems


# Each defect: the versions it applies to, how to plant it on the entry ``name``, the words check_encodings must say.
def _plant_unknown(body, name, version):
    entry = copy.deepcopy(body[name] if version == "0.6.1" else next(e for e in body if e["name"] == name))
    unknown = name.replace(".weight", ".no_such.weight")
    if version == "0.6.1":
        body[unknown] = entry
    else:
        body.append({**entry, "name": unknown})
    return f"{unknown}: names no parameter"


def _channels_of(body, name, version):
    return body[name] if version == "0.6.1" else next(e for e in body if e["name"] == name)


def _plant_channel_count(body, name, version):
    entry = _channels_of(body, name, version)
    if version == "0.6.1":
        body[name] = entry[:-1]
        return f"{name}: {len(entry) - 1} per-channel encodings for {len(entry)}"
    entry["scale"], entry["offset"] = entry["scale"][:-1], entry["offset"][:-1]
    return f"{name}: {len(entry['scale'])} per-channel encodings for {len(entry['scale']) + 1}"


def _plant_drift(key):
    def plant(body, name, version):
        channel = _channels_of(body, name, version)[0]
        channel[key] += 10 * channel["scale"]  # ten grid steps: far beyond AIMET's rounding of min/max
        return f"{name}[0]: min/max"
    return plant


def _plant_symmetric_offset(body, name, version):
    entry = _channels_of(body, name, version)
    if version == "0.6.1":
        entry[0]["is_symmetric"], entry[0]["offset"] = "True", -(2 ** (entry[0]["bitwidth"] - 1)) + 3
    else:
        entry["is_sym"], entry["offset"][0] = True, -(2 ** (entry["bw"] - 1)) + 3
    return f"{name}[0]: symmetric encoding with offset"


def _plant_no_dtype(body, name, version):
    del _channels_of(body, name, version)["dtype"]
    return f"{name}: has no dtype"


def _plant_duplicate(body, name, version):
    body.append(copy.deepcopy(_channels_of(body, name, version)))
    return f"names {name!r} more than once"


def _plant_bad_scale(body, name, version):
    entry = _channels_of(body, name, version)
    if version == "0.6.1":
        entry[0]["scale"] = -1.0
    else:
        entry["scale"][0] = -1.0
    return f"{name}[0]: scale -1.0 is not a positive number"


def _plant_missing(body, name, version):
    if version == "0.6.1":
        del body[name]
    else:
        body.remove(_channels_of(body, name, version))
    return f"{name} has no encoding"


_DEFECTS = {
    "unknown name": (VERSIONS, _plant_unknown),
    "channel count": (VERSIONS, _plant_channel_count),
    "min drifting alone": (["0.6.1"], _plant_drift("min")),
    "max drifting alone": (["0.6.1"], _plant_drift("max")),
    "offset against is_symmetric": (VERSIONS, _plant_symmetric_offset),
    "no dtype": (["1.0.0"], _plant_no_dtype),
    "duplicate name": (["1.0.0"], _plant_duplicate),  # a 0.6.1 body is a JSON object: the parser refuses duplicates
    "scale not positive": (VERSIONS, _plant_bad_scale),
    "missing required": (VERSIONS, _plant_missing),
}


@given(version=st.sampled_from(VERSIONS), data=st.data())
def test_check_encodings_reports_every_planted_defect_whatever_the_order(version, data, sha_shapes, name_map):
    """Defects planted on distinct required SHA head weights (a clean file reports nothing), entries in any order:
    every defect is reported, naming its entry."""
    enc = copy.deepcopy(golden("sha", "per_channel", version))
    required = required_sha_encodings(golden("mha", "per_channel", version), name_map)
    body = enc["param_encodings"]
    names = sorted(body) if version == "0.6.1" else sorted(e["name"] for e in body)
    targets = [n for n in names if n.split("unet.", 1)[-1] in required]
    kinds = data.draw(st.lists(st.sampled_from([k for k, (vs, _) in _DEFECTS.items() if version in vs]),
                               unique=True, max_size=4), label="defects")
    chosen = data.draw(st.lists(st.sampled_from(targets), unique=True, min_size=len(kinds), max_size=len(kinds)))
    expected = [_DEFECTS[kind][1](body, name, version) for kind, name in zip(kinds, chosen)]
    order = data.draw(st.permutations(list(body) if version == "0.6.1" else range(len(body))), label="order")
    enc["param_encodings"] = {k: body[k] for k in order} if version == "0.6.1" else [body[i] for i in order]
    problems = check_encodings(enc, sha_shapes, source="x.encodings", required=required)
    report = "\n".join(problems)
    for kind, words in zip(kinds, expected):
        assert words in report, f"{kind}: {words!r} not reported in:\n{report}"
    if not kinds:
        assert problems == []


# --- what the encodings mutation run found unproven -----------------------------------------------------------

def test_float_encodings_convert_between_formats_as_aimet_writes_them():
    """AIMET writes a float (unquantized, e.g. fp16) tensor as {"bitwidth", "dtype": "float"} in 0.6.1 and as
    {"bw", "dtype": "FLOAT", "enc_type", "is_sym", "name"} without scale or offset in 1.0.0."""
    v1 = {"version": "1.0.0", "param_encodings": [],
          "activation_encodings": [{"bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "is_sym": False,
                                    "name": "x"}]}
    v0 = convert_version(v1, "0.6.1")
    assert v0["activation_encodings"] == {"x": [{"bitwidth": 16, "dtype": "float"}]}
    assert convert_version(v0, "1.0.0") == v1


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


@pytest.mark.parametrize("rewrite", ["mha_to_sha", "sha_to_mha"])
def test_a_malformed_parameter_section_is_named_with_the_source(name_map, rewrite):
    bad = {"version": "1.0.0", "param_encodings": {"not": "a list"}, "activation_encodings": []}
    function = {"mha_to_sha": mha_to_sha, "sha_to_mha": sha_to_mha}[rewrite]
    with pytest.raises(EncodingsError) as info:
        function(bad, name_map, source="my.encodings")
    assert str(info.value) == "my.encodings: param_encodings must be a list in version 1.0.0"


@pytest.mark.parametrize("version", VERSIONS)
def test_per_tensor_copies_join_back_without_sharing_structure(name_map, version):
    """AIMET's own SHA files hold per-head calibrations; the per-tensor copies mha_to_sha makes join back to the
    MHA entry, in a new structure."""
    mha = golden("mha", "per_tensor", version)
    sha, _ = mha_to_sha(mha, name_map)
    inputs = _containers(sha)
    back, report = sha_to_mha(sha, name_map)
    assert params(back) == params(mha) and report.params_joined == len(name_map)
    assert not inputs.keys() & _containers(back).keys()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("per_tensor", [True, False])
def test_a_single_head_joins_to_itself(version, per_tensor):
    entry = ([{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "offset": -3, "scale": 0.5, "min": -1.5,
               "max": 126.0}] if version == "0.6.1" else
             {"name": "h0", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR" if per_tensor else "PER_CHANNEL",
              "is_sym": False, "scale": [0.5], "offset": [-3]})
    joined = join_entries([copy.deepcopy(entry)], version, "w", "test", per_tensor=per_tensor)
    assert joined == (entry if version == "0.6.1" else dict(entry, name="w"))


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


def _v0_channel(**fields) -> dict:
    channel = {"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "offset": -2, "scale": 0.5, "min": -1.0,
               "max": 126.5}
    return {k: v for k, v in {**channel, **fields}.items() if v is not None}


def _v0_file(entry: list) -> dict:
    return {"version": "0.6.1", "activation_encodings": {}, "param_encodings": {"w": entry}}


@pytest.mark.parametrize("field, value, problem", [
    ("is_symmetric", "True", "sym False != True"),
    ("dtype", "float", "dtype 'int' != 'float'"),
    ("bitwidth", 16, "bw 8 != 16"),
    ("min", 0.5, "min -1.0 and 0.5 are more than 1 grid step(s) apart"),  # 3 steps of 0.5 away, max unmoved
    ("max", 125.0, "max 126.5 and 125.0 are more than 1 grid step(s) apart"),
])
def test_compare_names_the_one_field_a_0_6_1_channel_differs_in(field, value, problem):
    a, b = _v0_file([_v0_channel()]), _v0_file([_v0_channel(**{field: value})])
    assert compare_encodings(a, b) == [f"encodings: param_encodings['w'][0]: {problem}"]


def test_absent_0_6_1_dtype_and_symmetry_mean_int_and_asymmetric():
    """AIMET leaves dtype and is_symmetric out of older 0.6.1 files: they read as int and not symmetric."""
    bare = _v0_file([_v0_channel(dtype=None, is_symmetric=None)])
    assert compare_encodings(bare, _v0_file([_v0_channel()])) == []
    assert compare_encodings(bare, _v0_file([_v0_channel(is_symmetric="True")])) != []
    v1 = convert_version(bare, "1.0.0")["param_encodings"][0]
    assert (v1["dtype"], v1["is_sym"], v1["scale"], v1["offset"]) == ("INT", False, [0.5], [-2])


@pytest.mark.parametrize("field, value", [("bitwidth", 16), ("dtype", "float")])
def test_0_6_1_channels_that_differ_in_bitwidth_or_dtype_have_no_1_0_0_form(field, value):
    mixed = _v0_file([_v0_channel(), _v0_channel(**{field: value})])
    with pytest.raises(EncodingsError) as info:
        convert_version(mixed, "1.0.0")
    assert str(info.value) == ("encodings: param_encodings['w']: channels with different bitwidths or dtypes have "
                               "no 1.0.0 form")


def _lpbq_file() -> dict:
    """A 1.0.0 file with one per-block (LPBQ) entry, which 0.6.1 cannot hold."""
    return {"version": "1.0.0", "activation_encodings": [], "param_encodings": [
        {"name": "w", "bw": 4, "dtype": "INT", "enc_type": "LPBQ", "is_sym": True, "scale": [1.0], "offset": [-8]}]}


def test_convert_version_errors_name_the_source_and_the_entry():
    per_block = _lpbq_file()
    with pytest.raises(EncodingsError) as info:
        convert_version(per_block, "0.6.1")
    assert str(info.value) == "encodings: param_encodings['w']: LPBQ encodings have no 0.6.1 form"
    with pytest.raises(EncodingsError) as info:
        convert_version({"version": "1.0.0", "param_encodings": {}, "activation_encodings": []}, "0.6.1")
    assert str(info.value) == "encodings: param_encodings must be a list in version 1.0.0"
    with pytest.raises(EncodingsError) as info:
        convert_version(per_block, "2.0.0")
    assert str(info.value) == "version '2.0.0' is not one of ('0.6.1', '1.0.0')"


@pytest.mark.parametrize("version", VERSIONS)
def test_convert_version_copies_everything_it_passes_through(version):
    """To its own version: an equal copy. To the other: top-level keys besides the sections come through equal,
    nested ones included, and share nothing with the input."""
    source = copy.deepcopy(golden("mha", "per_channel", version))
    source["tool"] = {"name": "aimet", "options": [{"seed": 0}]}
    same = convert_version(source, version)
    assert same == source and not _containers(source).keys() & _containers(same).keys()
    other = convert_version(source, "1.0.0" if version == "0.6.1" else "0.6.1")
    assert other["tool"] == source["tool"]
    assert not _containers(source).keys() & _containers(other).keys()


def test_encodings_are_written_with_sorted_keys_as_aimet_writes_them():
    text = dumps_encodings({"version": "1.0.0", "param_encodings": [{"name": "w", "bw": 8}],
                            "activation_encodings": []})
    objects = []
    json.loads(text, object_pairs_hook=lambda pairs: objects.append([k for k, _ in pairs]) or dict(pairs))
    assert objects and all(keys == sorted(keys) for keys in objects)
    assert text.startswith('{\n    "activation_encodings"')  # indented by 4, as AIMET's files are


def _one_head_pair(version: str):
    """An MHA parameter encoding (of to_q) of a one-head attention, and the name map of that attention."""
    entry = ([_v0_channel()] if version == "0.6.1" else
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


def _v1_file(**fields) -> dict:
    entry = {"name": "w", "bw": 8, "dtype": "INT", "enc_type": "PER_CHANNEL", "is_sym": False, "scale": [0.5],
             "offset": [-2]}
    entry = {k: v for k, v in {**entry, **fields}.items() if v is not None}
    return {"version": "1.0.0", "activation_encodings": [], "param_encodings": [entry]}


@pytest.mark.parametrize("field, value, problem", [
    ("bw", 16, "bw 8 != 16"),
    ("dtype", "FLOAT", "dtype 'int' != 'float'"),
    ("is_sym", True, "sym False != True"),
    ("enc_type", "LPBQ", "enc_type 'PER_CHANNEL' != 'LPBQ'"),
    ("block_size", 64, "block_size None != 64"),
])
def test_compare_names_the_one_field_a_1_0_0_entry_differs_in(field, value, problem):
    assert compare_encodings(_v1_file(), _v1_file(**{field: value})) == [
        f"encodings: param_encodings['w'][0]: {problem}"]


def test_an_absent_1_0_0_dtype_means_int():
    assert compare_encodings(_v1_file(dtype=None), _v1_file()) == []
    assert compare_encodings(_v1_file(dtype=None), _v1_file(dtype="FLOAT")) != []


def test_scales_exactly_at_the_tolerance_are_the_same():
    """The tolerance is inclusive: |a - b| <= rtol * max(|a|, |b|). With rtol 0.5, scales 1.0 and 0.5 sit on it
    (exactly, in binary floating point); 0.4999 is past it."""
    a = _v1_file(scale=[1.0, 1.0], offset=[0, 0])
    assert compare_encodings(a, _v1_file(scale=[1.0, 0.5], offset=[0, 0]), scale_rtol=0.5) == []
    assert compare_encodings(a, _v1_file(scale=[1.0, 0.4999], offset=[0, 0]), scale_rtol=0.5) == [
        "encodings: param_encodings['w'][1]: scales 1.0 and 0.4999 differ by more than 0.5 relative"]


def test_0_6_1_min_and_max_are_compared_only_where_both_files_have_them():
    """A 0.6.1 file may leave min/max out (they follow from scale and offset); each is compared on its own
    where both sides have it, and a grid step exactly is still within one step."""
    full = _v0_file([_v0_channel()])
    assert compare_encodings(full, _v0_file([_v0_channel(min=None, max=None)])) == []
    no_min_moved_max = _v0_file([_v0_channel(min=None, max=125.0)])
    assert compare_encodings(full, no_min_moved_max) == [
        "encodings: param_encodings['w'][0]: max 126.5 and 125.0 are more than 1 grid step(s) apart"]
    one_step = _v0_file([_v0_channel(min=-0.5)])  # scale 0.5: one grid step exactly, and no scale tolerance
    assert compare_encodings(full, one_step, scale_rtol=0.0) == []


def test_comparing_across_formats_names_the_source_of_what_cannot_convert():
    lpbq = _lpbq_file()
    with pytest.raises(EncodingsError) as info:
        compare_encodings(_v0_file([_v0_channel()]), lpbq, source="pair.encodings")
    assert str(info.value) == "pair.encodings: param_encodings['w']: LPBQ encodings have no 0.6.1 form"


def test_compare_reports_every_difference_of_every_entry_in_order():
    a = {"version": "0.6.1", "activation_encodings": {}, "param_encodings": {
        "w1": [_v0_channel(), _v0_channel()], "w2": [_v0_channel()], "w0": [_v0_channel()]}}
    b = {"version": "0.6.1", "activation_encodings": {}, "param_encodings": {
        "w1": [_v0_channel()], "w2": [_v0_channel(bitwidth=4)], "w3": [_v0_channel()]}}
    assert compare_encodings(a, b, source="pair") == [
        "pair: param_encodings['w0'] is only in the first",
        "pair: param_encodings['w3'] is only in the second",
        "pair: param_encodings['w1']: 2 channel(s) != 1",
        "pair: param_encodings['w2'][0]: bw 8 != 4",
    ]


@pytest.mark.parametrize("side", ["first", "second"])
def test_compare_names_the_source_of_a_malformed_section(side):
    good, bad = _v1_file(), dict(_v1_file(), param_encodings={"w": []})
    pair = (bad, good) if side == "first" else (good, bad)
    with pytest.raises(EncodingsError) as info:
        compare_encodings(*pair, source="pair")
    assert str(info.value) == "pair: param_encodings must be a list in version 1.0.0"


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


@pytest.mark.parametrize("bad_entry", [{"bw": 8}, {"name": 3}, ["not", "an", "object"]])
def test_a_1_0_0_entry_without_a_string_name_is_named_by_its_place(bad_entry):
    text = json.dumps({"version": "1.0.0", "activation_encodings": [], "param_encodings": [bad_entry]})
    with pytest.raises(EncodingsError) as info:
        parse_encodings(text, source="f.encodings")
    assert str(info.value) == "f.encodings: param_encodings[0] has no string 'name'"


def test_parse_names_the_source_of_a_section_of_the_wrong_kind():
    text = json.dumps({"version": "0.6.1", "activation_encodings": {}, "param_encodings": []})
    with pytest.raises(EncodingsError) as info:
        parse_encodings(text, source="f.encodings")
    assert str(info.value) == "f.encodings: param_encodings must be an object in version 0.6.1"


def test_a_symmetric_encoding_off_its_grid_says_which_offsets_are_allowed():
    """For bitwidth 8 a symmetric grid sits at offset -2^7 = -128 (signed) or 0 (unsigned)."""
    off_grid = _v1_file(is_sym=True, offset=[-5], scale=[0.5])
    problems = check_encodings(off_grid, {"w": (1, 4)})
    assert problems == ["encodings: w[0]: symmetric encoding with offset -5, expected -128 or 0"]


# --- the second encodings mutation run: refusals that name their key, channels checked whatever their kind -----

def _with_entry(encodings: dict, section: str, name: str, entry) -> dict:
    """A copy of ``encodings`` with ``entry`` added to ``section`` under ``name`` (last, in either format)."""
    out = copy.deepcopy(encodings)
    if out["version"] == "0.6.1":
        out[section][name] = copy.deepcopy(entry)
    else:
        out[section].append(dict(copy.deepcopy(entry), name=name))
    return out


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


@pytest.mark.parametrize("source", [None, "my.encodings"])  # None: the default label, "encodings"
@pytest.mark.parametrize("call, section", [
    (lambda bad, name_map, **kw: mha_to_sha(bad, name_map, **kw), "activation_encodings"),
    (lambda bad, name_map, **kw: required_sha_encodings(bad, name_map, **kw), "param_encodings"),
    (lambda bad, name_map, **kw: check_encodings(bad, {}, **kw), "param_encodings"),
    (lambda bad, name_map, **kw: check_encodings(dict(bad, param_encodings=[]), {}, **kw), "activation_encodings"),
], ids=["mha_to_sha", "required_sha_encodings", "check_encodings params", "check_encodings activations"])
def test_a_malformed_section_is_named_with_the_source(name_map, call, section, source):
    bad = {"version": "1.0.0", "param_encodings": [], "activation_encodings": []}
    bad[section] = {"not": "a list"}
    with pytest.raises(EncodingsError) as info:
        call(bad, name_map, **({} if source is None else {"source": source}))
    assert str(info.value) == f"{source or 'encodings'}: {section} must be a list in version 1.0.0"


def test_a_0_6_1_float_channel_has_no_grid_to_check():
    """AIMET writes an unquantized tensor as {"bitwidth": 16, "dtype": "float"}: no scale or offset to check."""
    enc = {"version": "0.6.1", "param_encodings": {}, "activation_encodings": {"x": [{"bitwidth": 16,
                                                                                      "dtype": "float"}]}}
    assert check_encodings(enc, {}) == []


def test_a_0_6_1_channel_without_dtype_is_an_integer_grid_and_checked():
    enc = _v0_file([_v0_channel(dtype=None, offset=3, min=1.5, max=129.0)])
    assert check_encodings(enc, {"w": (1, 4)}) == ["encodings: w[0]: offset 3 is outside [-255, 0] for bitwidth 8"]


def test_every_0_6_1_channel_is_checked_whatever_the_channels_before_it():
    """A float channel before a broken integer one does not end the check of the entry."""
    enc = _v0_file([{"bitwidth": 16, "dtype": "float"}, _v0_channel(scale=-0.5)])
    assert check_encodings(enc, {"w": (2, 4)}) == ["encodings: w[1]: scale -0.5 is not a positive number"]


@pytest.mark.parametrize("absent", [("min", "max"), ("min",), ("max",)])
def test_min_and_max_are_checked_only_where_a_0_6_1_channel_has_both(absent):
    """min/max are redundant with scale and offset; a channel that lacks either is checked on its grid alone."""
    enc = _v0_file([_v0_channel(**{key: None for key in absent})])
    assert check_encodings(enc, {"w": (1, 4)}) == []


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("bw", [4, 8, 16])
def test_an_asymmetric_grid_has_offsets_from_one_minus_2_to_the_bw_up_to_0(version, bw):
    """offset = round(min / scale) with min <= 0 <= max and scale = (max - min) / (2^bw - 1), so an asymmetric
    grid's offset lies in [-(2^bw - 1), 0]: the bounds are accepted, one step beyond either is not."""
    def problems(offset):
        if version == "0.6.1":
            enc = _v0_file([_v0_channel(bitwidth=bw, offset=offset, min=offset * 0.5,
                                        max=(offset + 2**bw - 1) * 0.5)])
        else:
            enc = _v1_file(bw=bw, offset=[offset])
        return check_encodings(enc, {"w": (1, 4)})

    assert problems(0) == [] and problems(-(2**bw - 1)) == []
    for offset in (1, -(2**bw)):
        assert problems(offset) == [f"encodings: w[0]: offset {offset} is outside [{-(2**bw - 1)}, 0] for bitwidth {bw}"]


def _per_block_entry(kind: str, channels: range, blocks: int, name: str) -> dict:
    """A 1.0.0 per-block entry as AIMET writes it for these output channels, built channel by channel: PER_BLOCK
    has a scale and offset per (channel, block); LPBQ a float scale and offset per channel and an integer scale
    per (channel, block)."""
    common = {"name": name, "bw": 4, "dtype": "INT", "enc_type": kind, "is_sym": True, "block_size": 16}
    if kind == "PER_BLOCK":
        return {**common, "scale": [0.1 * (c + 1) + 0.01 * b for c in channels for b in range(blocks)],
                "offset": [-8 for c in channels for b in range(blocks)]}
    return {**common, "compressed_bw": 8, "scale": [0.1 * (c + 1) for c in channels], "offset": [-8 for c in channels],
            "per_block_int_scale": [c * blocks + b + 1 for c in channels for b in range(blocks)]}


@given(kind=st.sampled_from(["PER_BLOCK", "LPBQ"]), heads=st.integers(1, 4), head_channels=st.integers(1, 3),
       blocks=st.integers(1, 3))
def test_a_per_block_entry_splits_into_the_entries_of_each_heads_channels(kind, heads, head_channels, blocks):
    """Each head's encoding is the one AIMET would write for that head's output channels alone, every per-channel
    and per-block list included; joined back, the heads give the MHA entry."""
    whole = _per_block_entry(kind, range(heads * head_channels), blocks, "w")
    names = [f"h{i}" for i in range(heads)]
    split = split_entry(whole, "1.0.0", names, "w")
    assert split == [_per_block_entry(kind, range(i * head_channels, (i + 1) * head_channels), blocks, n)
                     for i, n in enumerate(names)]
    assert join_entries(split, "1.0.0", "w", "w", per_tensor=False) == whole


def test_a_per_block_list_that_does_not_divide_into_the_heads_is_named():
    entry = _per_block_entry("LPBQ", range(2), 2, "w")
    entry["per_block_int_scale"] = entry["per_block_int_scale"][:3]
    with pytest.raises(EncodingsError) as info:
        split_entry(entry, "1.0.0", ["h0", "h1"], "f.encodings: w")
    assert str(info.value) == "f.encodings: w: 3 values of 'per_block_int_scale' do not split into 2 heads"


# Each malformed file, and the words that refuse it: the source and the key, as the user wrote them.
_V1 = '{{"version": "1.0.0", "activation_encodings": [], "param_encodings": [{}]}}'
_V0 = '{{"version": "0.6.1", "activation_encodings": {{}}, "param_encodings": {{"w": {}}}}}'
_W1 = '"name": "w", "bw": 8, "dtype": "INT", "enc_type": "PER_CHANNEL", "is_sym": false'
_REFUSALS = [
    ("[]", "expected a JSON object, got list"),
    ('{"version": "0.6.1", "param_encodings": {}}', "missing 'activation_encodings'"),
    ('{"version": "0.6.1", "param_encodings": {}, "activation_encodings": {}, "version": "0.6.1"}',
     "duplicate key 'version'"),
    (_V0.format("[]"), "param_encodings['w']: expected a non-empty list of encodings"),
    (_V0.format("[1]"), "param_encodings['w']: expected a non-empty list of encodings"),
    (_V0.format("5"), "param_encodings['w']: expected a non-empty list of encodings"),
    (_V0.format('[{"bitwidth": 8, "scale": "x", "offset": 0}]'),
     "param_encodings['w']: field 'scale' must be a number, got 'x'"),
    (_V1.format('{"name": "w", "enc_type": "PER_TENSOR"}'), "param_encodings['w']: missing field 'bw'"),
    (_V1.format('{"name": "w", "bw": 8, "enc_type": "PER_ROW"}'), "param_encodings['w']: unknown enc_type 'PER_ROW'"),
    (_V1.format('{' + _W1 + ', "scale": [], "offset": []}'),
     "param_encodings['w']: field 'scale' must be a non-empty list of numbers"),
    (_V1.format('{' + _W1 + ', "scale": ["x"], "offset": [0]}'),
     "param_encodings['w']: field 'scale' must be a non-empty list of numbers"),
    (_V1.format('{"name": "w", "bw": 8, "enc_type": "PER_CHANNEL", "scale": ["x"], "offset": [0]}'),  # no dtype: INT
     "param_encodings['w']: field 'scale' must be a non-empty list of numbers"),
    (_V1.format('{' + _W1 + ', "scale": [0.5, 0.5], "offset": [0]}'), "param_encodings['w']: 2 scales but 1 offsets"),
]


@pytest.mark.parametrize("source", [None, "f.encodings"])  # None: the default label, "encodings"
@pytest.mark.parametrize("text, words", _REFUSALS)
def test_every_malformed_file_is_refused_naming_the_source_and_the_key(text, words, source):
    with pytest.raises(EncodingsError) as info:
        parse_encodings(text, **({} if source is None else {"source": source}))
    assert str(info.value) == f"{source or 'encodings'}: {words}"


def test_load_names_a_missing_or_binary_file(tmp_path):
    missing, binary = tmp_path / "none.encodings", tmp_path / "binary.encodings"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(EncodingsError) as info:
        load_encodings(missing)
    assert str(info.value) == f"{missing}: no such encodings file"
    with pytest.raises(EncodingsError) as info:
        load_encodings(binary)
    assert str(info.value).startswith(f"{binary}: not a text file (")


def test_per_block_lpbq_and_float_entries_are_well_formed_1_0_0():
    """The 1.0.0 kinds AIMET writes beside per-tensor and per-channel ones parse: per-block and LPBQ grids, and
    float entries, which have no grid (no scale or offset)."""
    encodings = {"version": "1.0.0", "param_encodings": [_per_block_entry("PER_BLOCK", range(2), 2, "a"),
                                                         _per_block_entry("LPBQ", range(2), 2, "b")],
                 "activation_encodings": [{"name": "x", "bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR",
                                           "is_sym": False}]}
    assert parse_encodings(dumps_encodings(encodings)) == encodings


def test_a_1_0_0_float_entry_has_no_grid_to_check():
    enc = {"version": "1.0.0", "param_encodings": [], "activation_encodings": [
        {"name": "x", "bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "is_sym": False}]}
    assert check_encodings(enc, {}) == []


def test_a_1_0_0_entry_without_dtype_is_reported_and_its_grid_still_checked():
    enc = _v1_file(dtype=None, offset=[3])
    assert check_encodings(enc, {"w": (1, 4)}) == [
        "encodings: w: has no dtype (a 1.0.0 entry says INT or FLOAT)",
        "encodings: w[0]: offset 3 is outside [-255, 0] for bitwidth 8"]


def test_an_activations_problem_names_the_activation():
    enc = {"version": "1.0.0", "param_encodings": [], "activation_encodings": [
        {"name": "a", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False, "scale": [0.0],
         "offset": [0]}]}
    assert check_encodings(enc, {}, source="x") == ["x: activation a[0]: scale 0.0 is not a positive number"]


def test_a_duplicate_activation_name_is_reported():
    """A 1.0.0 section is a list, which can name an activation twice (a 0.6.1 object cannot: the parser refuses)."""
    entry = {"name": "a", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False, "scale": [0.5],
             "offset": [0]}
    enc = {"version": "1.0.0", "param_encodings": [], "activation_encodings": [entry, dict(entry), dict(entry, name="b")]}
    assert check_encodings(enc, {}, source="x") == ["x: activation_encodings names 'a' more than once"]


def test_every_parameter_entry_is_checked_whatever_comes_before_it():
    """An entry naming no parameter does not end the check: the broken entry after it is reported too."""
    enc = _v1_file(name="stray")
    enc["param_encodings"].append(dict(enc["param_encodings"][0], name="w", scale=[-0.5]))
    assert check_encodings(enc, {"w": (1, 4)}) == ["encodings: stray: names no parameter of the model",
                                                   "encodings: w[0]: scale -0.5 is not a positive number"]


def test_an_entry_outside_the_models_prefix_names_no_parameter():
    """With the model's names found under ``unet.``, ``cnet.w`` (another submodule, as long a prefix) is not the
    model's ``w``."""
    enc = _v1_file(name="unet.w")
    enc["param_encodings"].append(dict(enc["param_encodings"][0], name="cnet.w"))
    assert check_encodings(enc, {"w": (1, 4)}) == ["encodings: cnet.w: names no parameter of the model"]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_scalar_parameter_has_one_channel(version):
    """A 0-d parameter (shape ()) is one channel: a per-tensor encoding fits it, a two-channel one does not."""
    one = _v0_file([_v0_channel()]) if version == "0.6.1" else _v1_file(enc_type="PER_TENSOR")
    two = _v0_file([_v0_channel(), _v0_channel()]) if version == "0.6.1" else _v1_file(scale=[0.5] * 2, offset=[-2] * 2)
    assert check_encodings(one, {"w": ()}) == []
    assert check_encodings(two, {"w": ()}) == ["encodings: w: 2 per-channel encodings for 1 output channels"]


def test_no_prefix_is_found_where_no_name_matches():
    assert detect_prefix(["a.b", "c"], ["x.y"]) == ""


def test_min_and_max_exactly_one_step_off_the_grid_are_within_aimets_rounding():
    """AIMET rounds min/max to the grid: up to one step (= scale) away is accepted, on either end."""
    for shifted in ({"min": -1.0 - 0.5}, {"max": 126.5 + 0.5}):
        assert check_encodings(_v0_file([_v0_channel(**shifted)]), {"w": (1, 4)}) == []
    beyond = _v0_file([_v0_channel(min=-1.0 - 0.5 - 0.25)])
    assert check_encodings(beyond, {"w": (1, 4)}) == [
        "encodings: w[0]: min/max -1.75/126.5 disagree with scale and offset, which give -1/126.5"]


def test_a_zero_scale_is_reported_once_not_as_a_min_max_disagreement_too():
    enc = _v0_file([_v0_channel(scale=0.0, offset=-2, min=-1.0, max=1.0)])
    assert check_encodings(enc, {"w": (1, 4)}) == ["encodings: w[0]: scale 0.0 is not a positive number"]
