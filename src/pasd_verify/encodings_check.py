"""Is an AIMET encodings file right for a model, and are two calibrations the same: validation of a file against the
model's parameters (every problem listed, naming the file and entry), the SHA parameters that must have encodings
because their MHA ones had, and comparison of two encodings by what they mean (REFERENCE section 9).

Reading, writing, converting between formats and the MHA <-> SHA rewrite are in :mod:`pasd_verify.encodings`.
"""

from __future__ import annotations

import math
from typing import Any

from .encodings import _channels, _entries, _is_per_tensor, convert_version, detect_prefix
from .name_map import NameMap


# --- validation ---------------------------------------------------------------------------------------------

def _int_range_problems(bw: int, symmetric: bool, scale: float, offset: float, where: str) -> list[str]:
    problems = []
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        problems.append(f"{where}: scale {scale!r} is not a positive number")
    # offset = round(min / scale), min <= 0 <= max, scale = (max - min) / (2^bw - 1): so -(2^bw - 1) <= offset <= 0
    if not (-(2**bw - 1) <= offset <= 0):
        problems.append(f"{where}: offset {offset} is outside [{-(2**bw - 1)}, 0] for bitwidth {bw}")
    elif symmetric and offset not in (-(2 ** (bw - 1)), 0):
        problems.append(f"{where}: symmetric encoding with offset {offset}, expected {-(2 ** (bw - 1))} or 0")
    return problems


def _entry_problems(entry: Any, version: str, where: str) -> list[str]:
    problems = []
    if version == "0.6.1":
        for c, enc in enumerate(entry):
            w = f"{where}[{c}]"
            if enc.get("dtype", "int") != "int":
                continue
            bw, scale, offset = enc["bitwidth"], enc["scale"], enc["offset"]
            symmetric = str(enc.get("is_symmetric")) == "True"  # absent: asymmetric, as AIMET reads it
            problems += _int_range_problems(bw, symmetric, scale, offset, w)
            if "min" in enc and "max" in enc and scale > 0:
                tolerance = scale  # AIMET rounds min/max to the grid: within one step
                lo, hi = offset * scale, (offset + 2**bw - 1) * scale
                if abs(enc["min"] - lo) > tolerance or abs(enc["max"] - hi) > tolerance:
                    problems.append(f"{w}: min/max {enc['min']:.6g}/{enc['max']:.6g} disagree with scale and "
                                    f"offset, which give {lo:.6g}/{hi:.6g}")
        return problems
    if "dtype" not in entry:  # 1.0.0 states it: INT entries have a grid, FLOAT ones only a bitwidth
        problems.append(f"{where}: has no dtype (a 1.0.0 entry says INT or FLOAT)")
    if entry.get("dtype", "INT") != "INT":
        return problems
    for c, (scale, offset) in enumerate(zip(entry["scale"], entry["offset"])):
        problems += _int_range_problems(entry["bw"], bool(entry.get("is_sym")), scale, offset, f"{where}[{c}]")
    return problems


def check_encodings(encodings: dict[str, Any], parameters: dict[str, tuple[int, ...]], *,
                    source: str = "encodings", required: list[str] = ()) -> list[str]:
    """Every problem of ``encodings`` against a model's parameter shapes, all at once (empty when none):
    encodings naming no parameter, ``required`` parameters without one, per-channel counts that are not the
    output-channel count, self-contradicting encodings, duplicate names."""
    version = encodings["version"]
    problems = []
    entries = list(_entries(encodings, "param_encodings", source))
    names = [n for n, _ in entries]
    prefix = detect_prefix(names, list(parameters))
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{source}: param_encodings names {dup!r} more than once")
    activations = list(_entries(encodings, "activation_encodings", source))
    act_names = [n for n, _ in activations]
    for dup in sorted({n for n in act_names if act_names.count(n) > 1}):
        problems.append(f"{source}: activation_encodings names {dup!r} more than once")
    encoded = set()
    for name, entry in entries:
        bare = name[len(prefix):] if name.startswith(prefix) else name
        where = f"{source}: {name}"
        if bare not in parameters:
            problems.append(f"{where}: names no parameter of the model")
            continue
        encoded.add(bare)
        if not _is_per_tensor(entry, version) and (version == "0.6.1" or entry["enc_type"] == "PER_CHANNEL"):
            count, channels = _channels(entry, version), parameters[bare][0] if parameters[bare] else 1
            if count != channels:
                problems.append(f"{where}: {count} per-channel encodings for {channels} output channels")
        problems += _entry_problems(entry, version, where)
    for name, entry in activations:
        problems += _entry_problems(entry, version, f"{source}: activation {name}")
    for name in required:
        if name not in encoded:
            problems.append(f"{source}: {prefix}{name} has no encoding, but the MHA weight it comes from had one")
    return problems


# --- comparing two calibrations -----------------------------------------------------------------------------

# Two calibrations of the same model on the same data, on CPUs with different float kernels, give activation
# ranges that differ in the 7th digit (REFERENCE section 9). A scale is a float: it moves by that much, so 1e-5
# (about a hundred float32 ulps) is float tolerance. An offset is an integer: where the range sits near a rounding
# boundary it moves by one, and min/max (= offset * scale) by one step with it. So "the same encoding" is: equal
# bitwidth, dtype, symmetry and channel count; scales within SCALE_RTOL; grids at most GRID_STEPS steps apart.
SCALE_RTOL = 1e-5
GRID_STEPS = 1


def _channel_encodings(entry: Any, version: str) -> list[dict[str, Any]]:
    """One dict per channel with bw, dtype, sym, scale, offset and (0.6.1) min/max, in either format."""
    if version == "0.6.1":
        return [{"bw": e["bitwidth"], "dtype": str(e.get("dtype", "int")).lower(),
                 "sym": str(e.get("is_symmetric")) == "True", "scale": e.get("scale"),
                 "offset": e.get("offset"), "min": e.get("min"), "max": e.get("max")} for e in entry]
    common = {"bw": entry["bw"], "dtype": str(entry.get("dtype", "INT")).lower(), "sym": bool(entry.get("is_sym")),
              "enc_type": entry["enc_type"], "block_size": entry.get("block_size")}
    if common["dtype"] != "int":
        return [common]
    return [{**common, "scale": s, "offset": o} for s, o in zip(entry["scale"], entry["offset"])]


def _channel_differences(a: dict, b: dict, where: str, scale_rtol: float, grid_steps: int) -> list[str]:
    for key in ("bw", "dtype", "sym", "enc_type", "block_size"):
        if a.get(key) != b.get(key):
            return [f"{where}: {key} {a.get(key)!r} != {b.get(key)!r}"]
    if a["dtype"] != "int":
        return []
    sa, sb = a["scale"], b["scale"]
    if not abs(sa - sb) <= scale_rtol * max(abs(sa), abs(sb)):
        return [f"{where}: scales {sa!r} and {sb!r} differ by more than {scale_rtol:g} relative"]
    if not abs(a["offset"] - b["offset"]) <= grid_steps:
        return [f"{where}: offsets {a['offset']} and {b['offset']} are more than {grid_steps} grid step(s) apart"]
    problems = []
    step = max(sa, sb)
    for key in ("min", "max"):
        if a.get(key) is None or b.get(key) is None:
            continue
        # min/max = grid position * scale: one grid step, plus what the scale tolerance moves that position by
        allowed = grid_steps * step + scale_rtol * max(abs(a[key]), abs(b[key]))
        if not abs(a[key] - b[key]) <= allowed:
            problems.append(f"{where}: {key} {a[key]!r} and {b[key]!r} are more than {grid_steps} grid step(s) apart")
    return problems


def compare_encodings(a: dict[str, Any], b: dict[str, Any], *, sections: tuple[str, ...] = (
        "param_encodings", "activation_encodings"), scale_rtol: float = SCALE_RTOL, grid_steps: int = GRID_STEPS,
        source: str = "encodings") -> list[str]:
    """Every way in which ``a`` and ``b`` are not the same encodings (empty when they are), in either format.

    Names must match exactly; each encoding must agree in bitwidth, dtype, symmetry and channel count, its
    scales to ``scale_rtol`` and its grid (offset, and min/max in 0.6.1) to ``grid_steps`` steps: what two
    calibrations on the same data give on different CPUs (see :data:`SCALE_RTOL`). Different formats are
    compared after converting ``b`` to ``a``'s."""
    if a["version"] != b["version"]:
        b = convert_version(b, a["version"], source=source)
    version, problems = a["version"], []
    for section in sections:
        ea, eb = dict(_entries(a, section, source)), dict(_entries(b, section, source))
        for name in sorted(ea.keys() - eb.keys()):
            problems.append(f"{source}: {section}[{name!r}] is only in the first")
        for name in sorted(eb.keys() - ea.keys()):
            problems.append(f"{source}: {section}[{name!r}] is only in the second")
        for name in sorted(ea.keys() & eb.keys()):
            ca, cb = _channel_encodings(ea[name], version), _channel_encodings(eb[name], version)
            where = f"{source}: {section}[{name!r}]"
            if len(ca) != len(cb):
                problems.append(f"{where}: {len(ca)} channel(s) != {len(cb)}")
                continue
            for c, (x, y) in enumerate(zip(ca, cb)):
                problems += _channel_differences(x, y, f"{where}[{c}]", scale_rtol, grid_steps)
    return problems


def required_sha_encodings(mha_encodings: dict[str, Any], name_map: NameMap, source: str = "encodings") -> list[str]:
    """The SHA parameters that must have encodings because their MHA parameter had one."""
    names = [n for n, _ in _entries(mha_encodings, "param_encodings", source)]
    prefix = detect_prefix(names, NameMap.of(name_map).all_names())
    present = {n[len(prefix):] for n in names}
    return [sha for mha, shas in name_map.items() if mha in present for sha in shas]
