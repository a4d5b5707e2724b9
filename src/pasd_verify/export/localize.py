"""Find where the HTP first disagrees with onnxruntime's CPU on a QDQ graph, and keep a reproducer.

A prefix of the graph (from its inputs to one quantized activation) is compiled and run on the HTP and on the CPU;
it is *bad* when the HTP crashes or fails on it, or agrees below the threshold. A graph is not a chain, so
bisecting activations in topological order misleads (a good tensor on a side branch, such as the text keys, says
nothing about the trunk): the search bisects the deepest chain of activations leading to the bad output, then
checks the other inputs of the op it lands on and starts again from any bad one, so that the answer is a tensor
whose inputs all agree and whose own op does not. The answer names the tensor,
the module that makes it, the op pattern leading to it, and writes the bad prefix graph and its inputs as the
reproducer: the whole prefix, because a crash or divergence of the HTP compile may depend on context that a lone
op does not have (found here: an SHA value conv that crashes in its prefix runs alone).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.utils

from .htp import DEFAULT_SOC_MODEL, run_on_htp
from .onnx_io import run_onnx, sqnr_db

_QDQ = {"QuantizeLinear", "DequantizeLinear"}


Producers = dict[str, onnx.NodeProto]


def producers(model: onnx.ModelProto) -> Producers:
    """Each tensor's producing node (built once per graph: every helper below walks it)."""
    return {o: n for n in model.graph.node for o in n.output}


def activation_points(model: onnx.ModelProto, producer: Producers) -> list[str]:
    """Outputs of DequantizeLinear nodes on activations (not weights), in topological order."""
    initializers = {i.name for i in model.graph.initializer}
    points = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = producer.get(node.input[0])
        if node.input[0] in initializers or (source is not None and source.op_type == "QuantizeLinear"
                                             and source.input[0] in initializers):
            continue
        points.append(node.output[0])
    return points


def _compute_node(producer: Producers, tensor: str) -> onnx.NodeProto | None:
    """The op behind ``tensor``, past its Q/DQ pair."""
    node = producer.get(tensor)
    while node is not None and node.op_type in _QDQ:
        node = producer.get(node.input[0])
    return node


def upstream_points(producer: Producers, tensor: str, points: set[str]) -> list[str]:
    """The nearest activation points that feed the compute node behind ``tensor``: its inputs, through Q/DQ
    pairs and through any op whose output is not quantized."""
    node = _compute_node(producer, tensor)
    found: list[str] = []
    pending, seen = list(node.input) if node is not None else [], set()
    while pending:
        name = pending.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in points:
            found.append(name)
        elif name in producer:
            pending.extend(producer[name].input)
    return found


def op_pattern(producer: Producers, tensor: str, length: int = 5) -> list[str]:
    """The compute ops (Q/DQ skipped) that lead to ``tensor``, following first inputs upstream, oldest first."""
    pattern: list[str] = []
    node = producer.get(tensor)
    while node is not None and len(pattern) < length:
        if node.op_type not in _QDQ:
            pattern.insert(0, node.op_type)
        node = producer.get(node.input[0]) if node.input else None
    return pattern


def module_of(producer: Producers, tensor: str) -> str:
    """The module path (dotted) of the compute node behind ``tensor``, from the exporter's node name."""
    node = _compute_node(producer, tensor)
    if node is None:
        return tensor
    parts = [p for p in node.name.split("/") if p]
    return ".".join(parts[1:-1]) or node.name  # drop the wrapper's attribute and the op's own name


@dataclass
class Divergence:
    """The first bad prefix: where it ends, what makes it, and how the HTP disagreed."""

    tensor: str
    module: str
    op_pattern: list[str]
    htp_status: str
    sqnr_db: float | None
    reproducer: str
    probes: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def extract_prefix(model_path: str | os.PathLike, inputs: list[str], output: str, path: str | os.PathLike) -> Path:
    """The part of the graph at ``model_path`` that computes ``output`` from the graph ``inputs``, saved at ``path``."""
    onnx.utils.extract_model(str(model_path), str(path), inputs, [output], check_model=False)
    return Path(path)


def localize(qdq_path: str | os.PathLike, feeds: dict[str, np.ndarray], out_dir: str | os.PathLike, *,
             output: str, threshold_db: float, soc_model: str = DEFAULT_SOC_MODEL, timeout: float = 3600.0,
             log=lambda line: None) -> Divergence | None:
    """Find the first op on the way to the graph ``output`` whose result the HTP gets wrong.

    Returns None when the prefix ending at ``output`` alone is good (the disagreement then needs the rest of the
    graph, which the caller reports). The reproducer goes to ``out_dir/divergences/``.
    """
    model = onnx.load(str(qdq_path))
    producer, inputs = producers(model), [i.name for i in model.graph.input]
    points = activation_points(model, producer)
    if output not in points:
        raise ValueError(f"{output!r} is not a quantized activation of {qdq_path}")
    point_set, depth = set(points), _depths(model)
    work = Path(out_dir) / "divergences"
    work.mkdir(parents=True, exist_ok=True)
    probes: dict[str, dict] = {}

    def bad(tensor: str) -> bool:
        if tensor not in probes:
            prefix = extract_prefix(qdq_path, inputs, tensor, work / "probe.onnx")
            cpu = run_onnx(prefix, feeds)[tensor]
            htp = run_on_htp(prefix, _used_feeds(prefix, feeds), soc_model=soc_model, timeout=timeout)
            sqnr = sqnr_db(cpu, htp.outputs[tensor]) if htp.status == "passed" else None
            probes[tensor] = {"tensor": tensor, "htp": htp.status, "sqnr_db": sqnr,
                              "bad": htp.status != "passed" or sqnr < threshold_db}
            log(f"localize: probe {len(probes)}: {tensor}: HTP {htp.status}"
                + (f", {sqnr:.1f} dB" if sqnr is not None else f" ({htp.error})"))
        return probes[tensor]["bad"]

    def first_bad(tensor: str) -> str:
        # Bisect the deepest chain of activations leading to a bad tensor (along one chain, a bad tensor's
        # descendants are bad and a good one's ancestors good), then check the other inputs of the op found:
        # a bad one there starts the search again from it.
        chain = [tensor]
        while feeding := upstream_points(producer, chain[-1], point_set):
            chain.append(max(feeding, key=depth.get))
        chain.reverse()
        lo, hi = 0, len(chain) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if bad(chain[mid]):
                hi = mid
            else:
                lo = mid + 1
        found = chain[lo]
        for other in upstream_points(producer, found, point_set):
            if bad(other):
                return first_bad(other)
        return found

    if not bad(output):
        (work / "probe.onnx").unlink(missing_ok=True)
        return None
    tensor = first_bad(output)
    module = module_of(producer, tensor)
    name = module.replace(".", "_") or "graph"
    reproducer = extract_prefix(qdq_path, inputs, tensor, work / f"{name}.qdq.onnx")
    np.savez(work / f"{name}.inputs.npz", **_used_feeds(reproducer, feeds))
    (work / "probe.onnx").unlink(missing_ok=True)
    return Divergence(tensor, module, op_pattern(producer, tensor), probes[tensor]["htp"],
                      probes[tensor]["sqnr_db"], str(reproducer.relative_to(Path(out_dir))), list(probes.values()))


def _depths(model: onnx.ModelProto) -> dict[str, int]:
    """Longest path, in nodes, from the graph inputs to every tensor (the trunk of a UNet is its deepest chain)."""
    depth: dict[str, int] = {}
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        d = 1 + max((depth.get(i, 0) for i in node.input), default=0)
        for out in node.output:
            depth[out] = d
    return depth


def _used_feeds(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    return {k: v for k, v in feeds.items() if k in inputs}
