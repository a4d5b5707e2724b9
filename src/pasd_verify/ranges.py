"""Input conventions of SD1.5 and PASD, as code.

- UNet/VAE images are in [-1, 1]; ControlNet images are in [0, 1]; ``x_unet = 2 * x_control - 1``.
- Latents are the image size / 8, so image sides must be multiples of 8.
- PASD's control images have a short side of at least 768 px: the released weights give poor results below.
- Tensors are NCHW float, 3 channels.
- The text encoder takes integer token ids, 77 per prompt (padded with the end token), within its vocabulary.
- The VAE decoder takes latents as the denoising loop holds them: scaled by the VAE's ``scaling_factor`` (0.18215),
  which gives them a standard deviation near 1; the encoder's latents are unscaled, about 5x wider.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ImageInputError, LatentInputError, TokenInputError

logger = logging.getLogger(__name__)

UNET_RANGE = (-1.0, 1.0)
CONTROLNET_RANGE = (0.0, 1.0)
LATENT_FACTOR = 8
MIN_CONTROL_SIDE = 768
TEXT_LENGTH = 77
# A scaled latent's standard deviation is near 1 (the scaling factor was chosen to make it so); an unscaled one is
# near 1 / scaling_factor (5.5 for SD1.5). Half of that separates the two.
UNSCALED_FRACTION = 0.5


def to_unet_range(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return image * 2 - 1


def to_controlnet_range(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (image + 1) / 2


def latent_size(height: int, width: int) -> tuple[int, int]:
    """The latent size of an image: each side / 8, which must divide exactly."""
    if height % LATENT_FACTOR or width % LATENT_FACTOR:
        raise ImageInputError(f"image size {height}x{width} is not a multiple of {LATENT_FACTOR} on both sides")
    return height // LATENT_FACTOR, width // LATENT_FACTOR


def check_image(image: Any, name: str, *, value_range: tuple[float, float], channels: int = 3,
                multiple_of: int = LATENT_FACTOR, min_side: int | None = None, allow_small: bool = False) -> None:
    """Raise :class:`ImageInputError` naming ``name`` and the fault unless ``image`` is an NCHW float tensor with
    ``channels`` channels, finite values in ``value_range``, sides multiples of ``multiple_of`` and a short side of
    at least ``min_side`` (below it only a warning if ``allow_small``)."""
    if not isinstance(image, torch.Tensor):
        raise ImageInputError(f"{name}: expected a torch.Tensor, got {type(image).__name__}")
    if not image.is_floating_point():
        hint = "; divide a uint8 image by 255" if image.dtype == torch.uint8 else ""
        raise ImageInputError(f"{name}: expected a float tensor, got {image.dtype}{hint}")
    if image.ndim != 4:
        raise ImageInputError(f"{name}: expected NCHW (4 dims), got shape {tuple(image.shape)}")
    if image.shape[1] != channels:
        if image.shape[-1] == channels:
            raise ImageInputError(
                f"{name}: shape {tuple(image.shape)} looks NHWC; expected NCHW, use .permute(0, 3, 1, 2)"
            )
        raise ImageInputError(f"{name}: expected {channels} channels, got shape {tuple(image.shape)}")
    finite = torch.isfinite(image)
    if not finite.all():
        bad = (~finite).sum().item()
        raise ImageInputError(f"{name}: {bad} value(s) are NaN or Inf")
    lo, hi = value_range
    found_lo, found_hi = image.min().item(), image.max().item()
    if found_lo < lo or found_hi > hi:
        hint = ""
        if value_range == CONTROLNET_RANGE and found_lo >= -1:
            hint = "; a [-1, 1] UNet image? use to_controlnet_range"
        elif value_range == UNET_RANGE and found_hi > 1 and found_hi <= 255:
            hint = "; a 0-255 image? scale to [0, 1], then to_unet_range"
        raise ImageInputError(f"{name}: values in [{found_lo:.4g}, {found_hi:.4g}], expected [{lo}, {hi}]{hint}")
    height, width = image.shape[-2:]
    if height % multiple_of or width % multiple_of:
        raise ImageInputError(f"{name}: size {height}x{width} is not a multiple of {multiple_of} on both sides")
    if min_side is not None and min(height, width) < min_side:
        message = f"{name}: short side {min(height, width)} px is below {min_side} px"
        if not allow_small:
            raise ImageInputError(message + "; pass allow_small=True to accept it")
        warnings.warn(message + "; PASD's released weights give poor results there", stacklevel=2)


def check_unet_image(image: Any, name: str = "image") -> None:
    """A UNet/VAE image: NCHW float, 3 channels, in [-1, 1], sides multiples of 8."""
    check_image(image, name, value_range=UNET_RANGE)


def check_control_image(image: Any, name: str = "control image", *, allow_small: bool = False) -> None:
    """A PASD control image: NCHW float, 3 channels, in [0, 1], sides multiples of 8, short side >= 768."""
    check_image(image, name, value_range=CONTROLNET_RANGE, min_side=MIN_CONTROL_SIDE, allow_small=allow_small)


def control_size(height: int, width: int, *, upscale: float = 1.0, min_side: int = MIN_CONTROL_SIDE) -> tuple[int, int]:
    """PASD's pre-processing size: scale by ``upscale``, then up so the short side is >= ``min_side``, then
    floor both sides to multiples of 8."""
    height, width = height * upscale, width * upscale
    if min(height, width) < min_side:
        scale = min_side / min(height, width)
        height, width = height * scale, width * scale
    # round before flooring: a side that should be exactly 768 may come out as 767.999...
    return (int(math.floor(round(height, 6) / LATENT_FACTOR)) * LATENT_FACTOR,
            int(math.floor(round(width, 6) / LATENT_FACTOR)) * LATENT_FACTOR)


def _as_nchw_float(image: Any) -> torch.Tensor:
    """A PIL image, an HWC uint8 array or a CHW/NCHW float tensor in [0, 1], as an NCHW float32 tensor."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL, without importing it for non-PIL callers
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ImageInputError(
                f"control image array: expected HWC uint8 with 3 channels, got {image.dtype} {image.shape}"
            )
        return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        check_image(image, "control image", value_range=CONTROLNET_RANGE, multiple_of=1)
        return image.float()
    raise ImageInputError(f"control image: expected a PIL image, a uint8 array or a tensor, got {type(image).__name__}")


def prepare_control_image(image: Any, *, upscale: float = 1.0, min_side: int = MIN_CONTROL_SIDE) -> torch.Tensor:
    """PASD's control-image pre-processing: resize so the short side is at least ``min_side`` (after an optional
    ``upscale``), sides floored to multiples of 8. Returns NCHW float32 in [0, 1]."""
    tensor = _as_nchw_float(image)
    size = control_size(*tensor.shape[-2:], upscale=upscale, min_side=min_side)
    if size != tuple(tensor.shape[-2:]):
        tensor = F.interpolate(tensor, size=size, mode="bicubic", align_corners=False, antialias=True)
    # bicubic overshoots a little at edges; the ControlNet range is a hard contract
    return tensor.clamp_(0.0, 1.0).contiguous()


def check_tokens(ids: Any, name: str, *, vocab_size: int, length: int = TEXT_LENGTH) -> None:
    """Raise :class:`TokenInputError` naming ``name`` unless ``ids`` is an integer ``(B, length)`` tensor of ids in
    ``[0, vocab_size)``: what a CLIP tokenizer gives with ``padding="max_length"``."""
    if not isinstance(ids, torch.Tensor):
        raise TokenInputError(f"{name}: expected a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TokenInputError(f"{name}: token ids must be integers, got {str(ids.dtype).removeprefix('torch.')}")
    if ids.ndim != 2 or ids.shape[1] != length or ids.shape[0] == 0:
        raise TokenInputError(f"{name}: expected (batch, {length}) token ids, got shape {tuple(ids.shape)}; pad "
                              f"with padding='max_length', max_length={length}")
    low, high = ids.min().item(), ids.max().item()
    if low < 0 or high >= vocab_size:
        raise TokenInputError(f"{name}: token ids in [{low}, {high}], the vocabulary holds [0, {vocab_size - 1}]; "
                              "a tokenizer of another model?")


def check_latent(latent: Any, name: str, *, channels: int, scaling_factor: float) -> None:
    """Raise :class:`LatentInputError` naming ``name`` unless ``latent`` is a finite NCHW float tensor with
    ``channels`` channels whose spread is that of a scaled latent (see :data:`UNSCALED_FRACTION`)."""
    if not isinstance(latent, torch.Tensor) or not latent.is_floating_point():
        what = type(latent).__name__ if not isinstance(latent, torch.Tensor) else str(latent.dtype)
        raise LatentInputError(f"{name}: expected a float tensor, got {what}")
    if latent.ndim != 4 or latent.shape[1] != channels or 0 in latent.shape:
        raise LatentInputError(f"{name}: expected (B, {channels}, h, w), got shape {tuple(latent.shape)}")
    if not torch.isfinite(latent).all():
        raise LatentInputError(f"{name}: {(~torch.isfinite(latent)).sum().item()} value(s) are NaN or Inf")
    spread = latent.float().std().item() if latent.numel() > 1 else 0.0
    if spread > UNSCALED_FRACTION / scaling_factor:
        raise LatentInputError(f"{name}: standard deviation {spread:.3g}, that of an unscaled latent (a scaled one's "
                               f"is near 1); multiply by the VAE's scaling_factor {scaling_factor:g}")
