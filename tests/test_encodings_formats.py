"""AIMET encodings files, 0.6.1 and 1.0.0: reading, writing, refusing what is malformed, converting between them.

Proves: AIMET's own files read and write back byte-identical, with sorted keys and AIMET's indentation, and
dumping then parsing is stable; every 1.0.0 kind AIMET writes (per-tensor, per-channel, PER_BLOCK, LPBQ, float)
parses; anything malformed (random JSON, a truncated file, a field of the wrong type, a duplicate key, an unknown
version) raises ``EncodingsError`` naming the source and the key; ``convert_version`` turns AIMET's 0.6.1 export
into exactly its 1.0.0 export and back (min/max to float32 rounding), keeps what it passes through without
sharing structure, and refuses, naming the entry, what the other format cannot hold.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from encodings_helpers import (
    GOLDEN,
    VERSIONS,
    WEIGHTS,
    close,
    containers,
    golden,
    lpbq_file,
    params,
    per_block_entry,
    v0_channel,
    v0_file,
)
from pasd_verify.encodings import (
    ADAROUND,
    ADAROUND_FLAT,
    EncodingsError,
    convert_version,
    dumps_encodings,
    load_encodings,
    load_encodings_layout,
    parse_encodings,
    save_encodings,
)
from strategies import per_channel_encodings


# --- writing as AIMET writes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("form", ["mha", "sha"])
def test_aimet_files_read_and_write_back_byte_identical(form, version, tmp_path):
    path = GOLDEN / f"unet_tiny_{form}_per_channel_{version}.encodings"
    save_encodings(load_encodings(path), tmp_path / "out.encodings")
    assert (tmp_path / "out.encodings").read_bytes() == path.read_bytes()


def test_encodings_are_written_with_sorted_keys_as_aimet_writes_them():
    text = dumps_encodings({"version": "1.0.0", "param_encodings": [{"name": "w", "bw": 8}],
                            "activation_encodings": []})
    objects = []
    json.loads(text, object_pairs_hook=lambda pairs: objects.append([k for k, _ in pairs]) or dict(pairs))
    assert objects and all(keys == sorted(keys) for keys in objects)
    assert text.startswith('{\n    "activation_encodings"')  # indented by 4, as AIMET's files are


# --- AdaRound's unversioned files --------------------------------------------------------------------------------

def _adaround_texts(weights: str) -> dict[str, str]:
    """A golden MHA file's parameter encodings as AIMET's AdaRound writes them (``json.dump(..., sort_keys=True,
    indent=4)``): wrapped in ``param_encodings`` (AIMET >= 1.32) and bare (before it)."""
    body = golden("mha", weights, "0.6.1")["param_encodings"]
    return {ADAROUND: json.dumps({"param_encodings": body}, sort_keys=True, indent=4),
            ADAROUND_FLAT: json.dumps(body, sort_keys=True, indent=4)}


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("layout", [ADAROUND, ADAROUND_FLAT])
def test_adaround_files_read_as_their_parameter_encodings_and_write_back_byte_identical(layout, weights, tmp_path):
    text = _adaround_texts(weights)[layout]
    path = tmp_path / "adaround.encodings"
    path.write_text(text)
    encodings, read_layout = load_encodings_layout(path)
    assert read_layout == layout
    assert encodings["param_encodings"] == golden("mha", weights, "0.6.1")["param_encodings"]
    assert encodings["activation_encodings"] == {}
    save_encodings(encodings, tmp_path / "out.encodings", layout)
    assert (tmp_path / "out.encodings").read_text() == text


@pytest.mark.parametrize("layout", [ADAROUND, ADAROUND_FLAT])
def test_a_1_0_0_file_written_in_an_adaround_layout_holds_its_0_6_1_parameter_encodings(layout):
    parameters_only = {**golden("mha", "per_channel", "1.0.0"), "activation_encodings": []}
    written = json.loads(dumps_encodings(parameters_only, layout))
    expected = golden("mha", "per_channel", "0.6.1")["param_encodings"]
    assert close(written["param_encodings"] if layout == ADAROUND else written, expected)


@pytest.mark.parametrize("layout", [ADAROUND, ADAROUND_FLAT])
def test_activation_encodings_are_not_silently_dropped_in_an_adaround_layout(layout):
    for version in VERSIONS:
        with pytest.raises(EncodingsError) as info:
            dumps_encodings(golden("mha", "per_channel", version), layout)
        assert str(info.value) == (f"the {layout} layout holds parameter encodings only; these encodings have "
                                   "activation encodings too (write them as 0.6.1 or 1.0.0)")


_NOT_ADAROUND = ("version None is not one of ('0.6.1', '1.0.0'), and the file is not AIMET AdaRound's unversioned "
                 "layout either (an object of parameter name -> list of encodings)")


@pytest.mark.parametrize("text, words", [
    ("{}", _NOT_ADAROUND),
    ('{"param_encodings": {}, "quantizer_args": {}}',
     "no 'version', and not AIMET AdaRound's layout either (top-level keys ['param_encodings', 'quantizer_args']; "
     "AdaRound writes only an object 'param_encodings'); expected a version of ('0.6.1', '1.0.0')"),
    ('{"param_encodings": []}',
     "no 'version', and not AIMET AdaRound's layout either (top-level keys ['param_encodings']; "
     "AdaRound writes only an object 'param_encodings'); expected a version of ('0.6.1', '1.0.0')"),
    ('{"activation_encodings": []}', _NOT_ADAROUND),
    ('{"w": [{"bitwidth": 8, "scale": 1, "offset": 0}], "x": 5}', _NOT_ADAROUND),
    ('{"w": [{"bitwidth": 8, "scale": 1}]}', "param_encodings['w']: field 'offset' must be a finite number, got None"),
])
def test_an_unversioned_file_that_is_not_adarounds_is_refused_naming_it(text, words):
    with pytest.raises(EncodingsError) as info:
        parse_encodings(text, "u.encodings")
    assert str(info.value) == f"u.encodings: {words}"


def _sorted_at_every_level(text: str) -> bool:
    objects = []
    json.loads(text, object_pairs_hook=lambda pairs: objects.append([k for k, _ in pairs]) or dict(pairs))
    return bool(objects) and all(keys == sorted(keys) for keys in objects)


def _reversed_keys(value):
    """The same JSON value with every object's keys in reverse order: what a writer must sort again."""
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


@pytest.mark.parametrize("layout", ["1.0.0", ADAROUND, ADAROUND_FLAT])
def test_a_0_6_1_file_written_in_another_layout_is_aimets_own_text_of_it(layout):
    """Written in another layout, parameter encodings are what AIMET's own file of that layout holds (its 1.0.0 export,
    or the 0.6.1 entries AdaRound writes), with sorted keys and an indent of 4 as AIMET writes them, whatever the
    order they came in."""
    parameters_only = _reversed_keys({**golden("mha", "per_channel", "0.6.1"), "activation_encodings": {}})
    text = dumps_encodings(parameters_only, layout)
    assert _sorted_at_every_level(text) and text.startswith("{\n    \"")
    written = json.loads(text)
    if layout == "1.0.0":
        assert params(written) == params(golden("mha", "per_channel", "1.0.0"))
    else:
        expected = golden("mha", "per_channel", "0.6.1")["param_encodings"]
        assert (written["param_encodings"] if layout == ADAROUND else written) == expected


def test_an_unknown_layout_is_named():
    with pytest.raises(EncodingsError) as info:
        dumps_encodings(golden("mha", "per_channel", "0.6.1"), "2.0")
    assert str(info.value) == ("layout '2.0' is not one of ('0.6.1', '1.0.0', 'adaround', 'adaround-flat')")


@given(case=per_channel_encodings(), version=st.sampled_from(VERSIONS))
def test_dumps_parse_is_byte_stable(case, version):
    _, _, entry = case
    v = "0.6.1" if isinstance(entry, list) else "1.0.0"
    body = {"w": entry} if v == "0.6.1" else [entry]
    encodings = {"version": v, "param_encodings": body, "activation_encodings": {} if v == "0.6.1" else [],
                 "excluded_layers": [], "quantizer_args": {"activation_bitwidth": 16}}
    text = dumps_encodings(encodings)
    assert parse_encodings(text) == encodings
    assert dumps_encodings(parse_encodings(text)) == text


def test_per_block_lpbq_and_float_entries_are_well_formed_1_0_0():
    """The 1.0.0 kinds AIMET writes beside per-tensor and per-channel ones parse: per-block and LPBQ grids, and
    float entries, which have no grid (no scale or offset)."""
    encodings = {"version": "1.0.0", "param_encodings": [per_block_entry("PER_BLOCK", range(2), 2, "a"),
                                                         per_block_entry("LPBQ", range(2), 2, "b")],
                 "activation_encodings": [{"name": "x", "bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR",
                                           "is_sym": False}]}
    assert parse_encodings(dumps_encodings(encodings)) == encodings


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


@pytest.mark.parametrize("text, words", [
    ('{"version": "1.0.0", "x": ' + "9" * 5000 + "}", "unreadable JSON: Exceeds the limit"),
    ("[" * 100_000 + "]" * 100_000, "unreadable JSON: maximum recursion depth exceeded"),
])
def test_json_python_cannot_hold_is_refused_not_raised(text, words):
    with pytest.raises(EncodingsError) as info:
        parse_encodings(text, "big.encodings")
    assert str(info.value).startswith(f"big.encodings: {words}")


def test_unknown_version_is_named():
    with pytest.raises(EncodingsError, match=r"v.encodings: version '9.9' is not one of"):
        parse_encodings(json.dumps({"version": "9.9", "param_encodings": {}, "activation_encodings": {}}), "v.encodings")


def test_duplicate_json_key_is_refused():
    text = '{"version": "0.6.1", "param_encodings": {"a": [], "a": []}, "activation_encodings": {}}'
    with pytest.raises(EncodingsError, match="duplicate key 'a'"):
        parse_encodings(text, "dup.encodings")


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
     "param_encodings['w']: field 'scale' must be a finite number, got 'x'"),
    (_V0.format('[{"bitwidth": 8, "scale": 1, "offset": 0}, {"bitwidth": 8, "scale": 1, "offset": Infinity}]'),
     "param_encodings['w'][1]: field 'offset' must be a finite number, got inf"),
    (_V0.format('[{"bitwidth": 8, "scale": 1, "offset": 0, "min": NaN, "max": 1}]'),
     "param_encodings['w']: field 'min' must be a finite number, got nan"),
    (_V0.format('[{"bitwidth": 8, "scale": 1, "offset": 0, "min": 0, "max": true}]'),
     "param_encodings['w']: field 'max' must be a finite number, got True"),
    (_V0.format('[{"bitwidth": 33, "scale": 1, "offset": 0}]'),
     "param_encodings['w']: field 'bitwidth' is 33, outside 1-32"),
    (_V0.format('[{"bitwidth": 8.0, "scale": 1, "offset": 0}]'),
     "param_encodings['w']: field 'bitwidth' must be a finite integer, got 8.0"),
    (_V0.format('[{"bitwidth": 8, "scale": 1, "offset": 0, "is_symmetric": "maybe"}]'),
     "param_encodings['w']: field 'is_symmetric' must be \"True\" or \"False\", got 'maybe'"),
    (_V1.format('{' + _W1.replace('"bw": 8', '"bw": 100000000000000000000') + ', "scale": [1], "offset": [0]}'),
     "param_encodings['w']: field 'bw' is 100000000000000000000, outside 1-32"),
    (_V1.format('{' + _W1.replace('"bw": 8', '"bw": 0') + ', "scale": [1], "offset": [0]}'),
     "param_encodings['w']: field 'bw' is 0, outside 1-32"),
    (_V1.format('{' + _W1.replace('false', '"yes"') + ', "scale": [1], "offset": [0]}'),
     "param_encodings['w']: field 'is_sym' must be true or false, got 'yes'"),
    (_V1.format('{' + _W1 + ', "scale": [1, NaN], "offset": [0, 0]}'),
     "param_encodings['w']: field 'scale[1]' must be a finite number, got nan"),
    (_V1.format('{' + _W1 + ', "scale": [1], "offset": [-1e400]}'),
     "param_encodings['w']: field 'offset[0]' must be a finite number, got -inf"),
    (_V1.format('{"name": "w", "enc_type": "PER_TENSOR"}'), "param_encodings['w']: missing field 'bw'"),
    (_V1.format('{"name": "w", "bw": 8, "enc_type": "PER_ROW"}'), "param_encodings['w']: unknown enc_type 'PER_ROW'"),
    (_V1.format('{' + _W1 + ', "scale": [], "offset": []}'),
     "param_encodings['w']: field 'scale' must be a non-empty list of numbers"),
    (_V1.format('{' + _W1 + ', "scale": ["x"], "offset": [0]}'),
     "param_encodings['w']: field 'scale[0]' must be a finite number, got 'x'"),
    (_V1.format('{"name": "w", "bw": 8, "enc_type": "PER_CHANNEL", "scale": ["x"], "offset": [0]}'),  # no dtype: INT
     "param_encodings['w']: field 'scale[0]' must be a finite number, got 'x'"),
    (_V1.format('{' + _W1 + ', "scale": 0.5, "offset": [0]}'),
     "param_encodings['w']: field 'scale' must be a non-empty list of numbers"),
    (_V1.format('{' + _W1 + ', "scale": [0.5, 0.5], "offset": [0]}'), "param_encodings['w']: 2 scales but 1 offsets"),
]


@pytest.mark.parametrize("source", [None, "f.encodings"])  # None: the default label, "encodings"
@pytest.mark.parametrize("text, words", _REFUSALS)
def test_every_malformed_file_is_refused_naming_the_source_and_the_key(text, words, source):
    with pytest.raises(EncodingsError) as info:
        parse_encodings(text, **({} if source is None else {"source": source}))
    assert str(info.value) == f"{source or 'encodings'}: {words}"


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


def test_load_names_a_missing_or_binary_file(tmp_path):
    missing, binary = tmp_path / "none.encodings", tmp_path / "binary.encodings"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(EncodingsError) as info:
        load_encodings(missing)
    assert str(info.value) == f"{missing}: no such encodings file"
    with pytest.raises(EncodingsError) as info:
        load_encodings(binary)
    assert str(info.value).startswith(f"{binary}: not a text file (")


# --- between formats: AIMET's 0.6.1 and 1.0.0 exports of one calibration --------------------------------------

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


def test_float_encodings_convert_between_formats_as_aimet_writes_them():
    """AIMET writes a float (unquantized, e.g. fp16) tensor as {"bitwidth", "dtype": "float"} in 0.6.1 and as
    {"bw", "dtype": "FLOAT", "enc_type", "is_sym", "name"} without scale or offset in 1.0.0."""
    v1 = {"version": "1.0.0", "param_encodings": [],
          "activation_encodings": [{"bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "is_sym": False,
                                    "name": "x"}]}
    v0 = convert_version(v1, "0.6.1")
    assert v0["activation_encodings"] == {"x": [{"bitwidth": 16, "dtype": "float"}]}
    assert convert_version(v0, "1.0.0") == v1


def test_a_1_0_0_entry_without_dtype_converts_as_the_integer_grid_it_holds():
    """dtype is required in 1.0.0 and check_encodings reports an entry without it; converting such an entry keeps
    the scale and offset it carries (only an integer grid has them) rather than turning it into a bare float."""
    enc = copy.deepcopy(golden("sha", "per_channel", "1.0.0"))
    entry = enc["param_encodings"][0]
    del entry["dtype"]
    v0 = convert_version(enc, "0.6.1")["param_encodings"][entry["name"]]
    assert [c["dtype"] for c in v0] == ["int"] * len(entry["scale"])
    assert [(c["scale"], c["offset"]) for c in v0] == list(zip(entry["scale"], entry["offset"]))


@pytest.mark.parametrize("version", VERSIONS)
def test_convert_version_copies_everything_it_passes_through(version):
    """To its own version: an equal copy. To the other: top-level keys besides the sections come through equal,
    nested ones included, and share nothing with the input."""
    source = copy.deepcopy(golden("mha", "per_channel", version))
    source["tool"] = {"name": "aimet", "options": [{"seed": 0}]}
    same = convert_version(source, version)
    assert same == source and not containers(source).keys() & containers(same).keys()
    other = convert_version(source, "1.0.0" if version == "0.6.1" else "0.6.1")
    assert other["tool"] == source["tool"]
    assert not containers(source).keys() & containers(other).keys()


# --- what the other format cannot hold is refused, naming the entry -------------------------------------------

def test_per_block_encodings_have_no_0_6_1_form():
    enc = golden("mha", "per_channel", "1.0.0")
    enc["param_encodings"][0]["enc_type"] = "PER_BLOCK"
    with pytest.raises(EncodingsError, match="PER_BLOCK encodings have no 0.6.1 form"):
        convert_version(enc, "0.6.1")


@pytest.mark.parametrize("field, value", [("bitwidth", 16), ("dtype", "float")])
def test_0_6_1_channels_that_differ_in_bitwidth_or_dtype_have_no_1_0_0_form(field, value):
    mixed = v0_file([v0_channel(), v0_channel(**{field: value})])
    with pytest.raises(EncodingsError) as info:
        convert_version(mixed, "1.0.0")
    assert str(info.value) == ("encodings: param_encodings['w']: channels with different bitwidths or dtypes have "
                               "no 1.0.0 form")


def test_convert_version_errors_name_the_source_and_the_entry():
    per_block = lpbq_file()
    with pytest.raises(EncodingsError) as info:
        convert_version(per_block, "0.6.1")
    assert str(info.value) == "encodings: param_encodings['w']: LPBQ encodings have no 0.6.1 form"
    with pytest.raises(EncodingsError) as info:
        convert_version({"version": "1.0.0", "param_encodings": {}, "activation_encodings": []}, "0.6.1")
    assert str(info.value) == "encodings: param_encodings must be a list in version 1.0.0"
    with pytest.raises(EncodingsError) as info:
        convert_version(per_block, "2.0.0")
    assert str(info.value) == "version '2.0.0' is not one of ('0.6.1', '1.0.0')"
