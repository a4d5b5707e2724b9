"""The VAE as a PASD app runs it: two networks, not one ``AutoencoderKL``.

The app encodes the low-resolution photo once (the starting latent, noised to ``added_noise_level``) and decodes
the final latent once, on the phone as two graphs. :class:`VAEEncoder` and :class:`VAEDecoder` are those two halves
of a diffusers ``AutoencoderKL``, sharing its modules (no copy), so that their parameter names are the VAE
checkpoint's own (``encoder.*``, ``quant_conv.*``; ``post_quant_conv.*``, ``decoder.*``).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

# DiagonalGaussianDistribution's clamp of the log-variance: what the pipeline samples from
LOGVAR_RANGE = (-30.0, 20.0)


class VAEEncoder(nn.Module):
    """``image`` in [-1, 1] ``(B, 3, H, W)`` -> the latent distribution's ``mean`` and ``logvar``
    ``(B, 4, H/8, W/8)``, unscaled: the pipeline samples ``mean + exp(logvar / 2) * noise`` and multiplies by the
    VAE's ``scaling_factor`` (0.18215 for SD1.5) itself."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.config = vae.config
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.encoder(image)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)


class VAEDecoder(nn.Module):
    """``latent`` ``(B, 4, h, w)``, scaled as the denoising loop holds it -> ``image`` ``(B, 3, 8h, 8w)`` in about
    [-1, 1]. The division by ``scaling_factor`` is in the graph; the pipeline's ``(image / 2 + 0.5).clamp(0, 1)`` and
    the layout change to an 8-bit picture are not: they happen in the app, after the graph."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.config = vae.config
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent / self.config.scaling_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def split_vae(vae: AutoencoderKL) -> tuple[VAEEncoder, VAEDecoder]:
    """The two networks of ``vae``, sharing its modules."""
    return VAEEncoder(vae).eval(), VAEDecoder(vae).eval()
