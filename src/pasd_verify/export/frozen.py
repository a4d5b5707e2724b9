"""AdaRounded parameter encodings as export input: their layers keep AdaRound's grids instead of being recalibrated.

``pasd-verify adaround`` writes the rounded weights (``adarounded.safetensors``) and the grids they lie on
(``param_encodings.encodings``, keyed by the model's parameter names). The export must quantize exactly those
weights on exactly those grids. Recalibrating them would compute min-max grids of the rounded weights at the
export's bitwidth, which are other grids (AdaRound's defaults are 4 bits and TF-enhanced grids), and rounding onto
another grid undoes what AdaRound chose. So the grids are frozen into aimet-onnx's sim
(``set_and_freeze_param_encodings``) before it calibrates everything else.

The encodings name torch parameters, aimet-onnx names ONNX initializers. torch's exporter keeps a parameter's name
for Conv and Gemm weights, but a Linear applied to a 3-D input becomes a MatMul whose weight is transposed and
constant-folded into a new initializer (``onnx::MatMul_<n>``). So each parameter is found in the exported graph by
its content: the initializer that is bit-identical to the weight, or to its transpose. Nothing is guessed: a weight
found nowhere, or two weights that are bit-identical but carry different grids, is an error naming the parameter.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..encodings import EncodingsError, convert_version, detect_prefix, load_encodings
from ..encodings_check import check_encodings, compare_encodings

# A weight that AdaRound rounded lies on its grid up to float32 storage of (q + offset) * scale: 2^-24 relative,
# at most 2^16 * 2^-24 = 0.004 grid steps at 16 bits. A weight that was never rounded onto the grid sits anywhere
# in [0, 0.5] steps from it, so its largest distance over a channel is far above this.
ON_GRID_STEPS = 0.01
# aimet-onnx holds a scale as float32: a frozen scale comes back within float32 rounding of the one loaded.
FROZEN_SCALE_RTOL = 1e-6


def off_grid_steps(weight: torch.Tensor, entry: dict[str, Any]) -> float:
    """How far ``weight`` lies from the grid a 1.0.0 ``entry`` describes, in grid steps (value = (q + offset) *
    scale with q in [0, 2^bw - 1]); a weight beyond the grid's ends counts by how far it lies outside."""
    rows = weight.detach().double().reshape(weight.shape[0] if entry["enc_type"] == "PER_CHANNEL" else 1, -1)
    scale = torch.tensor(entry["scale"], dtype=torch.float64)[:, None]
    offset = torch.tensor(entry["offset"], dtype=torch.float64)[:, None]
    q = rows / scale - offset
    outside = torch.clamp(-q, min=0) + torch.clamp(q - (2 ** entry["bw"] - 1), min=0)
    return float(torch.maximum((q - q.round()).abs(), outside).max())


def adarounded_entries(path: str | os.PathLike, model: nn.Module) -> dict[str, dict[str, Any]]:
    """The parameter encodings of the file at ``path`` (format 0.6.1 or 1.0.0) as 1.0.0 entries by parameter name
    of ``model``, checked: each names a parameter with its channel count, and that parameter lies on its grid."""
    source = str(path)
    encodings = convert_version(load_encodings(path), "1.0.0", source=source)
    parameters = dict(model.named_parameters())
    problems = check_encodings(encodings, {n: tuple(p.shape) for n, p in parameters.items()}, source=source)
    if problems:
        raise EncodingsError("\n".join(problems))
    entries = encodings["param_encodings"]
    if not entries:
        raise EncodingsError(f"{source}: no parameter encodings to freeze")
    prefix = detect_prefix([e["name"] for e in entries], list(parameters))
    found = {}
    for entry in entries:
        name = entry["name"][len(prefix):]
        if entry.get("dtype", "INT") != "INT" or entry["enc_type"] not in ("PER_TENSOR", "PER_CHANNEL"):
            raise EncodingsError(f"{source}: {entry['name']}: a {entry.get('dtype')} {entry['enc_type']} encoding "
                                 "is not an AdaRound grid (integer, per tensor or per channel)")
        steps = off_grid_steps(parameters[name], entry)
        if steps > ON_GRID_STEPS:
            raise EncodingsError(
                f"{source}: {entry['name']}: the model's weight lies up to {steps:.3g} grid steps off this "
                "encoding's grid, so it is not the weight these encodings were AdaRounded with (export the "
                "adarounded.safetensors written with them)")
        found[name] = {**entry, "name": name}
    return found


def _content_key(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    header = f"{array.dtype.str}{array.shape}".encode()
    return hashlib.blake2b(header + array.tobytes(), digest_size=20).digest()


def initializers_holding(onnx_path: str | os.PathLike, weights: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """For each named weight, the initializers of the graph at ``onnx_path`` bit-identical to it or, for a
    matrix, to its transpose (read one at a time: at SD1.5 size the graph's weights are gigabytes)."""
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    index: dict[bytes, list[str]] = {}
    for initializer in model.graph.initializer:
        if initializer.data_type == onnx.TensorProto.FLOAT:
            array = numpy_helper.to_array(initializer, base_dir=str(onnx_path.parent))
            index.setdefault(_content_key(array), []).append(initializer.name)
    found = {}
    for name, weight in weights.items():
        array = weight.detach().cpu().float().numpy()
        forms = [array, array.T] if array.ndim == 2 else [array]
        found[name] = [i for form in forms for i in index.get(_content_key(form), [])]
    return found


def onnx_param_encodings(entries: dict[str, dict[str, Any]], model: nn.Module, onnx_path: str | os.PathLike,
                         source: str) -> dict[str, Any]:
    """The encodings of ``entries`` renamed to the initializers of the exported graph that hold their weights."""
    parameters = dict(model.named_parameters())
    holders = initializers_holding(onnx_path, {name: parameters[name] for name in entries})
    by_initializer: dict[str, list[str]] = {}
    for name, initializers in holders.items():
        if not initializers:
            raise EncodingsError(f"{source}: {name}: no initializer of the exported graph holds this weight or its "
                                 "transpose (an export step changed it), so its AdaRound grid cannot be applied")
        for initializer in initializers:
            by_initializer.setdefault(initializer, []).append(name)
    param_encodings = []
    for initializer, names in sorted(by_initializer.items()):
        grids = [{k: v for k, v in entries[n].items() if k != "name"} for n in names]
        if any(grid != grids[0] for grid in grids[1:]):
            raise EncodingsError(f"{source}: {', '.join(names)} have bit-identical weights but different grids, so "
                                 f"which of them initializer {initializer!r} is cannot be told")
        param_encodings.append({**grids[0], "name": initializer})
    return {"version": "1.0.0", "param_encodings": param_encodings, "activation_encodings": []}


def frozen_changes(frozen: dict[str, Any], exported: dict[str, Any]) -> list[str]:
    """How the exported parameter encodings differ from the frozen ones on the frozen initializers (empty when
    every frozen grid came through: same bitwidth, symmetry and offsets, scales within float32 rounding)."""
    names = {e["name"] for e in frozen["param_encodings"]}
    kept = {**exported, "param_encodings": [e for e in exported["param_encodings"] if e["name"] in names]}
    return compare_encodings(frozen, kept, sections=("param_encodings",), scale_rtol=FROZEN_SCALE_RTOL, grid_steps=0,
                             source="frozen AdaRound encodings vs model.encodings")
