"""AIMET calls: quantization simulation of our models and export of its encodings (real aimet-torch)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
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

# AIMET has no quantized definition of diffusers' sinusoidal Timesteps (it computes an embedding from integer
# timesteps, which quantizing would only damage); leave it in float, as the QNN reference flow does.
QuantizationMixin.ignore(Timesteps)


def set_aimet_log_level(level: int) -> None:
    """AIMET logs every quantizer decision at INFO/WARNING to the console; our tools show it only when asked."""
    for area in AimetLogger.LogAreas:
        logging.getLogger(area.value).setLevel(level)


set_aimet_log_level(logging.ERROR)

_CONFIGS = Path(aimet_quantsim_settings.__file__).parent / "quantsim_config"
QUANTSIM_CONFIGS = {"per_channel": _CONFIGS / "default_config_per_channel.json",
                    "per_tensor": _CONFIGS / "default_config.json"}


class UNetForQuantization(nn.Module):
    """A UNet whose forward takes plain tensors and returns one, as AIMET's tracing needs."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def quantize(model: nn.Module, dummy_inputs: Sequence[torch.Tensor], *, weights: str = "per_channel",
             param_bw: int = 8, output_bw: int = 16,
             configure: Callable[[QuantizationSimModel], None] | None = None) -> QuantizationSimModel:
    """An AIMET ``QuantizationSimModel`` of ``model`` (not changed), calibrated on ``dummy_inputs``. ``configure``
    is given the sim before calibration, to change its quantizers (AIMET's
    ``set_grouped_blockwise_quantization_for_weights`` for LPBQ, say)."""
    if weights not in QUANTSIM_CONFIGS:
        raise ValueError(f"weights must be one of {sorted(QUANTSIM_CONFIGS)}, got {weights!r}")
    dummy = tuple(dummy_inputs)
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
    with tempfile.TemporaryDirectory() as tmp, _encoding_version(version):
        sim.export(tmp, "model", dummy_input=tuple(dummy_inputs))
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.path.join(tmp, "model.encodings"), path)
    return path
