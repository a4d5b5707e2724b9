"""Rewrites of the float model that are equal in exact arithmetic and change what the HTP compiler sees.

Each one answers a divergence of the QNN HTP backend (onnxruntime-qnn 2.7.0) from onnxruntime's CPU on the same
W8A16 QDQ graph, found by :mod:`pasd_verify.export.localize`; the HTP tier shows each divergence on the bare
pattern and gone after the rewrite.

``silu-as-division``: SiLU written as ``x / (1 + exp(-x))`` instead of ``x * sigmoid(x)``. Why: the QNN HTP
compile of ``GroupNorm -> SiLU -> Conv2d`` with 16-bit activations (every diffusers resnet block) returns output
uncorrelated with onnxruntime's CPU on the same QDQ graph (about 0 dB SQNR), while each piece alone agrees at
68-83 dB; the sigmoid-times-input chain after a normalisation is what the compiler gets wrong (a standalone
GroupNorm(8, 32) -> SiLU -> Conv: -0.1 dB; with this rewrite 66 dB). The division form is the same function;
in fp32 it differs from torch's SiLU by rounding only (a property test bounds it). Its cost: the ``exp(-x)``
tensor gets its own 16-bit min-max range, which is wide when inputs are very negative; the export's HTP and
fp32 comparisons report what that costs on the model at hand.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

TORCH_REWRITES = ("silu-as-division",)
ONNX_REWRITES = ("layernorm-identity-mul", "mask-floor")
REWRITES = TORCH_REWRITES + ONNX_REWRITES


class SiLUAsDivision(nn.Module):
    """``x / (1 + exp(-x))``: SiLU, exported as Neg, Exp, Add, Div instead of Sigmoid, Mul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (1 + torch.exp(-x))


def silu_as_division(model: nn.Module) -> int:
    """Replace every ``nn.SiLU`` submodule of ``model`` in place; returns how many were replaced.

    Functional ``F.silu`` calls are left alone: the ones in these models (the ControlNet's conditioning
    embedding) follow a convolution, not a normalisation, and agree on the HTP as they are.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.SiLU):
                setattr(parent, name, SiLUAsDivision())
                replaced += 1
    return replaced


def layernorm_identity_mul(model: onnx.ModelProto) -> int:
    """Follow every LayerNormalization output that feeds another op with ``Mul(x, 1.0)``, in place.

    ``layernorm-identity-mul``. Why: a 16-bit LayerNormalization output feeding an op with a per-channel weight
    (the MHA attention's ``to_q/to_k/to_v`` MatMul, or a Gemm or 1x1 Conv) comes back from the HTP with its rows
    written at the wrong stride when the sequence has 16 tokens (the 4x4 mid block of a 32x32 latent's UNet at
    1/8, or any 4x4 map): -1 dB against the CPU, while per-tensor weights, 8-bit activations, other sequence
    lengths or any other producer agree at 70 dB. An exact ``Mul`` by one between them, quantized by AIMET like
    any activation (its range is the LayerNorm's), restores agreement. ``x * 1.0 == x`` in IEEE arithmetic, so
    the float graph's outputs are bit-identical (a test checks it). Returns the number of Muls inserted.
    """
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inserted = 0
    for position, node in reversed(list(enumerate(graph.node))):
        if node.op_type != "LayerNormalization" or not consumers.get(node.output[0]):
            continue
        source, one = node.output[0], f"{node.name or node.output[0]}/identity_one"
        result = f"{source}/identity_mul"
        graph.initializer.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), one))
        for consumer in consumers[source]:
            consumer.input[:] = [result if name == source else name for name in consumer.input]
        graph.node.insert(position + 1, helper.make_node("Mul", [source, one], [result],
                                                         name=f"{node.name or source}/identity_mul"))
        inserted += 1
    return inserted


# A masked attention score: transformers (and SHACLIPAttention, as it) add the dtype's lowest value, -3.4e38 in
# float32. Any constant at or below MASKED is such a mask entry.
MASKED = -1e30
MASK_FLOOR = -1000.0


def mask_floor(model: onnx.ModelProto, floor: float = MASK_FLOOR, base_dir: str | os.PathLike = "") -> int:
    """Raise every float constant (initializer) entry at or below :data:`MASKED` to ``floor``, in place; returns the
    number of constants changed. Constants stored outside the graph (a model over 2 GB, loaded without its external
    data) are read from ``base_dir``, the graph file's folder; a changed one is stored in the graph from then on.

    ``mask-floor``. Why: the text encoder's causal mask adds -3.4e38 to the masked scores; the tensor of scores plus
    mask is then quantized over a range of 3.4e38, and with 16 bits every real score falls into one step.
    ai-hub-models clamps the mask to -1e4 for the same reason (an open AIMET issue). The tiny text encoder's QDQ
    graph against float: 12 dB with the mask as it is, 29.5 dB at -1e4 (its 16-bit step is still 0.15), 37.4 dB
    at -1000, 37.7 dB at -100.
    Exact in float32 where it matters: a masked probability is ``exp(floor + s_masked - s_max)`` relative to the
    row's largest, and float32's exp is exactly 0 below -104, so the outputs are bit-identical unless a masked score
    exceeds the row's largest unmasked one by more than 896 (the float export's comparison with torch shows it on
    every export).
    """
    changed = 0
    for initializer in model.graph.initializer:
        if initializer.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        values = numpy_helper.to_array(initializer, str(base_dir))
        if values.size and values.min() <= MASKED:
            initializer.CopyFrom(numpy_helper.from_array(np.maximum(values, floor).astype(values.dtype),
                                                         initializer.name))
            changed += 1
    return changed


def unshare_initializers(model: onnx.ModelProto) -> int:
    """Give every node its own copy of each initializer it shares with another, in place; returns the copies made.

    torch's exporter stores equal constants once: a seeded model's zero biases (CLIP's, whose init zeroes them)
    become one initializer feeding many Gemm/Conv nodes. aimet-onnx computes a bias's encoding from its consumer's
    weight and input scales, so a bias with two consumers gets no correct encoding (its ConnectedGraph warns so).
    aimet-onnx's own ``duplicate_shared_initializers`` is its advice; a copy of an external-data initializer points
    at the same bytes of ``model.data``, so nothing is written twice. The float graph computes the same."""
    from aimet_onnx.utils import duplicate_shared_initializers

    return duplicate_shared_initializers(model.graph)


def apply_rewrites(model: nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Apply the named torch-level rewrites in place; returns the number of modules each one replaced.
    ONNX-level names are checked here and applied to the exported graph by :func:`apply_onnx_rewrites`."""
    unknown = sorted(set(names) - set(REWRITES))
    if unknown:
        raise ValueError(f"unknown rewrite(s) {unknown}; known: {list(REWRITES)}")
    counts = {}
    if "silu-as-division" in names:
        counts["silu-as-division"] = silu_as_division(model)
    return counts


def apply_onnx_rewrites(model: onnx.ModelProto, names: list[str] | tuple[str, ...],
                        base_dir: str | os.PathLike = "") -> dict[str, int]:
    """Apply the named ONNX-level rewrites to ``model`` in place; returns what each one inserted. ``base_dir`` is
    where the graph's external data lies, when it was loaded without it."""
    counts = {}
    if "layernorm-identity-mul" in names:
        counts["layernorm-identity-mul"] = layernorm_identity_mul(model)
    if "mask-floor" in names:
        counts["mask-floor"] = mask_floor(model, base_dir=base_dir)
    return counts
