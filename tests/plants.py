"""The failures users of Stable Diffusion on Snapdragon met, planted into real exports (issue: planted failures).

Each plant edits what a real export holds, as a bad calibration or a bad app would have made it: the
quantization grid of a graph output (its ``<output>_scale`` and ``<output>_zero_point``, which the QDQ graph's
last QuantizeLinear / DequantizeLinear pair shares: what AIMET's encodings became), or the way the app feeds the
UNet graph its timestep. The export's own checks compare a QDQ graph with AIMET's simulation of the same encodings
and with the HTP running the same graph: a grid planted in the encodings passes them all, by construction.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pasd_verify.pipeline.networks import UNetGraph

LEVELS = 2**16 - 1  # the exports' 16-bit activations


def output_range(graph: onnx.ModelProto, output: str) -> tuple[float, float]:
    """The [min, max] the 16-bit grid of ``output`` represents."""
    init = {i.name: i for i in graph.graph.initializer}
    scale = float(numpy_helper.to_array(init[f"{output}_scale"]))
    zero = int(numpy_helper.to_array(init[f"{output}_zero_point"]))
    return -zero * scale, (LEVELS - zero) * scale


def plant_output_grid(folder: Path, output: str, *, low: float | None = None, high: float | None = None,
                      coarser: int = 1) -> tuple[float, float]:
    """Rewrite ``folder/model.qdq.onnx`` in place so that ``output``'s grid spans [low, high] (default: as
    calibrated) with steps ``coarser`` times as large; returns the grid's range as it was."""
    path = folder / "model.qdq.onnx"
    graph = onnx.load(str(path), load_external_data=False)
    was = output_range(graph, output)
    low, high = was[0] if low is None else low, was[1] if high is None else high
    scale = (high - low) / LEVELS * coarser
    zero = int(np.clip(round(-low / scale), 0, LEVELS))
    for init in graph.graph.initializer:
        if init.name == f"{output}_scale":
            init.CopyFrom(numpy_helper.from_array(np.array(scale, dtype=np.float32), init.name))
        elif init.name == f"{output}_zero_point":
            init.CopyFrom(numpy_helper.from_array(np.array(zero, dtype=np.uint16), init.name))
    onnx.save(graph, str(path))
    return was


def copy_exports(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


class TimestepAsFraction(UNetGraph):
    """An app that feeds the UNet graph t / 1000 (a normalized timestep) where the graph embeds the integer step."""

    def forward(self, sample, timestep, *args, **kwargs):
        return super().forward(sample, timestep / 1000.0, *args, **kwargs)
