"""PASD's two models on current diffusers, one call that runs them together, and the VAE as its two networks."""

from __future__ import annotations

import torch

from .controlnet import PASDConditioningEmbedding, PASDControlNetModel
from .unet import PASDUNet2DConditionModel, PixelAwareCrossAttnUpBlock2D, PixelAwareUpBlock2D
from .vae import VAEDecoder, VAEEncoder, split_vae


def pasd_forward(unet: PASDUNet2DConditionModel, controlnet: PASDControlNetModel, sample: torch.Tensor,
                 timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, controlnet_cond: torch.Tensor,
                 conditioning_scale: float = 1.0):
    """One denoising step as PASD runs it: ControlNet, then the UNet with its residuals.

    Returns ``(noise_prediction, rgbs)``; ``rgbs`` is None when the ControlNet has no RGB outputs.
    """
    rgbs, down, mid = controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                 conditioning_scale=conditioning_scale)
    out = unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
               mid_block_additional_residual=mid).sample
    return out, rgbs


__all__ = [
    "PASDConditioningEmbedding",
    "PASDControlNetModel",
    "PASDUNet2DConditionModel",
    "PixelAwareCrossAttnUpBlock2D",
    "PixelAwareUpBlock2D",
    "VAEDecoder",
    "VAEEncoder",
    "pasd_forward",
    "split_vae",
]
