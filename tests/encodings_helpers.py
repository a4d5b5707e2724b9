"""What the encodings tests share: the golden AIMET files, views of an encodings file whatever its version, and
small hand-made files of either format.

The golden files are real AIMET exports (golden/generate.py); the ``name_map`` and ``sha_shapes`` fixtures of the
tiny UNet they were made from are in conftest.py.
"""

from __future__ import annotations

import math
from pathlib import Path


from pasd_verify.encodings import load_encodings

GOLDEN = Path(__file__).parent.parent / "golden"
VERSIONS = ["0.6.1", "1.0.0"]
WEIGHTS = ["per_channel", "per_tensor"]


def golden(form: str, weights: str, version: str) -> dict:
    return load_encodings(GOLDEN / f"unet_tiny_{form}_{weights}_{version}.encodings")


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


def containers(value, found=None) -> dict[int, object]:
    """Every dict and list reachable from ``value``, by id (kept alive in the result, so ids stay unique)."""
    found = {} if found is None else found
    if isinstance(value, (dict, list)):
        found[id(value)] = value
        for item in value.values() if isinstance(value, dict) else value:
            containers(item, found)
    return found


# --- small hand-made files ------------------------------------------------------------------------------------

def v0_channel(**fields) -> dict:
    """One 0.6.1 channel (8-bit asymmetric, scale 0.5, offset -2), ``fields`` changed; None leaves a field out."""
    channel = {"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "offset": -2, "scale": 0.5, "min": -1.0,
               "max": 126.5}
    return {k: v for k, v in {**channel, **fields}.items() if v is not None}


def v0_file(entry: list) -> dict:
    """A 0.6.1 file whose one parameter encoding is ``entry``, of the parameter ``w``."""
    return {"version": "0.6.1", "activation_encodings": {}, "param_encodings": {"w": entry}}


def v1_file(**fields) -> dict:
    """A 1.0.0 file with one per-channel parameter encoding of ``w``, ``fields`` changed; None leaves a field out."""
    entry = {"name": "w", "bw": 8, "dtype": "INT", "enc_type": "PER_CHANNEL", "is_sym": False, "scale": [0.5],
             "offset": [-2]}
    entry = {k: v for k, v in {**entry, **fields}.items() if v is not None}
    return {"version": "1.0.0", "activation_encodings": [], "param_encodings": [entry]}


def lpbq_file() -> dict:
    """A 1.0.0 file with one per-block (LPBQ) entry, which 0.6.1 cannot hold."""
    return {"version": "1.0.0", "activation_encodings": [], "param_encodings": [
        {"name": "w", "bw": 4, "dtype": "INT", "enc_type": "LPBQ", "is_sym": True, "scale": [1.0], "offset": [-8]}]}


def per_block_entry(kind: str, channels: range, blocks: int, name: str) -> dict:
    """A 1.0.0 per-block entry as AIMET writes it for these output channels, built channel by channel: PER_BLOCK
    has a scale and offset per (channel, block); LPBQ a float scale and offset per channel and an integer scale
    per (channel, block)."""
    common = {"name": name, "bw": 4, "dtype": "INT", "enc_type": kind, "is_sym": True, "block_size": 16}
    if kind == "PER_BLOCK":
        return {**common, "scale": [0.1 * (c + 1) + 0.01 * b for c in channels for b in range(blocks)],
                "offset": [-8 for c in channels for b in range(blocks)]}
    return {**common, "compressed_bw": 8, "scale": [0.1 * (c + 1) for c in channels], "offset": [-8 for c in channels],
            "per_block_int_scale": [c * blocks + b + 1 for c in channels for b in range(blocks)]}
