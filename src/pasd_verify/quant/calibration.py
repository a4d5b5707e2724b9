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

from ..checkpoint_files import load_state_dict_file, save_state_dict_file
from ..kinds import CONTROL_KEY, CalibrationError, Sample, kind_of

__all__ = ["CONTROL_KEY", "CalibrationError", "Sample", "calibration_samples", "load_samples", "model_calls",
           "save_samples", "seeded_samples"]


def seeded_samples(model: nn.Module, count: int, *, latent: tuple[int, int] | None = None,
                   seed: int = 0) -> list[Sample]:
    """``count`` seeded samples of batch 1 for ``model`` (its kind decides the keys; :mod:`pasd_verify.kinds`)."""
    return kind_of(model).seeded_samples(model, count, latent=latent, seed=seed)


def calibration_samples(model: nn.Module, *, folder: str | os.PathLike | None = None, count: int = 8,
                        latent: tuple[int, int] | None = None, seed: int = 0,
                        partner: nn.Module | None = None) -> list[Sample]:
    """The samples a command calibrates ``model`` on: those in ``folder``, else ``count`` seeded ones.

    A kind with a partner (the PASD UNet: its ControlNet) is calibrated on the partner's outputs, so needs it.
    """
    kind = kind_of(model)
    if kind.partner is not None and partner is None:
        raise CalibrationError(f"a {kind.name} is calibrated on its {kind.partner}'s outputs: give the "
                               f"{kind.partner} too")
    if folder is not None:
        return load_samples(folder, model)
    if count < 1:
        raise CalibrationError(f"--samples must be at least 1, got {count}")
    return seeded_samples(model, count, latent=latent, seed=seed)


def save_samples(samples: list[Sample], folder: str | os.PathLike) -> list[Path]:
    """Write samples as ``sample_00000.safetensors``, ... (the format :func:`load_samples` reads)."""
    folder = Path(folder)
    paths = []
    for i, sample in enumerate(samples):
        paths.append(folder / f"sample_{i:05d}.safetensors")
        save_state_dict_file({k: v.contiguous() for k, v in sample.items()}, paths[-1])
    return paths


def load_samples(folder: str | os.PathLike, model: nn.Module, *, limit: int | None = None) -> list[Sample]:
    """Every ``*.safetensors`` sample in ``folder`` (sorted by name), checked against ``model``'s kind and config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: no such calibration folder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CalibrationError(f"{folder}: no .safetensors calibration samples")
    kind = kind_of(model)
    # the model's dtype: a sample saved in float16 feeds a float32 model as diffusers' pipelines feed it, cast
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    samples = []
    for path in files[:limit]:
        sample = dict(load_state_dict_file(path))
        kind.check_sample(sample, model, str(path), like=samples[0] if samples else None)
        samples.append({k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in sample.items()})
    return samples


def model_calls(model: nn.Module, samples: list[Sample], *, partner: nn.Module | None = None,
                device: str | torch.device = "cpu") -> list[Callable[[nn.Module], Any]]:
    """One call per sample that runs ``model`` on it through its kind's flat signature; a partner's outputs (a PASD
    UNet's residuals, from the float ControlNet) are computed once here."""
    return kind_of(model).calls(model, samples, partner=partner, device=device)
