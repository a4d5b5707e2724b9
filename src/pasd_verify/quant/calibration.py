"""Calibration samples for AdaRound and quantization: seeded ones, or a folder a user dumps from a pipeline.

A sample is one denoising step's inputs, one ``.safetensors`` file per sample in a folder:

=========================  =================================  ==========================================
key                        shape                              meaning
=========================  =================================  ==========================================
``latent``                 ``(B, in_channels, h, w)``         the UNet's latent input
``timestep``               ``(B,)`` or ``()``                 the diffusion timestep(s), integer or float
``encoder_hidden_states``  ``(B, tokens, cross_attention)``   the text embedding
``control_image``          ``(B, 3, 8h, 8w)``, in [0, 1]      PASD only: the ControlNet's image
=========================  =================================  ==========================================

Every file must have the same shapes. Errors name the file and the key.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_state_dict_file, save_state_dict_file
from ..errors import PasdVerifyError
from ..models import PASDControlNetModel, PASDUNet2DConditionModel
from ..ranges import LATENT_FACTOR

KEYS = ("latent", "timestep", "encoder_hidden_states")
CONTROL_KEY = "control_image"
TEXT_LENGTH = 77

Sample = dict[str, torch.Tensor]


class CalibrationError(PasdVerifyError):
    """A calibration sample is missing, malformed, or does not fit the model."""


def seeded_samples(model: nn.Module, count: int, *, latent: tuple[int, int] | None = None, seed: int = 0,
                   control: bool = False) -> list[Sample]:
    """``count`` seeded samples of batch 1 for ``model``'s config (latent size defaults to its sample_size)."""
    config = model.config
    if latent is None and config.get("sample_size") is None:
        raise CalibrationError(f"{type(model).__name__} has no sample_size in its config: give the latent size "
                               "(--latent H W)")
    height, width = latent or (config.sample_size, config.sample_size)
    samples = []
    for i in range(count):
        g = torch.Generator().manual_seed(seed * 100003 + i)
        sample = {
            "latent": torch.randn(1, config.in_channels, height, width, generator=g),
            "timestep": torch.randint(0, 1000, (1,), generator=g),
            "encoder_hidden_states": torch.randn(1, TEXT_LENGTH, config.cross_attention_dim, generator=g),
        }
        if control:
            sample[CONTROL_KEY] = torch.rand(1, 3, height * LATENT_FACTOR, width * LATENT_FACTOR, generator=g)
        samples.append(sample)
    return samples


def calibration_samples(model: nn.Module, *, folder: str | os.PathLike | None = None, count: int = 8,
                        latent: tuple[int, int] | None = None, seed: int = 0,
                        controlnet: nn.Module | None = None) -> list[Sample]:
    """The samples a command calibrates ``model`` on: those in ``folder``, else ``count`` seeded ones.

    PASD models need control images; a PASD UNet also needs its ``controlnet`` to make its residuals.
    """
    control = isinstance(model, (PASDUNet2DConditionModel, PASDControlNetModel))
    if isinstance(model, PASDUNet2DConditionModel) and controlnet is None:
        raise CalibrationError("a PASD UNet is calibrated on its ControlNet's residuals: give the ControlNet too")
    if folder is not None:
        return load_samples(folder, model, control=control)
    if count < 1:
        raise CalibrationError(f"--samples must be at least 1, got {count}")
    return seeded_samples(model, count, latent=latent, seed=seed, control=control)


def save_samples(samples: list[Sample], folder: str | os.PathLike) -> list[Path]:
    """Write samples as ``sample_00000.safetensors``, ... (the format :func:`load_samples` reads)."""
    folder = Path(folder)
    paths = []
    for i, sample in enumerate(samples):
        paths.append(folder / f"sample_{i:05d}.safetensors")
        save_state_dict_file({k: v.contiguous() for k, v in sample.items()}, paths[-1])
    return paths


def load_samples(folder: str | os.PathLike, model: nn.Module, *, control: bool = False,
                 limit: int | None = None) -> list[Sample]:
    """Every ``*.safetensors`` sample in ``folder`` (sorted by name), checked against ``model``'s config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: no such calibration folder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CalibrationError(f"{folder}: no .safetensors calibration samples")
    samples = []
    for path in files[:limit]:
        sample = dict(load_state_dict_file(path))
        check_sample(sample, model, str(path), control=control, like=samples[0] if samples else None)
        samples.append(sample)
    return samples


def check_sample(sample: Sample, model: nn.Module, source: str, *, control: bool, like: Sample | None = None) -> None:
    """Raise naming ``source`` and the key for anything in ``sample`` that does not fit ``model``."""
    config = model.config
    wanted = KEYS + ((CONTROL_KEY,) if control else ())
    for key in wanted:
        if key not in sample:
            raise CalibrationError(f"{source}: missing key {key!r}; a sample holds {list(wanted)}")
    for key, tensor in sample.items():
        if key not in wanted:
            raise CalibrationError(f"{source}: unexpected key {key!r}; a sample holds {list(wanted)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CalibrationError(f"{source}: {key} holds NaN or Inf")
    latent, text = sample["latent"], sample["encoder_hidden_states"]
    if latent.ndim != 4 or latent.shape[1] != config.in_channels:
        raise CalibrationError(f"{source}: latent has shape {tuple(latent.shape)}, expected "
                               f"(B, {config.in_channels}, h, w)")
    batch = latent.shape[0]
    if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != config.cross_attention_dim:
        raise CalibrationError(f"{source}: encoder_hidden_states has shape {tuple(text.shape)}, expected "
                               f"({batch}, tokens, {config.cross_attention_dim})")
    timestep = sample["timestep"]
    if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] != batch):
        raise CalibrationError(f"{source}: timestep has shape {tuple(timestep.shape)}, expected ({batch},) or ()")
    if control:
        image = sample[CONTROL_KEY]
        expected = (batch, 3, latent.shape[2] * LATENT_FACTOR, latent.shape[3] * LATENT_FACTOR)
        if tuple(image.shape) != expected:
            raise CalibrationError(f"{source}: control_image has shape {tuple(image.shape)}, expected {expected} "
                                   "(8x the latent, as PASD's images are)")
        if image.min() < 0 or image.max() > 1:
            raise CalibrationError(f"{source}: control_image has values in [{image.min():.3g}, {image.max():.3g}]; "
                                   "the ControlNet takes images in [0, 1]")
    if like is not None:
        for key in wanted:
            if sample[key].shape != like[key].shape:
                raise CalibrationError(f"{source}: {key} has shape {tuple(sample[key].shape)}, the first sample "
                                       f"{tuple(like[key].shape)}; every sample must have the same shapes")


def model_calls(model: nn.Module, samples: list[Sample], *, controlnet: PASDControlNetModel | None = None,
                device: str | torch.device = "cpu") -> list[Callable[[nn.Module], Any]]:
    """One call per sample that runs ``model`` on it: a UNet on (latent, timestep, text); a PASD UNet with the
    residuals of the float ``controlnet`` (computed once here); a PASD ControlNet on its control image too."""
    calls = []
    for i, sample in enumerate(samples):
        s = {k: v.to(device) for k, v in sample.items()}
        args = (s["latent"], s["timestep"], s["encoder_hidden_states"])
        if isinstance(model, PASDControlNetModel):
            calls.append(lambda m, args=args, image=s[CONTROL_KEY]: m(*args, image))
        elif isinstance(model, PASDUNet2DConditionModel):
            if controlnet is None:
                raise CalibrationError("a PASD UNet needs its ControlNet to make the residuals it is calibrated on")
            with torch.no_grad():
                _, down, mid = controlnet.to(device)(*args, s[CONTROL_KEY])
            calls.append(lambda m, args=args, down=down, mid=mid: m(
                *args, down_block_additional_residuals=down, mid_block_additional_residual=mid))
        else:
            calls.append(lambda m, args=args: m(*args))
    return calls
