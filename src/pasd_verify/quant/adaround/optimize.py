"""Per layer: AIMET's optimisation of one layer's rounding on its cached inputs and targets."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from aimet_torch.adaround.adaround_loss import AdaroundHyperParameters, AdaroundLoss
from torch import nn
from tqdm.auto import tqdm

from .cache import _Rows
from .config import MINIBATCH, AdaroundConfig
from .grid import WeightGrid, dequantize, initial_alpha, integer_codes, soft_rounded


@dataclass
class LayerReport:
    name: str
    shape: list[int]
    iterations: int
    mse_nearest: float
    mse_soft_before: float
    mse_after: float
    seconds: float
    peak_rss_bytes: int
    cache_bytes_in_memory: int
    cache_bytes_on_disk: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, layer.bias)


def reconstruction_backward(layer: nn.Module, weight: torch.Tensor, alpha: nn.Parameter, grid: WeightGrid,
                            inputs: _Rows, targets: _Rows, indices: list[int], act: Callable, chunk: int,
                            device: torch.device) -> None:
    """Add the gradient of AIMET's reconstruction loss over the rows ``indices`` to ``alpha.grad``.

    AIMET's loss is a mean over the minibatch's rows, so its gradient is the row-weighted sum of the gradients of
    chunks of rows: the same step, holding the activations of ``chunk`` rows at a time instead of all of them.
    The soft-rounded weight is computed once per step: the chunks add their gradients up on it, and one backward
    carries the sum to ``alpha`` (the chain rule is linear in the upstream gradient).
    """
    soft = soft_rounded(weight, alpha, grid)
    chunked = len(indices) > chunk
    shared = soft.detach().requires_grad_() if chunked else soft
    for start in range(0, len(indices), chunk):
        part = indices[start:start + chunk]
        x = inputs.read(part).to(device, weight.dtype)
        y = act(targets.read(part).to(device, weight.dtype))
        out = act(_layer_output(layer, x, shared))
        (AdaroundLoss.compute_recon_loss(out, y) * (len(part) / len(indices))).backward()
    if chunked:
        soft.backward(shared.grad)


def optimize_layer(layer: nn.Module, grid: WeightGrid, inputs: _Rows, targets: _Rows, config: AdaroundConfig,
                   act_func: nn.Module | None, device: torch.device, generator: torch.Generator,
                   progress: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """AIMET's per-layer optimisation on cached inputs (quantized path) and targets (float path).

    Returns the learned alpha and the reconstruction MSEs, computed as AIMET logs them: on the first sample,
    nearest rounding (hard rounding at the warm start), soft rounding before, hard rounding after.
    """
    weight = layer.weight.detach().to(device, torch.float32)
    grid = WeightGrid(grid.scale.to(device), grid.offset.to(device), grid.qmin, grid.qmax, grid.encodings)
    alpha = nn.Parameter(initial_alpha(weight, grid))
    iterations = config.num_iterations
    params = AdaroundHyperParameters(iterations, config.reg_param, config.beta_range, config.warm_start)
    act = act_func or (lambda t: t)

    first = list(range(inputs.first_batch))  # AIMET measures on the first calibration batch

    def mses() -> tuple[float, float]:
        x0 = inputs.read(first).to(device, torch.float32)
        y0 = act(targets.read(first).to(device, torch.float32))
        with torch.no_grad():
            hard = act(_layer_output(layer, x0, dequantize(integer_codes(weight, alpha, grid), grid)))
            soft = act(_layer_output(layer, x0, soft_rounded(weight, alpha, grid)))
        return F.mse_loss(hard, y0).item(), F.mse_loss(soft, y0).item()

    nearest, soft_before = mses()
    optimizer = torch.optim.Adam([alpha])
    rows = inputs.rows
    row_bytes = 4 * (math.prod(inputs.shape) + 3 * math.prod(targets.shape))  # x; y, output and its gradient
    chunk = max(1, min(MINIBATCH, config.working_bytes // row_bytes))
    # an inner bar only where a layer takes long enough to watch
    for iteration in tqdm(range(iterations), desc="iterations", leave=False, unit="it",
                          disable=not progress or iterations < 500):
        indices = torch.randperm(rows, generator=generator)[:MINIBATCH].tolist()
        optimizer.zero_grad()
        reconstruction_backward(layer, weight, alpha, grid, inputs, targets, indices, act, chunk, device)
        round_loss = AdaroundLoss.compute_round_loss(alpha, params, iteration)
        if isinstance(round_loss, torch.Tensor):  # AIMET returns a plain 0 during its warm start
            round_loss.backward()
        optimizer.step()
    after, _ = mses()
    return alpha.detach(), {"mse_nearest": nearest, "mse_soft_before": soft_before, "mse_after": after}
