"""Quantize the exported ONNX graph itself with aimet-onnx: the route that gives the HTP a wholly quantized graph.

Why aimet-onnx and not aimet-torch's QDQ export (REFERENCE section 8, and checked by this package's tests):
aimet-torch quantizes module boundaries only, so the ops a module decomposes into when exported (GroupNorm's
InstanceNormalization/Mul/Add, SiLU's Sigmoid/Mul) stay float and the HTP refuses their weight DequantizeLinear
nodes. aimet-onnx's ``QuantizationSimModel`` puts a quantizer on every tensor of the ONNX graph, which is also
Qualcomm's own SD1.5 route (quic/ai-hub-models). Its encodings (format 1.0.0, keyed by ONNX tensor and initializer
names, parameters and activations in their own sections) are the one source of quantization parameters: the QDQ
graph, the QNN converter's ``--quantization_overrides`` and the HTP binary all come from them.

This is the one module that uses aimet-onnx's private helpers (its QDQ node insertion, data-movement encodings,
unsigned-encoding conversion and the sim's rounded parameters); tests/test_private_apis.py fails, naming the helper,
when an aimet-onnx release changes one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import PasdVerifyError
from ..io import write_json
from ..logs import quiet_loggers
from ..memory import trim_heap

WEIGHT_GRANULARITY = ("per_channel", "per_tensor")


def _config_file(weights: str, folder: Path) -> str:
    """aimet-onnx's default config, with per-channel weights switched off for ``per_tensor``."""
    if weights not in WEIGHT_GRANULARITY:
        raise PasdVerifyError(f"weights must be one of {WEIGHT_GRANULARITY}, got {weights!r}")
    source = resources.files("aimet_onnx.common.quantsim_config") / "default_config_per_channel.json"
    config = json.loads(source.read_text())
    if weights == "per_tensor":
        for op in config.get("op_type", {}).values():
            if "per_channel_quantization" in op:
                op["per_channel_quantization"] = "False"
    path = folder / f"aimet_onnx_{weights}.json"
    path.write_text(json.dumps(config, indent=2))
    return str(path)


def quantization_sim(model_path: str | os.PathLike, calibration: list[dict[str, np.ndarray]], *, param_bw: int = 8,
                     act_bw: int = 16, weights: str = "per_channel", workdir: str | os.PathLike,
                     frozen_param_encodings: str | os.PathLike | None = None):
    """An aimet-onnx sim of the graph at ``model_path``, calibrated (min-max) on ``calibration`` feeds; the
    parameters named in ``frozen_param_encodings`` (a 1.0.0 file keyed by initializer names) keep its grids."""
    from aimet_onnx.common.defs import qtype
    from aimet_onnx.quantsim import QuantizationSimModel

    for name, bw in (("param_bw", param_bw), ("act_bw", act_bw)):
        if not 2 <= bw <= 16:
            raise PasdVerifyError(f"{name} must be between 2 and 16 bits, got {bw}")
    workdir = Path(workdir)
    model = onnx.load(str(model_path))
    with _quiet_aimet():
        sim = QuantizationSimModel(model, param_type=qtype.int(param_bw), activation_type=qtype.int(act_bw),
                                   quant_scheme="min_max", config_file=_config_file(weights, workdir),
                                   path=str(workdir))
        if frozen_param_encodings is not None:
            sim.set_and_freeze_param_encodings(str(frozen_param_encodings))
        sim.compute_encodings(calibration)
    return sim


def export_quantized(sim, folder: str | os.PathLike, *, large: bool) -> dict[str, Path]:
    """Write ``model.encodings`` (1.0.0) and ``model.qdq.onnx`` (QuantizeLinear/DequantizeLinear on every
    quantized tensor) into ``folder``, which already holds ``model.onnx``, the float graph the sim was built from.

    The sim's onnxruntime session is dropped first, so the sim cannot run afterwards (run it before): the session
    holds one more copy of the weights, and at SD1.5 size the QDQ conversion needs that memory. ``model.onnx``
    stays the float graph as exported rather than aimet-onnx's re-serialization of its own copy: with its
    quantizers removed the sim's graph is that graph node for node and weight for weight (the tests compare the
    two), and writing it again would cost one more copy of the weights.
    """
    folder = Path(folder)
    sim.session = None  # as aimet-onnx itself does when a change to its graph makes the session stale
    trim_heap()
    with _quiet_aimet():
        sim.export(str(folder), "model", export_model=False, encoding_version="1.0.0")
    write_qdq(sim, folder / "model.onnx", folder / "model.qdq.onnx", large=large)
    path = folder / "model.encodings"
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    encodings, _ = place_static_encodings(json.loads(path.read_text()), model)
    write_json(path, encodings)
    return {"model": folder / "model.onnx", "encodings": path, "qdq": folder / "model.qdq.onnx"}


def write_qdq(sim, float_path: str | os.PathLike, qdq_path: str | os.PathLike, *, large: bool) -> None:
    """aimet-onnx's QDQ conversion (``sim.to_onnx_qdq()``: QuantizeLinear/DequantizeLinear for every quantizer of the
    sim, and for the outputs of the data-movement ops after them) applied to the float graph on disk.

    ``to_onnx_qdq`` copies the sim's whole graph, quantize-dequantizes every weight into a second copy and
    round-trips both through onnx-ir: at SD1.5 size the kernel kills it at 24 GB. Here the same aimet-onnx steps
    (its encodings, its data-movement derivation, its node insertion) run on the float graph loaded by onnx-ir,
    whose weights stay memory-mapped until they are streamed into ``<stem>.data``; only the quantized weights are
    held once more, pre-rounded to their grids by the sim's own quantizers as ``to_onnx_qdq`` does (its kernel
    rounds half away from zero, QuantizeLinear half to even: a weight exactly between two grid points would
    otherwise land on the other one). 16-bit or 4-bit quantizers need opset 21; the graphs this package exports
    are opset 20, and their ops mean the same at 21. The tests compare the result with ``to_onnx_qdq``'s.
    """
    import onnx_ir
    import aimet_onnx
    from aimet_onnx.common.onnx._utils import _add_onnx_qdq_nodes_ir, _derive_data_movement_op_encodings
    from aimet_onnx.common.defs import QuantizationDataType
    from aimet_onnx.quantsim import _to_unsigned_encoding

    quantizers = sim.qc_quantize_op_dict
    parameters = {product.name for op in sim.connected_graph.get_all_ops().values()
                  for product, _ in op.parameters.values()
                  if product.name in quantizers and quantizers[product.name].bitwidth <= 32}
    names, outputs, prefixes, encodings, float_types = [], [], [], [], []
    for node in sim.model.model.graph.node:  # graph order, as to_onnx_qdq walks it
        if node.op_type != "QcQuantizeOp":
            continue
        encoding = quantizers[node.input[0]].export_encodings("2.0.0")
        if not encoding:
            continue
        names.append(node.input[0])
        outputs.append(node.output[0])
        prefixes.append(node.name)
        encodings.append(encoding if node.input[0] in parameters else _to_unsigned_encoding(encoding))
        float_types.append(sim.activation_dtypes[node.input[0]])
    # the graph is read once; onnx-ir then maps its weights from the .data file beside it instead of loading them
    graph = onnx.load(str(float_path), load_external_data=False)
    derived = _derive_data_movement_op_encodings(graph, dict(zip(names, encodings)))
    for name, encoding in derived.items():
        if encoding["output_dtype"] != "int32":  # QuantizeLinear has no int32 output
            names.append(name)
            outputs.append(name + "_qdq")
            prefixes.append(name)
            encodings.append(encoding)
            float_types.append(sim.activation_dtypes.get(name, np.float32))
    opset = next(o.version for o in graph.opset_import if o.domain == "")
    if any(q.data_type == QuantizationDataType.int and q.bitwidth not in (8, 32) for q in quantizers.values()):
        opset = max(opset, 21)
    model = onnx_ir.serde.deserialize_model(graph)
    onnx_ir.external_data.set_base_dir(model.graph, str(Path(float_path).parent))
    del graph
    model.opset_imports[""] = opset
    rounded = sim._get_qdq_parameters()  # pylint: disable=protected-access
    for name in list(rounded):
        if name not in model.graph.initializers:
            raise PasdVerifyError(f"{float_path}: quantized parameter {name!r} is not an initializer of the graph")
        model.graph.initializers[name].const_value = onnx_ir.tensor(rounded.pop(name), name=name)
    model = _add_onnx_qdq_nodes_ir(model, names, outputs, prefixes, encodings, float_types, opset,
                                   prequantize_constants=False)
    model.metadata_props["producer"] = f"aimet-onnx {aimet_onnx.__version__}"
    qdq_path = Path(qdq_path)
    onnx_ir.save(model, qdq_path, external_data=qdq_path.with_suffix(".data").name if large else None,
                 size_threshold_bytes=1024)


def place_static_encodings(encodings: dict[str, Any], model: onnx.ModelProto) -> tuple[dict[str, Any], list[str]]:
    """Move encodings of constant tensors (initializers) from the activation section to the parameter section.

    aimet-onnx lists a quantized constant operand (an attention scale, a folded GroupNorm constant) among the
    activations; the QNN converter reads static tensors' encodings from ``param_encodings`` and silently
    recalibrates what it does not find there. Returns a new dict (the input is not changed) and the moved names.
    """
    initializers = {i.name for i in model.graph.initializer}
    moved = [e for e in encodings["activation_encodings"] if e["name"] in initializers]
    placed = {**encodings,
              "activation_encodings": [e for e in encodings["activation_encodings"] if e["name"] not in initializers],
              "param_encodings": [*encodings["param_encodings"], *moved]}
    return placed, [e["name"] for e in moved]


def sim_outputs(sim, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The sim's own outputs for ``feeds`` (onnxruntime with AIMET's quantize-dequantize custom op), under the
    graph's output ``names``: the sim renames its outputs (``noise_updated``) but keeps their order."""
    return dict(zip(names, sim.session.run(None, feeds)))


def check_encoding_names(encodings: dict[str, Any], model: onnx.ModelProto) -> list[str]:
    """Every parameter encoding names an initializer; every activation encoding names a graph input or a node
    output that is not an initializer. Returns the problems found (empty when consistent)."""
    initializers = {i.name for i in model.graph.initializer}
    tensors = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    problems = []
    for entry in encodings.get("param_encodings", []):
        if entry["name"] not in initializers:
            where = "an activation" if entry["name"] in tensors else "nothing in the graph"
            problems.append(f"param encoding {entry['name']!r} names {where}, not an initializer")
    for entry in encodings.get("activation_encodings", []):
        if entry["name"] not in tensors - initializers:
            where = "an initializer" if entry["name"] in initializers else "nothing in the graph"
            problems.append(f"activation encoding {entry['name']!r} names {where}")
    return problems


@contextlib.contextmanager
def _quiet_aimet():
    """aimet-onnx logs every adjusted weight scale and opset change, and its warnings, to the console, and prints
    progress: keep the user's terminal clean, as aimet-torch's are (its log areas shown with ``--verbose``)."""
    from aimet_onnx.common.utils import AimetLogger

    with quiet_loggers(area.value for area in AimetLogger.LogAreas), contextlib.redirect_stdout(io.StringIO()):
        yield
