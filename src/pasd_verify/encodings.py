"""AIMET quantization encodings: read and write formats 0.6.1 and 1.0.0, rewrite MHA <-> SHA (checks: encodings_check).

Format 0.6.1 keys tensors by name: ``{"param_encodings": {name: [enc per channel, ...]}, "activation_encodings":
{name: [enc]}}``. Format 1.0.0 lists named entries: ``{"param_encodings": [{"name", "enc_type", "scale": [...],
"offset": [...], ...}], ...}``. Every other top-level key (``excluded_layers``, ``quantizer_args``, ...) passes
through untouched.

The MHA -> SHA rewrite is driven by the module rewrite's name map: per-channel parameter encodings are split into
per-head chunks (they describe one output channel each), per-tensor ones are copied to every head, and the MHA
entries are removed. Activation encodings of the q/k/v projections are copied to every head's conv, under the
names AIMET gives the SHA graph's tensors.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PasdVerifyError
from .io import atomic_path
from .name_map import NameMap

SUPPORTED_VERSIONS = ("0.6.1", "1.0.0")


class EncodingsError(PasdVerifyError):
    """An encodings file is malformed, of an unknown version, or does not fit the model or the name map."""


# --- reading and writing ------------------------------------------------------------------------------------

def _no_duplicate_keys(source: str):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise EncodingsError(f"{source}: duplicate key {key!r}")
            seen.add(key)
        return dict(pairs)
    return hook


# The layouts a file can come in. Besides the two versioned formats, AIMET's AdaRound writes its parameter
# encodings without a version, in the 0.6.1 entry form: since AIMET 1.32 as ``{"param_encodings": {name: [...]}}``
# (aimet-torch 2.42's ``Adaround._export_encodings_to_json``), before it as the bare object ``{name: [...]}``. Both
# are what ``QuantizationSimModel.set_and_freeze_param_encodings`` reads back, so a rewrite of such a file is written
# in the layout it came in.
ADAROUND = "adaround"
ADAROUND_FLAT = "adaround-flat"
LAYOUTS = (*SUPPORTED_VERSIONS, ADAROUND, ADAROUND_FLAT)
_ADAROUND_KEYS = {"param_encodings", "activation_encodings"}


def encodings_layout(raw: dict[str, Any], source: str) -> str:
    """Which of :data:`LAYOUTS` a parsed encodings JSON object is in, read from its content."""
    if "version" in raw:
        if raw["version"] not in SUPPORTED_VERSIONS:
            raise EncodingsError(f"{source}: version {raw['version']!r} is not one of {SUPPORTED_VERSIONS}")
        return raw["version"]
    if "param_encodings" in raw:
        if set(raw) - _ADAROUND_KEYS or not isinstance(raw["param_encodings"], dict):
            raise EncodingsError(f"{source}: no 'version', and not AIMET AdaRound's layout either "
                                 f"(top-level keys {sorted(raw)}; AdaRound writes only an object 'param_encodings'); "
                                 f"expected a version of {SUPPORTED_VERSIONS}")
        return ADAROUND
    if raw and not set(raw) & _ADAROUND_KEYS and all(isinstance(v, list) for v in raw.values()):
        return ADAROUND_FLAT
    raise EncodingsError(f"{source}: version None is not one of {SUPPORTED_VERSIONS}, and the file is not AIMET "
                         "AdaRound's unversioned layout either (an object of parameter name -> list of encodings)")


def _versioned(raw: dict[str, Any], layout: str) -> dict[str, Any]:
    """The encodings of any layout as a versioned (0.6.1 or 1.0.0) dict; an AdaRound file has no activations."""
    if layout in SUPPORTED_VERSIONS:
        return raw
    if layout == ADAROUND:
        return {"version": "0.6.1", "activation_encodings": {}, **raw}
    return {"version": "0.6.1", "activation_encodings": {}, "param_encodings": raw}


def parse_encodings(text: str, source: str = "encodings") -> dict[str, Any]:
    """Parse and check the structure of AIMET encodings JSON in any of :data:`LAYOUTS`, as a versioned dict; errors
    name ``source`` and the offending key."""
    return parse_encodings_layout(text, source)[0]


def parse_encodings_layout(text: str, source: str) -> tuple[dict[str, Any], str]:
    """:func:`parse_encodings` and the layout the text was in."""
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicate_keys(source))
    except json.JSONDecodeError as e:
        raise EncodingsError(f"{source}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; nesting deeper than Python's stack
        raise EncodingsError(f"{source}: unreadable JSON: {e}") from e
    if not isinstance(raw, dict):
        raise EncodingsError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    layout = encodings_layout(raw, source)
    encodings = _versioned(raw, layout)
    version = encodings["version"]
    for section in ("param_encodings", "activation_encodings"):
        if section not in encodings:
            raise EncodingsError(f"{source}: missing {section!r}")
        for name, entry in _entries(encodings, section, source):
            _check_entry_shape(entry, version, f"{source}: {section}[{name!r}]")
    return encodings, layout


def load_encodings(path: str | os.PathLike) -> dict[str, Any]:
    """Read an AIMET encodings file of format 0.6.1 or 1.0.0, or an AdaRound file (as 0.6.1)."""
    return load_encodings_layout(path)[0]


def load_encodings_layout(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """:func:`load_encodings` and the layout the file was in (one of :data:`LAYOUTS`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise EncodingsError(f"{path}: no such encodings file") from e
    except UnicodeDecodeError as e:
        raise EncodingsError(f"{path}: not a text file ({e.reason})") from e
    return parse_encodings_layout(text, str(path))


def dumps_encodings(encodings: dict[str, Any], layout: str | None = None) -> str:
    """AIMET's own layout (sorted keys, indent 4), so a file AIMET wrote reads back and writes out byte-identical;
    ``layout`` (default: the encodings' version) one of :data:`LAYOUTS`. An AdaRound layout holds parameter
    encodings only: encodings with activations are refused rather than written without them."""
    if layout is None or layout == encodings["version"]:
        return json.dumps(encodings, sort_keys=True, indent=4)
    if layout in SUPPORTED_VERSIONS:
        return json.dumps(convert_version(encodings, layout), sort_keys=True, indent=4)
    if layout not in LAYOUTS:
        raise EncodingsError(f"layout {layout!r} is not one of {LAYOUTS}")
    if encodings["activation_encodings"]:  # {} in 0.6.1, [] in 1.0.0 where there are none
        raise EncodingsError(f"the {layout} layout holds parameter encodings only; these encodings have activation "
                             "encodings too (write them as 0.6.1 or 1.0.0)")
    params = convert_version(encodings, "0.6.1")["param_encodings"]
    return json.dumps({"param_encodings": params} if layout == ADAROUND else params, sort_keys=True, indent=4)


def save_encodings(encodings: dict[str, Any], path: str | os.PathLike, layout: str | None = None) -> None:
    """Write encodings atomically, in ``layout`` (default: their version; see :func:`dumps_encodings`)."""
    text = dumps_encodings(encodings, layout)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _entries(encodings: dict, section: str, source: str) -> Iterator[tuple[str, Any]]:
    """(name, entry) pairs of a section in either format; an entry is a list of per-channel dicts (0.6.1) or one
    dict (1.0.0)."""
    body = encodings[section]
    if encodings["version"] == "0.6.1":
        if not isinstance(body, dict):
            raise EncodingsError(f"{source}: {section} must be an object in version 0.6.1")
        yield from body.items()
        return
    if not isinstance(body, list):
        raise EncodingsError(f"{source}: {section} must be a list in version 1.0.0")
    for i, entry in enumerate(body):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise EncodingsError(f"{source}: {section}[{i}] has no string 'name'")
        yield entry["name"], entry


MAX_BITWIDTH = 32  # AIMET's widest integer grid; every number read from a file is range-checked before it is used


def _check_number(value: Any, key: str, where: str, *, integer: bool = False) -> None:
    """A finite number (an integer when ``integer``), never a bool: JSON's NaN, Infinity and 1e400 are refused
    here, before any arithmetic sees them."""
    kinds = int if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise EncodingsError(f"{where}: field {key!r} must be a finite {'integer' if integer else 'number'}, "
                             f"got {value!r}")


def _check_bitwidth(value: Any, key: str, where: str) -> None:
    _check_number(value, key, where, integer=True)
    if not 1 <= value <= MAX_BITWIDTH:
        raise EncodingsError(f"{where}: field {key!r} is {value}, outside 1-{MAX_BITWIDTH}")


def _check_entry_shape(entry: Any, version: str, where: str) -> None:
    if version == "0.6.1":
        if not isinstance(entry, list) or not entry or not all(isinstance(e, dict) for e in entry):
            raise EncodingsError(f"{where}: expected a non-empty list of encodings")
        for c, e in enumerate(entry):
            at = f"{where}[{c}]" if len(entry) > 1 else where
            _check_bitwidth(e.get("bitwidth"), "bitwidth", at)
            for key in ("scale", "offset") + tuple(k for k in ("min", "max") if k in e):
                _check_number(e.get(key), key, at)
            if "is_symmetric" in e and e["is_symmetric"] not in ("True", "False", True, False):
                raise EncodingsError(f"{at}: field 'is_symmetric' must be \"True\" or \"False\", "
                                     f"got {e['is_symmetric']!r}")
        return
    for key in ("enc_type", "bw"):
        if key not in entry:
            raise EncodingsError(f"{where}: missing field {key!r}")
    _check_bitwidth(entry["bw"], "bw", where)
    if entry["enc_type"] not in ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK", "LPBQ"):
        raise EncodingsError(f"{where}: unknown enc_type {entry['enc_type']!r}")
    if "is_sym" in entry and not isinstance(entry["is_sym"], bool):
        raise EncodingsError(f"{where}: field 'is_sym' must be true or false, got {entry['is_sym']!r}")
    if entry.get("dtype", "INT") == "INT":
        for key in ("scale", "offset"):
            values = entry.get(key)
            if not isinstance(values, list) or not values:
                raise EncodingsError(f"{where}: field {key!r} must be a non-empty list of numbers")
            for c, value in enumerate(values):
                _check_number(value, f"{key}[{c}]", where)
        if len(entry["scale"]) != len(entry["offset"]):
            raise EncodingsError(f"{where}: {len(entry['scale'])} scales but {len(entry['offset'])} offsets")


# --- between formats ---------------------------------------------------------------------------------------

def _to_v1_entry(name: str, entry: list[dict], where: str) -> dict:
    first = entry[0]
    if any(e.get("bitwidth") != first.get("bitwidth") or e.get("dtype") != first.get("dtype") for e in entry):
        raise EncodingsError(f"{where}: channels with different bitwidths or dtypes have no 1.0.0 form")
    out = {
        "bw": first["bitwidth"],
        "dtype": str(first.get("dtype", "int")).upper(),
        "enc_type": "PER_TENSOR" if len(entry) == 1 else "PER_CHANNEL",
        "is_sym": str(first.get("is_symmetric")) == "True",
        "name": name,
    }
    if out["dtype"] == "INT":
        out["offset"] = [int(e["offset"]) for e in entry]
        out["scale"] = [e["scale"] for e in entry]
    return out


def _to_v0_entry(entry: dict, where: str) -> list[dict]:
    if entry["enc_type"] not in ("PER_TENSOR", "PER_CHANNEL"):
        raise EncodingsError(f"{where}: {entry['enc_type']} encodings have no 0.6.1 form")
    if entry.get("dtype", "INT") != "INT":
        return [{"bitwidth": entry["bw"], "dtype": "float"}]
    bw = entry["bw"]
    # 0.6.1 also stores min and max, which scale and offset determine: min = offset * scale, max = min + (2^bw - 1) * scale
    return [
        {"bitwidth": bw, "dtype": "int", "is_symmetric": str(bool(entry.get("is_sym"))), "max": (o + 2**bw - 1) * s,
         "min": o * s, "offset": o, "scale": s}
        for s, o in zip(entry["scale"], entry["offset"])
    ]


def convert_version(encodings: dict[str, Any], version: str, *, source: str = "encodings") -> dict[str, Any]:
    """The same encodings in another format; raises where the target cannot hold them (per-block encodings, or
    channels of different bitwidths, in 0.6.1 / 1.0.0 respectively). Other top-level keys pass through."""
    if version not in SUPPORTED_VERSIONS:
        raise EncodingsError(f"version {version!r} is not one of {SUPPORTED_VERSIONS}")
    if encodings["version"] == version:
        return copy.deepcopy(encodings)
    out = {k: copy.deepcopy(v) for k, v in encodings.items() if k not in ("param_encodings", "activation_encodings")}
    out["version"] = version
    for section in ("param_encodings", "activation_encodings"):
        items = list(_entries(encodings, section, source))
        if version == "1.0.0":
            out[section] = [_to_v1_entry(n, e, f"{source}: {section}[{n!r}]") for n, e in items]
        else:
            out[section] = {n: _to_v0_entry(e, f"{source}: {section}[{n!r}]") for n, e in items}
    return out


# --- one entry: split into heads, join back -----------------------------------------------------------------

def _channels(entry: Any, version: str) -> int:
    """How many per-channel (or per-block) values a per-channel entry holds."""
    return len(entry) if version == "0.6.1" else len(entry["scale"])


def _is_per_tensor(entry: Any, version: str) -> bool:
    return len(entry) == 1 if version == "0.6.1" else entry["enc_type"] == "PER_TENSOR"


# The lists of a 1.0.0 entry that hold one value per channel (PER_CHANNEL) or per block (PER_BLOCK; LPBQ's
# per_block_int_scale, beside its per-channel scale and offset). AIMET writes each channel-major, channel 0's
# values first (its encoding spec, section 3.1), so a head's values are one contiguous slice of each.
_PER_CHANNEL_LISTS = ("scale", "offset", "per_block_int_scale", "zero_point_shift")


def split_entry(entry: Any, version: str, names: list[str], where: str) -> list[Any]:
    """One parameter encoding cut into per-head encodings named ``names``: contiguous chunks of a per-channel
    (or per-block) encoding, copies of a per-tensor one."""
    heads = len(names)
    if _is_per_tensor(entry, version):
        chunks = [copy.deepcopy(entry) for _ in names]
    else:
        count = _channels(entry, version)
        if count % heads:
            raise EncodingsError(f"{where}: {count} per-channel encodings do not split into {heads} heads")
        if version == "0.6.1":
            size = count // heads
            chunks = [copy.deepcopy(entry[i * size:(i + 1) * size]) for i in range(heads)]
        else:
            chunks = _split_lists(entry, heads, where)
    if version == "1.0.0":
        for chunk, name in zip(chunks, names):
            chunk["name"] = name
    return chunks


def _split_lists(entry: dict, heads: int, where: str) -> list[dict]:
    lists = [key for key in _PER_CHANNEL_LISTS if key in entry]
    for key in lists:
        if len(entry[key]) % heads:
            raise EncodingsError(f"{where}: {len(entry[key])} values of {key!r} do not split into {heads} heads")
    chunks = []
    for i in range(heads):
        chunk = copy.deepcopy({k: v for k, v in entry.items() if k not in lists})
        for key in lists:
            size = len(entry[key]) // heads
            chunk[key] = entry[key][i * size:(i + 1) * size]
        chunks.append(chunk)
    return chunks


def join_entries(entries: list[Any], version: str, name: str, where: str, per_tensor: bool) -> Any:
    """Inverse of :func:`split_entry`; ``per_tensor`` says which form the MHA encoding had. Raises where the
    heads' encodings cannot have come from one MHA encoding (per-tensor copies that differ)."""
    if per_tensor:
        if any(_strip(e) != _strip(entries[0]) for e in entries):
            raise EncodingsError(f"{where}: per-tensor encodings of the heads differ; they cannot join losslessly")
        joined = copy.deepcopy(entries[0])
    elif version == "0.6.1":
        joined = [copy.deepcopy(e) for entry in entries for e in entry]
    else:
        # one 1.0.0 entry holds one bitwidth, dtype and symmetry for all its channels: heads that differ in
        # those cannot join without losing what makes them differ
        shared = [{k: v for k, v in e.items() if k != "name" and k not in _PER_CHANNEL_LISTS} for e in entries]
        if any(s != shared[0] for s in shared):
            raise EncodingsError(f"{where}: the heads' encodings differ in {_differing_keys(shared)}; they cannot "
                                 "join into one per-channel encoding losslessly")
        # (its other fields are scalars, so a shallow copy would do as well: no mutant of this line can fail)
        joined = copy.deepcopy(entries[0])  # pragma: no mutate
        for key in _PER_CHANNEL_LISTS:
            if key in joined:
                joined[key] = [v for entry in entries for v in entry[key]]
    if version == "1.0.0":
        joined["name"] = name
    return joined


def _differing_keys(dicts: list[dict]) -> list[str]:
    return sorted(k for k in set().union(*dicts) if len({repr(d.get(k)) for d in dicts}) > 1)


# --- activation names ---------------------------------------------------------------------------------------

# AIMET's scope for the last ONNX node of a module that exports as several (a Linear with a bias on tokens: MatMul,
# then Add): ``<module scope>#1.end``. Its output is the module's output.
_LAST_NODE = re.compile(r"#\d+\.end$")
# The output projections an attention keeps unchanged in SHA form, in each library's naming.
_OUTPUT_PROJECTIONS = ("to_out", "out_proj")


def _sha_activations(name: str, renames: dict[str, list[str]]) -> list[str] | None:
    """The SHA names taking the encoding of the MHA activation ``name``, or None: a module name is looked up as it
    is, an ONNX tensor name (``<scope>/<op>_output_0``, ``<scope>#1.end/<op>_output_0``) by its scope."""
    if name in renames:
        return renames[name]
    scope, _, tensor = name.rpartition("/")
    return renames.get(_LAST_NODE.sub("", scope)) if scope and tensor.endswith("_output_0") else None


def _is_attention_internal(name: str, scopes: list[str]) -> bool:
    """An activation of an attention's internals in the MHA graph (not its unchanged output projection)."""
    return any(name.startswith(scope + "/") and not any(name.startswith(f"{scope}/{kept}{end}")
                                                        for kept in _OUTPUT_PROJECTIONS for end in ("/", "#"))
               for scope in scopes)


# --- the rewrite --------------------------------------------------------------------------------------------

@dataclass
class RewriteReport:
    """What a rewrite did, in counts and names."""

    params_split: int = 0
    params_copied: int = 0
    params_joined: int = 0
    activations_copied: int = 0
    activations_dropped: list[str] = field(default_factory=list)
    prefix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "param_encodings_split": self.params_split,
            "param_encodings_copied": self.params_copied,
            "param_encodings_joined": self.params_joined,
            "activation_encodings_copied": self.activations_copied,
            "activation_encodings_dropped": len(self.activations_dropped),
            "name_prefix": self.prefix,
        }


def detect_prefix(names: list[str], known: list[str]) -> str:
    """The module path AIMET put in front of the model's names (e.g. ``unet.`` for a wrapper), found by matching
    ``known`` parameter names (a name map's, or a model's); empty where they match as they are."""
    for name in names:
        for key in known:
            if name == key:
                return ""
            if name.endswith("." + key):
                return name[: -len(key)]
    return ""


def _build(encodings: dict, items: list[tuple[str, Any]]) -> Any:
    """A section body in the encodings' format from (name, entry) pairs."""
    if encodings["version"] == "0.6.1":
        return dict(items)
    return [entry for _, entry in items]


def mha_to_sha(encodings: dict[str, Any], name_map: NameMap, *, source: str = "encodings"
               ) -> tuple[dict[str, Any], RewriteReport]:
    """SHA encodings from MHA ones: a new dict, the input unchanged, the format kept."""
    version, name_map = encodings["version"], NameMap.of(name_map)
    params = list(_entries(encodings, "param_encodings", source))
    prefix = detect_prefix([n for n, _ in params], name_map.all_names())
    report = RewriteReport(prefix=prefix)
    sha_names = {prefix + n for n in name_map.sha_names()}
    clashing = [n for n, _ in params if n in sha_names]
    if clashing:
        raise EncodingsError(f"{source}: already holds SHA encodings, e.g. {clashing[0]!r}")

    new_params = []
    for name, entry in params:
        bare = name[len(prefix):] if name.startswith(prefix) else name
        if bare in name_map:
            names = [prefix + n for n in name_map[bare]]
            per_tensor = _is_per_tensor(entry, version)
            new_params += zip(names, split_entry(entry, version, names, f"{source}: {name}"))
            if per_tensor:
                report.params_copied += 1
            else:
                report.params_split += 1
        else:
            new_params.append((name, copy.deepcopy(entry)))

    renames, scopes = name_map.activation_names(prefix), name_map.attention_scopes(prefix)
    new_acts = []
    for name, entry in _entries(encodings, "activation_encodings", source):
        targets = _sha_activations(name, renames)
        if targets is not None:
            copies = [copy.deepcopy(entry) for _ in targets]
            if version == "1.0.0":
                for c, t in zip(copies, targets):
                    c["name"] = t
            new_acts += zip(targets, copies)
            report.activations_copied += 1
        elif _is_attention_internal(name, scopes):
            # an attention-internal tensor of the MHA graph (SDPA, reshapes) with no counterpart in the SHA graph
            report.activations_dropped.append(name)
        else:
            new_acts.append((name, copy.deepcopy(entry)))

    _check_unique("param_encodings", new_params, source)
    _check_unique("activation_encodings", new_acts, source)
    out = {k: copy.deepcopy(v) for k, v in encodings.items() if k not in ("param_encodings", "activation_encodings")}
    out["param_encodings"] = _build(encodings, new_params)
    out["activation_encodings"] = _build(encodings, new_acts)
    return out, report


def sha_to_mha(encodings: dict[str, Any], name_map: NameMap, *, per_tensor: dict[str, bool] | None = None,
               source: str = "encodings") -> tuple[dict[str, Any], RewriteReport]:
    """MHA parameter encodings from SHA ones, where that is lossless. ``per_tensor`` (MHA name -> bool) says which
    MHA encodings were per-tensor; by default, heads holding identical single encodings are taken as copies of a
    per-tensor one (format 1.0.0 says so itself; in 0.6.1 only a one-channel head is ambiguous).

    Activation encodings are kept as they are, except the per-head ones, which are joined only where identical."""
    version, name_map = encodings["version"], NameMap.of(name_map)
    params = dict(_entries(encodings, "param_encodings", source))
    prefix = detect_prefix(list(params), name_map.all_names())
    report = RewriteReport(prefix=prefix)
    first_head = {prefix + head: mha for head, mha in name_map.first_heads().items()}
    consumed = {prefix + n for n in name_map.sha_names()}
    new_params = []
    for name, entry in params.items():
        if name in first_head:
            mha = first_head[name]
            heads = [prefix + n for n in name_map[mha]]
            missing = [h for h in heads if h not in params]
            if missing:
                raise EncodingsError(f"{source}: {missing[0]!r} is missing; cannot join the heads of {mha!r}")
            entries = [params[h] for h in heads]
            default = all(_is_per_tensor(e, version) and _strip(e) == _strip(entries[0]) for e in entries)
            is_per_tensor = (per_tensor or {}).get(mha, default)
            new_params.append((prefix + mha, join_entries(entries, version, prefix + mha, f"{source}: {mha}",
                                                          is_per_tensor)))
            report.params_joined += 1
        elif name not in consumed:
            new_params.append((name, copy.deepcopy(entry)))
    out = {k: copy.deepcopy(v) for k, v in encodings.items() if k != "param_encodings"}
    out["param_encodings"] = _build(encodings, new_params)
    return out, report


def _strip(entry: Any) -> Any:
    return {k: v for k, v in entry.items() if k != "name"} if isinstance(entry, dict) else entry


def _check_unique(section: str, items: list[tuple[str, Any]], source: str) -> None:
    """Checked on the (name, entry) pairs, before a section is built: a 0.6.1 section is a JSON object, in which a
    second entry of a name would silently replace the first."""
    seen = set()
    for name, _ in items:
        if name in seen:
            raise EncodingsError(f"{source}: {section} names {name!r} twice")
        seen.add(name)
