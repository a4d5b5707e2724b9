"""Find where the HTP first disagrees with onnxruntime's CPU on a QDQ graph, and keep a reproducer.

First by diffusers block: each block (``conv_in``, ``time_embedding``, ``down_blocks.0``, ..., ``mid_block``,
``up_blocks.3``, ``conv_out``; a ControlNet's ``controlnet_down_blocks.i`` too; the text encoder's
``encoder.layers.i``, a VAE half's ``encoder.down_blocks.i`` or ``decoder.up_blocks.i``) is cut out of the QDQ graph with
the quantizers of what enters it, compiled as its own graph and run on its inputs as the CPU computed them. A block
judged alone does not inherit the error of the blocks before it, so the first bad block is where the HTP breaks
the numbers, not where an accumulated error crosses the threshold. Then by op, within that block's graph:

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
from .agreement import htp_agrees, sqnr_db, worst
from .onnx_io import run_onnx

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
    return _walk_up(producer, list(node.input) if node is not None else [], points.__contains__)


def _walk_up(producer: Producers, start: list[str], stop) -> list[str]:
    """The tensors at which ``stop`` holds, found walking upstream from ``start`` through every other producer."""
    found: list[str] = []
    pending, seen = list(start), set()
    while pending:
        name = pending.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if stop(name):
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
    return _scope(node) or node.name


def _scope(node: onnx.NodeProto) -> str:
    """The dotted module path in the exporter's node name (``/unet/down_blocks.0/resnets.0/conv1/Conv`` ->
    ``down_blocks.0.resnets.0.conv1``: the wrapper's attribute and the op's own name dropped); empty for a node
    named otherwise."""
    return ".".join([p for p in node.name.split("/") if p][1:-1])


@dataclass
class Divergence:
    """The first bad block, and in it the first bad prefix: where it ends, what makes it, how the HTP disagreed.
    ``block`` is None when every block agreed alone and the prefixes of the whole graph were searched instead."""

    tensor: str
    module: str
    op_pattern: list[str]
    htp_status: str
    sqnr_db: float | None
    reproducer: str
    probes: list[dict] = field(default_factory=list)
    block: str | None = None
    blocks: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def extract_prefix(model_path: str | os.PathLike, inputs: list[str], outputs: str | list[str],
                   path: str | os.PathLike) -> Path:
    """The part of the graph at ``model_path`` that computes ``outputs`` from ``inputs``, saved at ``path``."""
    onnx.utils.extract_model(str(model_path), str(path), inputs, [outputs] if isinstance(outputs, str) else outputs,
                             check_model=False)
    return Path(path)


# --- by block ----------------------------------------------------------------------------------------------

# Top-level modules that are one diffusers block with their neighbour: splitting GroupNorm -> SiLU -> Conv over
# three graphs would hide exactly the divergence the output head can show.
_JOINED = {"time_proj": "time_embedding", "conv_norm_out": "conv_out", "conv_act": "conv_out"}


# Halves that hold a model's blocks one level down: the VAE's encoder and decoder, the text encoder's encoder.
_HALVES = ("encoder", "decoder")


def block_of(module: str) -> str:
    """The diffusers block a module path lies in: ``down_blocks.1``, ``mid_block``, ``controlnet_down_blocks.3``,
    ``time_embedding`` (with ``time_proj``), ``conv_out`` (with ``conv_norm_out`` and ``conv_act``), or another
    top-level module (``conv_in``, ``controlnet_cond_embedding``); inside a VAE half or the text encoder's encoder,
    the same one level down (``decoder.up_blocks.2``, ``encoder.mid_block``, ``encoder.layers.7``)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[0] in _HALVES:
        return f"{parts[0]}.{block_of('.'.join(parts[1:]))}"
    block = ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]
    return _JOINED.get(block, block)


def tensor_blocks(model: onnx.ModelProto) -> dict[str, str | None]:
    """The block of every node output: from the exporter's scope in the node's name (``/unet/down_blocks.0/...``)
    or, for a node that AIMET or onnxruntime added without one, from its first input that has a block. None for
    what no block makes (a graph input's quantizers)."""
    blocks: dict[str, str | None] = {}
    for node in model.graph.node:  # topological order: inputs have their block before their readers
        scope = _scope(node) if node.name.startswith("/") else ""
        block = block_of(scope) if scope else next((blocks[i] for i in node.input if blocks.get(i)), None)
        for output in node.output:
            blocks[output] = block
    return blocks


@dataclass
class Block:
    """One diffusers block as a graph of its own: the float tensors entering it (graph inputs, or what the
    QuantizeLinear at its boundary reads, so that its graph quantizes its inputs itself) and its quantized
    activations that the rest of the graph reads."""

    name: str
    inputs: list[str]
    outputs: list[str]


def _entering(producer: Producers, tensor: str) -> str:
    """Where a block's graph starts for an activation made outside it: before the activation's Q/DQ pair."""
    dequantize = producer.get(tensor)
    quantize = producer.get(dequantize.input[0]) if dequantize is not None else None
    return quantize.input[0] if quantize is not None and quantize.op_type == "QuantizeLinear" else tensor


def graph_blocks(model: onnx.ModelProto) -> list[Block]:
    """The graph's diffusers blocks in data-flow order. A quantized graph input belongs to no block: each block
    that reads it quantizes it in its own graph."""
    producer = producers(model)
    points = activation_points(model, producer)
    point_set, block = set(points), tensor_blocks(model)
    read_by: dict[str, set[str]] = {}
    for point in points:
        for source in upstream_points(producer, point, point_set):
            read_by.setdefault(source, set()).add(block[point])
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = {o.name for o in model.graph.output}
    blocks, after = {}, {}
    for name in dict.fromkeys(block[p] for p in points if block[p] is not None):
        outputs = [p for p in points if block[p] == name and (p in graph_outputs or read_by.get(p, set()) - {name})]
        entering = _walk_up(producer, outputs, lambda t: t in graph_inputs or (
            t in point_set and block[t] not in (name, None)))
        inputs = {t if t in graph_inputs else _entering(producer, t) for t in entering}
        after[name] = {block[t] for t in entering if t not in graph_inputs}
        blocks[name] = Block(name, sorted(inputs), outputs)
    # data-flow order (a block after every block it reads), not the order of the first activation: a block's
    # text-only branch (cross-attention keys) can be computed before anything upstream of its trunk
    position = {p: i for i, p in enumerate(points)}
    ordered: list[Block] = []
    while len(ordered) < len(blocks):
        done = {b.name for b in ordered}
        left = [n for n in blocks if n not in done]
        ready = [n for n in left if after[n] <= done] or left  # (a cycle between blocks: take them by position)
        ordered.append(blocks[min(ready, key=lambda n: max(position[p] for p in blocks[n].outputs))])
    return ordered


def _captured(qdq_path: str | os.PathLike, graph_inputs: list[str], feeds: dict[str, np.ndarray], tensors: list[str],
              work: Path) -> dict[str, np.ndarray]:
    """The values the CPU computes for ``tensors`` inside the graph on ``feeds``."""
    inner = [t for t in tensors if t not in graph_inputs]
    values = {t: feeds[t] for t in tensors if t in graph_inputs}
    if inner:
        prefix = extract_prefix(qdq_path, graph_inputs, inner, work / "captured.onnx")
        values.update(run_onnx(prefix, feeds, inner))
        prefix.unlink()
    return values


def judge_blocks(qdq_path: str | os.PathLike, feeds: dict[str, np.ndarray], work: Path, *, threshold_db: float,
                 soc_model: str, timeout: float, log=lambda line: None, run=run_on_htp
                 ) -> tuple[list[dict], tuple[Block, Path, dict[str, np.ndarray], str] | None]:
    """Each block compiled alone on its captured inputs, in order, until the first bad one. Returns what each
    judged block measured and, for the first bad block, the block, its graph, its inputs and its worst output.
    ``run`` is the device (:func:`~pasd_verify.export.htp.run_on_htp`'s signature and result): an input, so that
    the search can be checked on the CPU against a device that breaks an op of its choosing."""
    model = onnx.load(str(qdq_path), load_external_data=False)
    blocks = graph_blocks(model)
    values = _captured(qdq_path, [i.name for i in model.graph.input], feeds,
                       sorted({t for b in blocks for t in b.inputs}), work)
    judged: list[dict] = []
    for block in blocks:
        path = extract_prefix(qdq_path, block.inputs, block.outputs, work / f"{block.name.replace('.', '_')}.block.qdq.onnx")
        block_feeds = {t: values[t] for t in block.inputs}
        cpu = run_onnx(path, block_feeds, block.outputs)
        htp = run(path, block_feeds, soc_model=soc_model, timeout=timeout)
        per_output = {t: sqnr_db(cpu[t], htp.outputs[t]) for t in block.outputs} if htp.status == "passed" else {}
        output = worst(per_output) if per_output else block.outputs[0]
        bad = not htp_agrees(per_output.get(output), threshold_db)
        judged.append({"block": block.name, "htp": htp.status, "sqnr_db": per_output.get(output), "bad": bad})
        log(f"localize: block {block.name}: HTP {htp.status}"
            + (f", {per_output[output]:.1f} dB" if per_output else f" ({htp.error})"))
        if bad:
            return judged, (block, path, block_feeds, output)
        path.unlink()
    return judged, None


def localize(qdq_path: str | os.PathLike, feeds: dict[str, np.ndarray], out_dir: str | os.PathLike, *,
             output: str, threshold_db: float, soc_model: str = DEFAULT_SOC_MODEL, timeout: float = 3600.0,
             log=lambda line: None, run=run_on_htp) -> Divergence | None:
    """The first diffusers block the HTP gets wrong alone (:func:`judge_blocks`), and in it the first bad op
    (:func:`localize_op` on the block's graph). When every block agrees alone, the error builds up across blocks:
    the prefixes of the whole graph leading to ``output`` are searched instead. The block's graph and the
    reproducer go to ``out_dir/divergences/``. ``run`` is the device, as in :func:`judge_blocks`."""
    work = Path(out_dir) / "divergences"
    work.mkdir(parents=True, exist_ok=True)
    judged, bad = judge_blocks(qdq_path, feeds, work, threshold_db=threshold_db, soc_model=soc_model,
                               timeout=timeout, log=log, run=run)
    if bad is None:
        found = localize_op(qdq_path, feeds, out_dir, output=output, threshold_db=threshold_db, soc_model=soc_model,
                            timeout=timeout, log=log, run=run)
    else:
        block, path, block_feeds, worst = bad
        np.savez(work / f"{path.name.removesuffix('.qdq.onnx')}.inputs.npz", **block_feeds)
        found = localize_op(path, block_feeds, out_dir, output=worst, threshold_db=threshold_db, soc_model=soc_model,
                            timeout=timeout, log=log, run=run)
    if found is not None:
        found.block, found.blocks = (bad[0].name if bad else None), judged
    return found


# --- by op ---------------------------------------------------------------------------------------------------

def localize_op(qdq_path: str | os.PathLike, feeds: dict[str, np.ndarray], out_dir: str | os.PathLike, *,
                output: str, threshold_db: float, soc_model: str = DEFAULT_SOC_MODEL, timeout: float = 3600.0,
                log=lambda line: None, run=run_on_htp) -> Divergence | None:
    """Find the first op on the way to the graph ``output`` whose result the HTP gets wrong.

    Returns None when the prefix ending at ``output`` alone is good (the disagreement then needs the rest of the
    graph, which the caller reports). The reproducer goes to ``out_dir/divergences/``. ``run`` is the device, as in
    :func:`judge_blocks`.
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
            htp = run(prefix, _used_feeds(prefix, feeds), soc_model=soc_model, timeout=timeout)
            sqnr = sqnr_db(cpu, htp.outputs[tensor]) if htp.status == "passed" else None
            probes[tensor] = {"tensor": tensor, "htp": htp.status, "sqnr_db": sqnr,
                              "bad": not htp_agrees(sqnr, threshold_db)}
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
