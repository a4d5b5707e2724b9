"""AIMET calls: quantization simulation of our models and export of its encodings (real aimet-torch)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from aimet_torch.common import quantsim as aimet_quantsim_settings
from aimet_torch.common.utils import AimetLogger
from aimet_torch.quantsim import QuantizationSimModel
from aimet_torch.nn import QuantizationMixin
from diffusers.models.embeddings import Timesteps
from torch import nn

from ..encodings import SUPPORTED_VERSIONS, EncodingsError
from ..logs import quiet_loggers


@contextmanager
def aimet_torch_session() -> Iterator[None]:
    """What building an aimet-torch simulation needs, for its duration only (importing this package changes nothing).

    - AIMET has no quantized definition of diffusers' sinusoidal ``Timesteps`` (it computes an embedding from integer
      timesteps, which quantizing would only damage): it stays float, as the QNN reference flow leaves it (AIMET
      keeps that choice for the process; it is the same choice every simulation here makes).
    - AIMET logs every quantizer decision at INFO/WARNING to the console: quiet unless pasd-verify's own logging is
      at INFO (``--verbose``).
    - AIMET quantizes transformers' ``GELUActivation`` but has no definition of CLIP's ``QuickGELUActivation``: one
      is registered the way AIMET defines its own (input and output quantizer around the module's own forward),
      where transformers is loaded.
    """
    QuantizationMixin.ignore(Timesteps)
    _register_quick_gelu()
    with quiet_loggers(area.value for area in AimetLogger.LogAreas):
        yield


def _register_quick_gelu() -> None:
    """AIMET's unary-activation definition (as its ``QuantizedGELU`` for transformers' ``GELUActivation``) for CLIP's
    ``QuickGELUActivation``, once, when transformers' activations are loaded (a model can only hold one then)."""
    activations = sys.modules.get("transformers.activations")
    if activations is None or activations.QuickGELUActivation in QuantizationMixin.cls_to_qcls:
        return

    @QuantizationMixin.implements(activations.QuickGELUActivation)
    class QuantizedQuickGELUActivation(QuantizationMixin, activations.QuickGELUActivation):
        __quant_init__ = QuantizationMixin.__unary__

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            (input_quantizer,), (output_quantizer,) = self.input_quantizers, self.output_quantizers
            if input_quantizer:
                x = input_quantizer(x)
            out = super().forward(x)
            return output_quantizer(out) if output_quantizer else out


_CONFIGS = Path(aimet_quantsim_settings.__file__).parent / "quantsim_config"
QUANTSIM_CONFIGS = {"per_channel": _CONFIGS / "default_config_per_channel.json",
                    "per_tensor": _CONFIGS / "default_config.json"}


def quantize(model: nn.Module, dummy_inputs: Sequence[torch.Tensor], *, weights: str = "per_channel",
             param_bw: int = 8, output_bw: int = 16,
             configure: Callable[[QuantizationSimModel], None] | None = None) -> QuantizationSimModel:
    """An AIMET ``QuantizationSimModel`` of ``model`` (not changed), calibrated on ``dummy_inputs``. ``configure``
    is given the sim before calibration, to change its quantizers (AIMET's
    ``set_grouped_blockwise_quantization_for_weights`` for LPBQ, say)."""
    if weights not in QUANTSIM_CONFIGS:
        raise ValueError(f"weights must be one of {sorted(QUANTSIM_CONFIGS)}, got {weights!r}")
    dummy = tuple(dummy_inputs)
    with aimet_torch_session():
        sim = QuantizationSimModel(model, dummy_input=dummy, default_param_bw=param_bw, default_output_bw=output_bw,
                                   config_file=str(QUANTSIM_CONFIGS[weights]))
        if configure is not None:
            configure(sim)
        sim.compute_encodings(lambda m, _: m(*dummy), None)
    return sim


@contextmanager
def _encoding_version(version: str):
    """AIMET reads the export format from a module setting; set it for one export only."""
    if version not in SUPPORTED_VERSIONS:
        raise EncodingsError(f"encoding version {version!r} is not one of {SUPPORTED_VERSIONS}")
    previous = aimet_quantsim_settings.encoding_version
    aimet_quantsim_settings.encoding_version = version
    try:
        yield
    finally:
        aimet_quantsim_settings.encoding_version = previous


def export_encodings(sim: QuantizationSimModel, dummy_inputs: Sequence[torch.Tensor], path: str | os.PathLike,
                     *, version: str = "1.0.0") -> Path:
    """Export ``sim`` with AIMET and keep only its ``.encodings`` file, written to ``path``."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp, _encoding_version(version), aimet_torch_session():
        sim.export(tmp, "model", dummy_input=tuple(dummy_inputs))
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.path.join(tmp, "model.encodings"), path)
    return path
