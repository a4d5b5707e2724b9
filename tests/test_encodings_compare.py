"""Comparing two calibrations (REFERENCE section 9): what ``compare_encodings`` calls the same encoding.

Proves, on real AIMET exports and hand-made files of both formats: a recalibration one grid step away, or with a
scale within the relative tolerance (inclusive), is the same encoding; two steps away, a scale off by 1e-3, a
missing name, another bitwidth, dtype, symmetry, enc_type, block size or channel count is a different one, each
difference reported, naming the entry and the field, in order; fields a format leaves out mean their defaults;
the two formats of one calibration compare equal; what cannot be compared is refused, naming the source.
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
    golden,
    lpbq_file,
    params,
    v0_channel,
    v0_file,
    v1_file,
)
from pasd_verify.encodings import EncodingsError, convert_version
from pasd_verify.encodings_check import compare_encodings


# --- a recalibration on another CPU: within one grid step and the scale tolerance -----------------------------

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


def test_scales_exactly_at_the_tolerance_are_the_same():
    """The tolerance is inclusive: |a - b| <= rtol * max(|a|, |b|). With rtol 0.5, scales 1.0 and 0.5 sit on it
    (exactly, in binary floating point); 0.4999 is past it."""
    a = v1_file(scale=[1.0, 1.0], offset=[0, 0])
    assert compare_encodings(a, v1_file(scale=[1.0, 0.5], offset=[0, 0]), scale_rtol=0.5) == []
    assert compare_encodings(a, v1_file(scale=[1.0, 0.4999], offset=[0, 0]), scale_rtol=0.5) == [
        "encodings: param_encodings['w'][1]: scales 1.0 and 0.4999 differ by more than 0.5 relative"]


def test_0_6_1_min_and_max_are_compared_only_where_both_files_have_them():
    """A 0.6.1 file may leave min/max out (they follow from scale and offset); each is compared on its own
    where both sides have it, and a grid step exactly is still within one step."""
    full = v0_file([v0_channel()])
    assert compare_encodings(full, v0_file([v0_channel(min=None, max=None)])) == []
    no_min_moved_max = v0_file([v0_channel(min=None, max=125.0)])
    assert compare_encodings(full, no_min_moved_max) == [
        "encodings: param_encodings['w'][0]: max 126.5 and 125.0 are more than 1 grid step(s) apart"]
    one_step = v0_file([v0_channel(min=-0.5)])  # scale 0.5: one grid step exactly, and no scale tolerance
    assert compare_encodings(full, one_step, scale_rtol=0.0) == []


# --- every other difference is a different encoding, named ----------------------------------------------------

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


@pytest.mark.parametrize("field, value, problem", [
    ("is_symmetric", "True", "sym False != True"),
    ("dtype", "float", "dtype 'int' != 'float'"),
    ("bitwidth", 16, "bw 8 != 16"),
    ("min", 0.5, "min -1.0 and 0.5 are more than 1 grid step(s) apart"),  # 3 steps of 0.5 away, max unmoved
    ("max", 125.0, "max 126.5 and 125.0 are more than 1 grid step(s) apart"),
])
def test_compare_names_the_one_field_a_0_6_1_channel_differs_in(field, value, problem):
    a, b = v0_file([v0_channel()]), v0_file([v0_channel(**{field: value})])
    assert compare_encodings(a, b) == [f"encodings: param_encodings['w'][0]: {problem}"]


@pytest.mark.parametrize("field, value, problem", [
    ("bw", 16, "bw 8 != 16"),
    ("dtype", "FLOAT", "dtype 'int' != 'float'"),
    ("is_sym", True, "sym False != True"),
    ("enc_type", "LPBQ", "enc_type 'PER_CHANNEL' != 'LPBQ'"),
    ("block_size", 64, "block_size None != 64"),
])
def test_compare_names_the_one_field_a_1_0_0_entry_differs_in(field, value, problem):
    assert compare_encodings(v1_file(), v1_file(**{field: value})) == [
        f"encodings: param_encodings['w'][0]: {problem}"]


def test_compare_reports_every_difference_of_every_entry_in_order():
    a = {"version": "0.6.1", "activation_encodings": {}, "param_encodings": {
        "w1": [v0_channel(), v0_channel()], "w2": [v0_channel()], "w0": [v0_channel()]}}
    b = {"version": "0.6.1", "activation_encodings": {}, "param_encodings": {
        "w1": [v0_channel()], "w2": [v0_channel(bitwidth=4)], "w3": [v0_channel()]}}
    assert compare_encodings(a, b, source="pair") == [
        "pair: param_encodings['w0'] is only in the first",
        "pair: param_encodings['w3'] is only in the second",
        "pair: param_encodings['w1']: 2 channel(s) != 1",
        "pair: param_encodings['w2'][0]: bw 8 != 4",
    ]


# --- what a field left out means; the two formats of one calibration ------------------------------------------

def test_absent_0_6_1_dtype_and_symmetry_mean_int_and_asymmetric():
    """AIMET leaves dtype and is_symmetric out of older 0.6.1 files: they read as int and not symmetric."""
    bare = v0_file([v0_channel(dtype=None, is_symmetric=None)])
    assert compare_encodings(bare, v0_file([v0_channel()])) == []
    assert compare_encodings(bare, v0_file([v0_channel(is_symmetric="True")])) != []
    v1 = convert_version(bare, "1.0.0")["param_encodings"][0]
    assert (v1["dtype"], v1["is_sym"], v1["scale"], v1["offset"]) == ("INT", False, [0.5], [-2])


def test_an_absent_1_0_0_dtype_means_int():
    assert compare_encodings(v1_file(dtype=None), v1_file()) == []
    assert compare_encodings(v1_file(dtype=None), v1_file(dtype="FLOAT")) != []


def test_the_two_formats_of_one_calibration_hold_the_same_parameter_encodings():
    # (AIMET's 1.0.0 export also names a few Constant outputs its 0.6.1 export leaves out, so only parameters)
    for form in ("mha", "sha"):
        for weights in WEIGHTS:
            assert compare_encodings(golden(form, weights, "0.6.1"), golden(form, weights, "1.0.0"),
                                     sections=("param_encodings",)) == []


# --- what cannot be compared is refused, naming the source ----------------------------------------------------

def test_comparing_across_formats_names_the_source_of_what_cannot_convert():
    lpbq = lpbq_file()
    with pytest.raises(EncodingsError) as info:
        compare_encodings(v0_file([v0_channel()]), lpbq, source="pair.encodings")
    assert str(info.value) == "pair.encodings: param_encodings['w']: LPBQ encodings have no 0.6.1 form"


@pytest.mark.parametrize("side", ["first", "second"])
def test_compare_names_the_source_of_a_malformed_section(side):
    good, bad = v1_file(), dict(v1_file(), param_encodings={"w": []})
    pair = (bad, good) if side == "first" else (good, bad)
    with pytest.raises(EncodingsError) as info:
        compare_encodings(*pair, source="pair")
    assert str(info.value) == "pair: param_encodings must be a list in version 1.0.0"
