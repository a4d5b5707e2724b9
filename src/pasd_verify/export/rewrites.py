"""Rewrites of the float model that are equal in exact arithmetic and change what the HTP compiler sees.

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

import torch
from torch import nn

REWRITES = ("silu-as-division",)


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


def apply_rewrites(model: nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Apply the named rewrites in place; returns the number of modules each one replaced."""
    unknown = sorted(set(names) - set(REWRITES))
    if unknown:
        raise ValueError(f"unknown rewrite(s) {unknown}; known: {list(REWRITES)}")
    counts = {}
    if "silu-as-division" in names:
        counts["silu-as-division"] = silu_as_division(model)
    return counts
