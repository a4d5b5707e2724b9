"""The AdaRound workloads the memory benchmarks run in child processes (:func:`pasd_verify.memory.peak_rss_of`).

Each builds its model and seeded calibration data, then AdaRounds it with one implementation: aimet-torch's own
``apply_adaround`` in its cached or its uncached mode (the baseline), or ours with the activation cache in memory or
on disk. Model, data, seeds and iterations are the same for every implementation, so their costs compare.

Targets:
- ``sd15_ff_layer``: one SD1.5 feed-forward layer, ``Linear(320, 2560)`` over 4096 tokens (a 64x64 latent), the
  layer REFERENCE section 6 measured AIMET on (45 MiB of input and output activations per sample);
- ``tiny_pasd_unet``: the tiny PASD UNet in SHA form, calibrated on its ControlNet's residuals;
- ``sd15_pasd_unet``: the SD1.5-size PASD UNet in SHA form (random weights), ours only.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..presets import build_pasd
from ..sha import convert_to_sha
from ..memory import peak_rss_bytes

from .adaround import LAYER_TYPES, AdaroundConfig, adaround, aimet_act_funcs
from .calibration import model_calls, seeded_samples
from .reference import aimet_adaround, aimet_rows, timed_aimet_layers

IMPLEMENTATIONS = ("aimet_cached", "aimet_uncached", "ours", "ours_disk")
TARGETS = ("sd15_ff_layer", "tiny_pasd_unet", "sd15_pasd_unet")
FF_TOKENS, FF_IN, FF_OUT = 4096, 320, 2560


def _ff_layer(samples: int, seed: int) -> tuple[nn.Module, list[tuple[torch.Tensor, ...]], dict]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(FF_IN, FF_OUT)).eval()
    g = torch.Generator().manual_seed(seed)
    rows = [(torch.randn(FF_TOKENS, FF_IN, generator=g),) for _ in range(samples)]
    return model, rows, {}


def _pasd_unet(preset: str, samples: int, seed: int, latent: tuple[int, int]):
    unet, controlnet = build_pasd(preset, seed=seed)
    convert_to_sha(unet)
    data = seeded_samples(unet, samples, latent=latent, seed=seed)
    return unet.eval(), controlnet.eval(), data


def adaround_run(target: str, implementation: str, samples: int, iterations: int, param_bw: int = 4,
                 latent: list[int] | None = None, cache_budget: int | None = None, seed: int = 0) -> dict[str, Any]:
    """AdaRound ``target`` with ``implementation`` on ``samples`` seeded samples; return layers and seconds.

    ``ours`` keeps its activation cache in memory unless ``cache_budget`` bounds it; ``ours_disk`` keeps all of it
    in files (budget 0), which is what makes its memory flat in the number of samples.
    """
    if target not in TARGETS or implementation not in IMPLEMENTATIONS:
        raise ValueError(f"target must be one of {TARGETS} and implementation one of {IMPLEMENTATIONS}")
    np.random.seed(seed)  # AIMET's uncached mode draws its samples with numpy
    if target == "sd15_ff_layer":
        model, rows, acts = _ff_layer(samples, seed)
        wrapped, prefix = model, ""
        calls = [lambda m, row=row: m(*(t.unsqueeze(0) for t in row)) for row in rows]
    else:
        preset = "tiny" if target == "tiny_pasd_unet" else "sd15"
        model, controlnet, data = _pasd_unet(preset, samples, seed, tuple(latent or (8, 8)))
        wrapped, rows = aimet_rows(model, data, controlnet)
        prefix = "unet."
        acts = aimet_act_funcs(wrapped, tuple(t.unsqueeze(0) for t in rows[0]), prefix=prefix)
        calls = model_calls(model, data, partner=controlnet)
    start = time.perf_counter()
    if implementation.startswith("aimet"):
        aimet_adaround(wrapped, rows, iterations=iterations, param_bw=param_bw,
                       cached=implementation == "aimet_cached", seed=seed)
        layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    else:
        budget = 0 if implementation == "ours_disk" else cache_budget
        config = AdaroundConfig(param_bw=param_bw, iterations=iterations, cache_budget=budget, seed=seed)
        layers = len(adaround(model, calls, config, act_funcs=acts, progress=False).layers)
    seconds = time.perf_counter() - start
    return {"layers": layers, "seconds": seconds, "seconds_per_layer": seconds / layers,
            "peak_rss_bytes": peak_rss_bytes()}


def aimet_sampled_run(preset: str, samples: int, iterations: int, latent: list[int], layers: int,
                      seed: int = 0) -> dict[str, Any]:
    """aimet-torch's own ``apply_adaround`` (cached mode) on the SHA PASD UNet of ``preset``, rounding ``layers``
    layers evenly spread over the model's order and leaving the rest unquantized: its set-up (QuantizationSimModel,
    connected graph, calibration batches pickled) is the whole model's, and each sampled layer costs what it
    costs in a whole run (a partial forward of the float and of the quantized model per sample, then the
    optimisation). Returns the set-up seconds, the sampled layers with their seconds, and the layer count,
    from which a whole run's time is estimated."""
    np.random.seed(seed)
    model, controlnet, data = _pasd_unet(preset, samples, seed, tuple(latent))
    wrapped, rows = aimet_rows(model, data, controlnet)
    del controlnet
    names = [f"unet.{n}" for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    step = max(1, len(names) // layers)
    chosen = names[step // 2::step][:layers]
    seconds: list[float] = []
    start = time.perf_counter()
    with timed_aimet_layers(seconds):
        aimet_adaround(wrapped, rows, iterations=iterations, cached=True, seed=seed,
                       ignore=[n for n in names if n not in chosen])
    total = time.perf_counter() - start
    return {"layers_in_model": len(names), "sampled": dict(zip(chosen, seconds)), "seconds": total,
            "setup_seconds": total - sum(seconds), "peak_rss_bytes": peak_rss_bytes()}
