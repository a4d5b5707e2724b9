"""Float ONNX export with static shapes, and the graph facts every later step relies on.

torch's exporter (``dynamo=False``, opset 20 for a native ``Gelu``: at 17 GELU becomes ``Erf``, which the HTP does
not take) writes shape arithmetic (Shape/Gather/Where ...) even for fixed input sizes; onnxruntime's basic
optimisation level folds it into constants, leaving only standard ONNX compute ops. Weights over the protobuf limit
go to ONE external-data file beside the graph (``model.data``), not one file per tensor as torch and aimet-torch
write them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..kinds import ExportGraph

OPSET = 20
# Below protobuf's 2 GiB limit with room for the graph itself.
EXTERNAL_DATA_BYTES = 1 << 30
# A non-weight constant this large is almost always a trace artefact: e.g. an attention bias of [heads, HW, HW]
# materialised at export time (REFERENCE section 1), which no phone wants in its binary.
LARGE_CONSTANT_BYTES = 1 << 20


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_float(graph: ExportGraph, feeds: dict[str, torch.Tensor], path: str | os.PathLike, *,
                 large: bool | None = None) -> Path:
    """Export ``graph`` at the shapes of ``feeds`` to ``path`` as a static-shape float ONNX graph; its weights go
    to ``<stem>.data`` when ``large`` (by default: when they pass :data:`EXTERNAL_DATA_BYTES`)."""
    path = Path(path)
    if large is None:
        large = parameter_bytes(graph.module) > EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        traced = Path(tmp) / "traced.onnx"
        with torch.no_grad():
            torch.onnx.export(graph.module, tuple(feeds[n] for n in graph.input_names), str(traced),
                              input_names=graph.input_names, output_names=graph.output_names,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        # onnxruntime writes the folded graph in place, weights in one file: no further copy of them in memory
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(path)
        if large:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             path.with_suffix(".data").name)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(traced), options, providers=["CPUExecutionProvider"])
    return path


def run_onnx(path: str | os.PathLike, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
             ) -> dict[str, np.ndarray]:
    """Run a graph on onnxruntime's CPU provider (optimisations off: the graph as written is what is checked)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def large_constants(model: onnx.ModelProto, parameters: set[str]) -> list[tuple[str, int]]:
    """Initializers and Constant nodes over :data:`LARGE_CONSTANT_BYTES` that are not quantized parameters."""
    found = []
    for init in model.graph.initializer:
        size = int(np.prod(init.dims)) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        if size > LARGE_CONSTANT_BYTES and init.name not in parameters:
            found.append((init.name, size))
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    size = int(np.prod(attr.t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(attr.t.data_type).itemsize
                    if size > LARGE_CONSTANT_BYTES:
                        found.append((node.output[0], size))
    return found
