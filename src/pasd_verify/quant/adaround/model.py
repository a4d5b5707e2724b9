"""The whole model: AdaRound every layer in forward order, block by block, and fold the rounded weights in."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...io import raise_if_interrupted
from ...memory import peak_rss_bytes
from .cache import ActivationCache
from .capture import _capture, _Levels
from .config import _CACHE_DTYPES, LAYER_TYPES, AdaroundConfig, AdaroundError
from .grid import WeightGrid, _code_dtype, dequantize, integer_codes, weight_grid
from .optimize import LayerReport, optimize_layer
from .plan import _QuantizedMode, plan_layers


@dataclass
class AdaroundResult:
    """What :func:`adaround` did: per-layer reports, each layer's grid and AIMET-form encodings."""

    layers: list[LayerReport] = field(default_factory=list)
    grids: dict[str, WeightGrid] = field(default_factory=dict)
    seconds: float = 0.0
    samples: int = 0

    def param_encodings(self, prefix: str = "") -> dict[str, list[dict[str, Any]]]:
        """``{"<prefix><layer>.weight": [AIMET 0.6.1 encoding per channel]}`` for every AdaRounded layer."""
        return {f"{prefix}{name}.weight": grid.encodings for name, grid in self.grids.items()}

    def summary(self) -> dict[str, Any]:
        reports = self.layers
        gain = [r.mse_nearest / r.mse_after for r in reports if r.mse_after > 0]
        return {
            "layers": len(reports),
            "samples": self.samples,
            "seconds": self.seconds,
            "mse_nearest_total": sum(r.mse_nearest for r in reports),
            "mse_after_total": sum(r.mse_after for r in reports),
            "layers_improved": sum(r.mse_after < r.mse_nearest for r in reports),
            "median_gain_over_nearest": sorted(gain)[len(gain) // 2] if gain else None,
            "peak_rss_bytes": max((r.peak_rss_bytes for r in reports), default=0),
        }


def adaround(model: nn.Module, calls: Sequence[Callable[[nn.Module], Any]], config: AdaroundConfig = AdaroundConfig(),
             *, act_funcs: dict[str, nn.Module | None] | None = None, progress: bool = True,
             on_layer: Callable[[LayerReport], None] | None = None) -> AdaroundResult:
    """AdaRound every Conv2d and Linear of ``model`` in place; ``calls`` run the model on one calibration sample
    each (``lambda m: m(**inputs)``). Layers are optimized in forward order, as AIMET does; on return their
    weights are the hard-rounded values, exactly on the grids of ``result.grids``.

    ``act_funcs`` maps a layer name to the activation AIMET's connected graph finds right after it (its loss is
    taken after that activation); see :func:`aimet_act_funcs`.
    """
    if not calls:
        raise AdaroundError("no calibration samples")
    device = torch.device(config.device)  # checked by AdaroundConfig
    started = time.perf_counter()
    model.eval().to(device)
    plan = plan_layers(model, calls[0], config.only, config.share_inputs, config.nested_replay)
    if not plan.layers:
        raise AdaroundError(f"no Conv2d or Linear layer under {list(config.only)} runs in the model's forward")
    quantized = _QuantizedMode(model, config)
    cache = ActivationCache(_CACHE_DTYPES[config.cache_dtype], config.cache_budget, config.cache_dir)
    levels = _Levels(model, calls, plan.units, quantized, cache, device)
    last_use = {name: i for i, group in enumerate(plan.groups) for name in group.path}
    result = AdaroundResult(samples=len(calls))
    act_funcs = act_funcs or {}
    bar = tqdm(total=plan.layers, desc="adaround", unit="layer", disable=not progress)
    try:
        for position, group in enumerate(plan.groups):
            raise_if_interrupted()  # a stop a library swallowed ends the run here, not after the last layer
            start = time.perf_counter()
            level = levels.enter(group.path)
            modules = [layer for _, layer in group.layers]
            names = [name for name, _ in group.layers]
            with quantized.active():
                [inputs] = _capture(level.module, modules[:1], names[:1], level.quant_inputs, len(calls), cache, device,
                                    "input")
            targets = _capture(level.module, modules, names, level.float_inputs, len(calls), cache, device, "output")
            # inputs no later group needs are freed before optimising
            levels.leave(next((d for d, lv in enumerate(levels.stack) if last_use[lv.name] <= position),
                              len(levels.stack)))
            capture_seconds = (time.perf_counter() - start) / len(group.layers)
            for (name, layer), target in zip(group.layers, targets):
                start = time.perf_counter()
                grid = weight_grid(layer.weight, config)
                generator = torch.Generator().manual_seed(config.seed + plan.index[name])
                alpha, mses = optimize_layer(layer, grid, inputs, target, config, act_funcs.get(name), device,
                                             generator, progress)
                codes = integer_codes(layer.weight.to(device), alpha, _grid_on(grid, device)).to(_code_dtype(grid))
                quantized.codes[name] = (codes.cpu(), grid)
                result.grids[name] = grid
                report = LayerReport(name, list(layer.weight.shape), config.num_iterations, **mses,
                                     seconds=capture_seconds + time.perf_counter() - start,
                                     peak_rss_bytes=peak_rss_bytes(), cache_bytes_in_memory=cache.bytes_in_memory,
                                     cache_bytes_on_disk=cache.bytes_on_disk)
                target.release()
                result.layers.append(report)
                if on_layer:
                    on_layer(report)
                bar.update(1)
                bar.set_postfix_str(f"{name} mse {mses['mse_nearest']:.3g}->{mses['mse_after']:.3g}")
            inputs.release()
        with torch.no_grad():  # fold: the model's weights become the rounded ones
            for name, (codes, grid) in quantized.codes.items():
                layer = model.get_submodule(name)
                layer.weight.copy_(dequantize(codes.to(layer.weight.device), _grid_on(grid, layer.weight.device)))
    finally:
        levels.leave(0)
        bar.close()
        cache.close()
    result.seconds = time.perf_counter() - started
    return result


def _grid_on(grid: WeightGrid, device) -> WeightGrid:
    return WeightGrid(grid.scale.to(device), grid.offset.to(device), grid.qmin, grid.qmax, grid.encodings)


def aimet_act_funcs(model: nn.Module, dummy_input: tuple, prefix: str = "") -> dict[str, nn.Module | None]:
    """AIMET's own pairing of each layer with the activation right after it (``get_module_act_func_pair``),
    keyed by layer name inside ``model`` (``prefix`` strips a wrapper's name)."""
    from aimet_torch.meta import connectedgraph_utils

    pairs = connectedgraph_utils.get_module_act_func_pair(model, dummy_input)
    names = {m: n for n, m in model.named_modules()}
    return {names[m][len(prefix):]: act for m, act in pairs.items() if isinstance(m, LAYER_TYPES) and act is not None}
