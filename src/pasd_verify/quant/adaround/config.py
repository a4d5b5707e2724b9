"""AdaRound's settings and errors, and the constants the other parts share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from aimet_torch.quantization.encoding_analyzer import MinMaxEncodingAnalyzer, TfEnhancedEncodingAnalyzer
from torch import nn

from ...errors import PasdVerifyError

LAYER_TYPES = (nn.Conv2d, nn.Linear)
# Modules whose weight AIMET's default config quantizes (to nearest) besides the AdaRounded layers.
NEAREST_TYPES = (nn.GroupNorm, nn.LayerNorm)
MINIBATCH = 32  # AIMET's AdaroundOptimizer BATCH_SIZE
_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_ANALYZERS = {"tf_enhanced": TfEnhancedEncodingAnalyzer, "tf": MinMaxEncodingAnalyzer}


class AdaroundError(PasdVerifyError):
    """AdaRound cannot run on this model, configuration or calibration data."""


@dataclass(frozen=True)
class AdaroundConfig:
    """AdaRound settings; the defaults are aimet-torch 2.42's (``AdaroundParameters`` and ``apply_adaround``).

    ``iterations`` None means AIMET's default: 10,000 per layer, 15,000 below 8 bits. ``cache_budget`` is the
    number of bytes activation buffers may take in memory; buffers beyond it live in files under ``cache_dir``
    (a temporary folder by default). ``working_bytes`` bounds the activations one optimisation step holds at a
    time: a minibatch larger than that is processed in chunks whose gradients add up to the minibatch's.
    ``device`` runs the optimisation and the block forwards; caches stay on the host and only chunks move.
    ``only`` restricts AdaRound to the layers under these module names (``("up_blocks.3", "mid_block")``): the
    rest keep their float weights, as when a long run is split into parts. ``share_inputs`` captures once the
    input several layers read (exact; False captures it per layer, to check that it changes nothing). Each layer
    draws its minibatches from its own generator, seeded with ``seed`` plus its position in forward order, so
    the order in which layers are optimised does not change their result. ``nested_replay`` replays the
    innermost module around a group (a transformer block, an attention) rather than its whole top-level block
    (exact; False replays top-level blocks only, to check that it changes nothing).
    """

    param_bw: int = 4
    iterations: int | None = None
    reg_param: float = 0.01
    beta_range: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    weights: str = "per_channel"
    quant_scheme: str = "tf_enhanced"
    cache_dtype: str = "float32"
    cache_budget: int | None = None
    cache_dir: str | None = None
    working_bytes: int = 64 * 2**20
    device: str = "cpu"
    seed: int = 0
    only: tuple[str, ...] = ()
    share_inputs: bool = True
    nested_replay: bool = True

    def __post_init__(self):
        if not 2 <= self.param_bw <= 16:
            raise AdaroundError(f"param_bw must be 2..16, got {self.param_bw}")
        if self.iterations is not None and self.iterations < 1:
            raise AdaroundError(f"iterations must be positive, got {self.iterations}")
        if self.weights not in ("per_channel", "per_tensor"):
            raise AdaroundError(f"weights must be 'per_channel' or 'per_tensor', got {self.weights!r}")
        if self.quant_scheme not in _ANALYZERS:
            raise AdaroundError(f"quant_scheme must be one of {sorted(_ANALYZERS)}, got {self.quant_scheme!r}")
        if self.cache_dtype not in _CACHE_DTYPES:
            raise AdaroundError(f"cache_dtype must be one of {sorted(_CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.working_bytes < 1:
            raise AdaroundError(f"working_bytes must be positive, got {self.working_bytes}")
        if self.cache_budget is not None and self.cache_budget < 0:
            raise AdaroundError(f"cache_budget must be >= 0 bytes, got {self.cache_budget}")
        if not 0 <= self.warm_start < 1:
            raise AdaroundError(f"warm_start must be in [0, 1), got {self.warm_start}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise AdaroundError(f"device must be cpu, cuda or cuda:N, got {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise AdaroundError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise AdaroundError(f"device {self.device!r} was asked for, but torch sees no CUDA device")

    @property
    def num_iterations(self) -> int:
        if self.iterations is not None:
            return self.iterations
        return 15000 if self.param_bw < 8 else 10000
