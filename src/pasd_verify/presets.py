"""Seeded model presets (no hub, no network); models from a user's local folders are in :mod:`pasd_verify.loading`.

``tiny`` runs a whole UNet forward in milliseconds on a CPU; ``sd15`` has Stable Diffusion 1.5's real
dimensions (320/640/1280/1280 channels, 8 heads, text 77 x 768) with random weights.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from .errors import PasdVerifyError
from .models import PASDControlNetModel, PASDUNet2DConditionModel
from .ranges import LATENT_FACTOR

UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sample_size": 8,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 4),  # diffusers' misnomer: this is the number of heads
        "norm_num_groups": 8,
    },
    "sd15": {
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
}

TEXT_LENGTH = 77

# diffusers' AutoencoderKL: SD1.5's VAE (stabilityai/sd-vae-ft-mse and runwayml's vae/config.json have these
# values), and a tiny one with the same structure. Its one attention per mid block has a single head at SD1.5's
# width (attention_head_dim = the width) and a group norm before the projections.
VAE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sample_size": 32,
        "block_out_channels": (16, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
    },
    "sd15": {
        "sample_size": 512,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "latent_channels": 4,
        "scaling_factor": 0.18215,
    },
}

# PASD's ControlNet conditioning embedding widths: three stride-2 convs take the image to the latent size.
CONDITIONING_CHANNELS = {"tiny": (8, 8, 16, 16), "sd15": (16, 32, 96, 256)}
_CONTROLNET_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
                    "attention_head_dim", "norm_num_groups")


def _check_preset(preset: str) -> None:
    if preset not in UNET_PRESETS:
        raise PasdVerifyError(f"unknown preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")


def build_vae(preset: str = "tiny", *, seed: int = 0, **overrides: Any) -> AutoencoderKL:
    """diffusers' ``AutoencoderKL`` of the named preset (:data:`VAE_PRESETS`), weights from ``torch.manual_seed(seed)``."""
    _check_preset(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**{**VAE_PRESETS[preset], **overrides}).eval()


def vae_image(vae: AutoencoderKL, *, batch: int = 1, size: tuple[int, int] | None = None, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded image in [-1, 1], the VAE's input convention (PASD's ``2 * x - 1`` of a [0, 1] photo)."""
    height, width = size or (vae.config.sample_size, vae.config.sample_size)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, vae.config.in_channels, height, width, generator=g, dtype=dtype) * 2 - 1


def _randomize_zero_parameters(model: nn.Module) -> None:
    """Give zero-initialised weights (ControlNet's zero convs) small seeded values, so every path carries signal.

    A fresh ControlNet outputs exact zeros, which would make any test of what flows through it vacuous.
    """
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)


def build_unet(preset: str = "tiny", *, seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` of the named preset, with weights drawn from ``torch.manual_seed(seed)``;
    ``overrides`` replace config entries (``attention_head_dim=8``: more heads at the same width)."""
    _check_preset(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**{**UNET_PRESETS[preset], **overrides}).eval()


def build_pasd(preset: str = "tiny", *, seed: int = 0, use_rrdb: bool = True,
               return_rgbs: bool = True) -> tuple[PASDUNet2DConditionModel, PASDControlNetModel]:
    """PASD's UNet and ControlNet for the named preset, seeded; ``use_rrdb`` / ``return_rgbs`` as in PASD.

    The ControlNet mirrors the UNet's down path. Its zero convs get small seeded weights instead of zeros.
    """
    _check_preset(preset)
    config = UNET_PRESETS[preset]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = PASDUNet2DConditionModel(**config).eval()
        controlnet = PASDControlNetModel(
            **{k: config[k] for k in _CONTROLNET_KEYS}, conditioning_embedding_out_channels=CONDITIONING_CHANNELS[preset],
            return_rgbs=return_rgbs, use_rrdb=use_rrdb,
        ).eval()
        _randomize_zero_parameters(controlnet)
    return unet, controlnet


def pasd_inputs(unet: UNet2DConditionModel, *, batch: int = 1, latent: tuple[int, int] | None = None, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded PASD inputs: :func:`unet_inputs` plus a [0, 1] control image 8x the latent size."""
    inputs = unet_inputs(unet, batch=batch, latent=latent, seed=seed, dtype=dtype)
    height, width = inputs["sample"].shape[-2:]
    g = torch.Generator().manual_seed(seed + 1)
    inputs["controlnet_cond"] = torch.rand(batch, 3, height * LATENT_FACTOR, width * LATENT_FACTOR, generator=g,
                                           dtype=dtype)
    return inputs


def unet_inputs(unet: UNet2DConditionModel, *, batch: int = 2, latent: tuple[int, int] | None = None,
                seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded UNet inputs: latents, one timestep per sample, and a 77-token text embedding."""
    config = unet.config
    height, width = latent or (config.sample_size, config.sample_size)
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, config.in_channels, height, width, generator=g, dtype=dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT_LENGTH, config.cross_attention_dim, generator=g, dtype=dtype),
    }
