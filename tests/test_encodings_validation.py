"""AIMET encodings against a model: what ``check_encodings`` and ``required_sha_encodings`` report.

Proves: AIMET's own SHA files and the converted ones report nothing against the SHA model; every defect (a name
that is no parameter, a wrong channel count, a scale that is not positive, an offset off its grid, min/max that
contradict scale and offset, a missing dtype, a duplicate name, a required encoding missing) is reported, all of
them at once, naming the entry, whatever the order of the entries; what AIMET legitimately writes (float
entries, absent min/max or dtype, min/max rounded to the grid, signed and unsigned symmetric grids) is accepted.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from encodings_helpers import (
    VERSIONS,
    WEIGHTS,
    golden,
    params,
    v0_channel,
    v0_file,
    v1_file,
)
from pasd_verify.encodings import EncodingsError, mha_to_sha
from pasd_verify.encodings_check import check_encodings, required_sha_encodings


def _channels_of(body, name, version):
    return body[name] if version == "0.6.1" else next(e for e in body if e["name"] == name)


# --- a real file reports nothing ------------------------------------------------------------------------------

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


# --- every problem, all at once -------------------------------------------------------------------------------

def _mutated(version: str, mutate) -> dict:
    enc = copy.deepcopy(golden("sha", "per_channel", version))
    mutate(enc)
    return enc


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


# Each defect: the versions it applies to, how to plant it on the entry ``name``, the words check_encodings must say.
def _plant_unknown(body, name, version):
    entry = copy.deepcopy(body[name] if version == "0.6.1" else next(e for e in body if e["name"] == name))
    unknown = name.replace(".weight", ".no_such.weight")
    if version == "0.6.1":
        body[unknown] = entry
    else:
        body.append({**entry, "name": unknown})
    return f"{unknown}: names no parameter"


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


def test_every_parameter_entry_is_checked_whatever_comes_before_it():
    """An entry naming no parameter does not end the check: the broken entry after it is reported too."""
    enc = v1_file(name="stray")
    enc["param_encodings"].append(dict(enc["param_encodings"][0], name="w", scale=[-0.5]))
    assert check_encodings(enc, {"w": (1, 4)}) == ["encodings: stray: names no parameter of the model",
                                                   "encodings: w[0]: scale -0.5 is not a positive number"]


def test_every_0_6_1_channel_is_checked_whatever_the_channels_before_it():
    """A float channel before a broken integer one does not end the check of the entry."""
    enc = v0_file([{"bitwidth": 16, "dtype": "float"}, v0_channel(scale=-0.5)])
    assert check_encodings(enc, {"w": (2, 4)}) == ["encodings: w[1]: scale -0.5 is not a positive number"]


# --- names and channel counts against the model ---------------------------------------------------------------

def test_an_entry_outside_the_models_prefix_names_no_parameter():
    """With the model's names found under ``unet.``, ``cnet.w`` (another submodule, as long a prefix) is not the
    model's ``w``."""
    enc = v1_file(name="unet.w")
    enc["param_encodings"].append(dict(enc["param_encodings"][0], name="cnet.w"))
    assert check_encodings(enc, {"w": (1, 4)}) == ["encodings: cnet.w: names no parameter of the model"]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_scalar_parameter_has_one_channel(version):
    """A 0-d parameter (shape ()) is one channel: a per-tensor encoding fits it, a two-channel one does not."""
    one = v0_file([v0_channel()]) if version == "0.6.1" else v1_file(enc_type="PER_TENSOR")
    two = v0_file([v0_channel(), v0_channel()]) if version == "0.6.1" else v1_file(scale=[0.5] * 2, offset=[-2] * 2)
    assert check_encodings(one, {"w": ()}) == []
    assert check_encodings(two, {"w": ()}) == ["encodings: w: 2 per-channel encodings for 1 output channels"]


def test_a_duplicate_activation_name_is_reported():
    """A 1.0.0 section is a list, which can name an activation twice (a 0.6.1 object cannot: the parser refuses)."""
    entry = {"name": "a", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False, "scale": [0.5],
             "offset": [0]}
    enc = {"version": "1.0.0", "param_encodings": [], "activation_encodings": [entry, dict(entry), dict(entry, name="b")]}
    assert check_encodings(enc, {}, source="x") == ["x: activation_encodings names 'a' more than once"]


def test_an_activations_problem_names_the_activation():
    enc = {"version": "1.0.0", "param_encodings": [], "activation_encodings": [
        {"name": "a", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False, "scale": [0.0],
         "offset": [0]}]}
    assert check_encodings(enc, {}, source="x") == ["x: activation a[0]: scale 0.0 is not a positive number"]


# --- the grid: scale, offset, symmetry ------------------------------------------------------------------------

def test_a_zero_scale_is_reported_once_not_as_a_min_max_disagreement_too():
    enc = v0_file([v0_channel(scale=0.0, offset=-2, min=-1.0, max=1.0)])
    assert check_encodings(enc, {"w": (1, 4)}) == ["encodings: w[0]: scale 0.0 is not a positive number"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("bw", [4, 8, 16])
def test_an_asymmetric_grid_has_offsets_from_one_minus_2_to_the_bw_up_to_0(version, bw):
    """offset = round(min / scale) with min <= 0 <= max and scale = (max - min) / (2^bw - 1), so an asymmetric
    grid's offset lies in [-(2^bw - 1), 0]: the bounds are accepted, one step beyond either is not."""
    def problems(offset):
        if version == "0.6.1":
            enc = v0_file([v0_channel(bitwidth=bw, offset=offset, min=offset * 0.5,
                                      max=(offset + 2**bw - 1) * 0.5)])
        else:
            enc = v1_file(bw=bw, offset=[offset])
        return check_encodings(enc, {"w": (1, 4)})

    assert problems(0) == [] and problems(-(2**bw - 1)) == []
    for offset in (1, -(2**bw)):
        assert problems(offset) == [f"encodings: w[0]: offset {offset} is outside [{-(2**bw - 1)}, 0] for bitwidth {bw}"]


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


def test_a_symmetric_encoding_off_its_grid_says_which_offsets_are_allowed():
    """For bitwidth 8 a symmetric grid sits at offset -2^7 = -128 (signed) or 0 (unsigned)."""
    off_grid = v1_file(is_sym=True, offset=[-5], scale=[0.5])
    problems = check_encodings(off_grid, {"w": (1, 4)})
    assert problems == ["encodings: w[0]: symmetric encoding with offset -5, expected -128 or 0"]


# --- 0.6.1 min/max: redundant with scale and offset, rounded by AIMET -----------------------------------------

def test_min_and_max_exactly_one_step_off_the_grid_are_within_aimets_rounding():
    """AIMET rounds min/max to the grid: up to one step (= scale) away is accepted, on either end."""
    for shifted in ({"min": -1.0 - 0.5}, {"max": 126.5 + 0.5}):
        assert check_encodings(v0_file([v0_channel(**shifted)]), {"w": (1, 4)}) == []
    beyond = v0_file([v0_channel(min=-1.0 - 0.5 - 0.25)])
    assert check_encodings(beyond, {"w": (1, 4)}) == [
        "encodings: w[0]: min/max -1.75/126.5 disagree with scale and offset, which give -1/126.5"]


@pytest.mark.parametrize("absent", [("min", "max"), ("min",), ("max",)])
def test_min_and_max_are_checked_only_where_a_0_6_1_channel_has_both(absent):
    """min/max are redundant with scale and offset; a channel that lacks either is checked on its grid alone."""
    enc = v0_file([v0_channel(**{key: None for key in absent})])
    assert check_encodings(enc, {"w": (1, 4)}) == []


# --- dtype: float entries have no grid; a missing dtype is an integer grid ------------------------------------

def test_a_0_6_1_float_channel_has_no_grid_to_check():
    """AIMET writes an unquantized tensor as {"bitwidth": 16, "dtype": "float"}: no scale or offset to check."""
    enc = {"version": "0.6.1", "param_encodings": {}, "activation_encodings": {"x": [{"bitwidth": 16,
                                                                                      "dtype": "float"}]}}
    assert check_encodings(enc, {}) == []


def test_a_1_0_0_float_entry_has_no_grid_to_check():
    enc = {"version": "1.0.0", "param_encodings": [], "activation_encodings": [
        {"name": "x", "bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "is_sym": False}]}
    assert check_encodings(enc, {}) == []


def test_a_0_6_1_channel_without_dtype_is_an_integer_grid_and_checked():
    enc = v0_file([v0_channel(dtype=None, offset=3, min=1.5, max=129.0)])
    assert check_encodings(enc, {"w": (1, 4)}) == ["encodings: w[0]: offset 3 is outside [-255, 0] for bitwidth 8"]


def test_a_1_0_0_entry_without_dtype_is_reported_and_its_grid_still_checked():
    enc = v1_file(dtype=None, offset=[3])
    assert check_encodings(enc, {"w": (1, 4)}) == [
        "encodings: w: has no dtype (a 1.0.0 entry says INT or FLOAT)",
        "encodings: w[0]: offset 3 is outside [-255, 0] for bitwidth 8"]


# --- a malformed section is refused, naming the source --------------------------------------------------------

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
