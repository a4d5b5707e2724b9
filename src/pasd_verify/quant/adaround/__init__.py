"""AdaRound with memory bounded by design: AIMET's optimisation, without AIMET's copies.

aimet-torch's ``Adaround.apply_adaround`` deep-copies the model into a QuantizationSimModel, pickles every
calibration batch, and for each layer gathers the inputs and outputs of all samples in lists joined by
``torch.cat`` (REFERENCE section 6). This module runs the same optimisation with:

- one copy of the weights: the float model is the reference; its "quantized" form is the same modules with
  forward hooks that swap in the weights rounded so far (kept as integer codes, a quarter of float32 or less);
- activation buffers allocated once per layer and filled in place, in float32 or float16, in memory up to a
  byte budget and in files beyond it (plain reads and writes, not mmap, whose pages would count as resident);
- block-wise sampling: the inputs of each top-level block (``down_blocks.1``, ``mid_block``, ...) are captured
  once per block by a partial forward, and inside it the inputs of each module that holds several groups of
  layers (a resnet, a transformer block, an attention) by replaying the block; only the innermost module around
  a group is run to give its layers' inputs and targets.

The maths is AIMET's own: the quantization grid of every weight comes from AIMET's quantizer with AIMET's
encoding analyzer, the loss is AIMET's ``AdaroundLoss`` (reconstruction + annealed rounding regulariser), the
soft rounding is AIMET's rectified sigmoid, Adam on 32-sample minibatches, the same warm start and defaults.
As in AIMET's quantization sim, the quantized path also rounds GroupNorm/LayerNorm weights to nearest.
"""

from __future__ import annotations

# the parts, in dependency order: config <- grid <- cache <- plan <- optimize <- capture <- model
from .cache import ActivationCache
from .config import LAYER_TYPES, MINIBATCH, NEAREST_TYPES, AdaroundConfig, AdaroundError
from .grid import WeightGrid, aimet_quantizer, dequantize, initial_alpha, integer_codes, soft_rounded, weight_grid
from .model import AdaroundResult, adaround, aimet_act_funcs
from .optimize import LayerReport, optimize_layer, reconstruction_backward
from .plan import plan_layers

__all__ = [
    "LAYER_TYPES",
    "MINIBATCH",
    "NEAREST_TYPES",
    "ActivationCache",
    "AdaroundConfig",
    "AdaroundError",
    "AdaroundResult",
    "LayerReport",
    "WeightGrid",
    "adaround",
    "aimet_act_funcs",
    "aimet_quantizer",
    "dequantize",
    "initial_alpha",
    "integer_codes",
    "optimize_layer",
    "plan_layers",
    "reconstruction_backward",
    "soft_rounded",
    "weight_grid",
]
