"""The grid: AIMET's quantizer computes it; rounding, soft rounding and dequantizing on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from aimet_torch.common.defs import AdaroundConstants
from aimet_torch.quantization.affine import QuantizeDequantize

from .config import _ANALYZERS, AdaroundConfig


@dataclass
class WeightGrid:
    """A weight's quantization grid as AIMET computed it: dequantized value = (q + offset) * scale, q in
    [qmin, qmax]; ``encodings`` is AIMET's own 0.6.1 form, one entry per channel."""

    scale: torch.Tensor
    offset: torch.Tensor
    qmin: int
    qmax: int
    encodings: list[dict[str, Any]]


def aimet_quantizer(weight: torch.Tensor, bitwidth: int, per_channel: bool, quant_scheme: str) -> QuantizeDequantize:
    """AIMET's symmetric weight quantizer for ``weight``, with its encodings computed by AIMET's analyzer."""
    shape = (weight.shape[0],) + (1,) * (weight.ndim - 1) if per_channel else ()
    quantizer = QuantizeDequantize(shape, bitwidth, True, _ANALYZERS[quant_scheme](shape)).to(weight.device)
    with torch.no_grad(), quantizer.compute_encodings():
        quantizer(weight.detach().float())
    return quantizer


def weight_grid(weight: torch.Tensor, config: AdaroundConfig) -> WeightGrid:
    quantizer = aimet_quantizer(weight, config.param_bw, config.weights == "per_channel", config.quant_scheme)
    # scale and offset keep the quantizer's shape ((C, 1, ...) per channel, () per tensor) and broadcast: kept
    # for every rounded layer, weight-sized copies would double the model's memory and the cost of dequantizing
    with torch.no_grad():
        scale, offset = quantizer.get_scale().detach(), quantizer.get_offset().detach()
    return WeightGrid(scale, offset, quantizer.qmin, quantizer.qmax, quantizer.get_legacy_encodings())


def _rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    zeta, gamma = AdaroundConstants.ZETA, AdaroundConstants.GAMMA
    return torch.clamp(torch.sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)


def initial_alpha(weight: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """AIMET's warm start: the alpha whose soft rounding reproduces the float weight exactly."""
    zeta, gamma = AdaroundConstants.ZETA, AdaroundConstants.GAMMA
    scaled = weight.detach().float() / grid.scale
    rest = scaled - torch.floor(scaled)
    return -torch.log((zeta - gamma) / (rest - gamma) - 1)


def integer_codes(weight: torch.Tensor, alpha: torch.Tensor | None, grid: WeightGrid) -> torch.Tensor:
    """The rounded weight's integers q (hard rounding: up where alpha >= 0; nearest when ``alpha`` is None)."""
    scaled = weight.detach().float() / grid.scale
    up = (alpha >= 0).float() if alpha is not None else (scaled - torch.floor(scaled) >= 0.5).float()
    return torch.clamp(torch.floor(scaled) + up - grid.offset, grid.qmin, grid.qmax)


def dequantize(codes: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    return (codes.float() + grid.offset) * grid.scale


def soft_rounded(weight: torch.Tensor, alpha: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """AIMET's soft-rounded weight, differentiable in ``alpha`` (float32, or float64 for a float64 weight)."""
    scaled = torch.floor(weight.detach().to(torch.promote_types(weight.dtype, torch.float32)) / grid.scale) \
        + _rectified_sigmoid(alpha)
    return (torch.clamp(scaled - grid.offset, grid.qmin, grid.qmax) + grid.offset) * grid.scale


def _code_dtype(grid: WeightGrid) -> torch.dtype:
    """The narrowest integer dtype that holds both ends of the grid (the codes are kept for every rounded layer)."""
    for dtype in (torch.int8, torch.int16):
        if torch.iinfo(dtype).min <= grid.qmin and grid.qmax <= torch.iinfo(dtype).max:
            return dtype
    return torch.int32
