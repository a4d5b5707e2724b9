"""What one calibration sample of each kind holds: its :class:`SampleLayout` (keys, seeded draw, the check of a
user's sample naming the file and key, the graph inputs it feeds, its working size).

The denoisers' samples are one step's inputs (``latent``, ``timestep``, ``encoder_hidden_states`` and for PASD the
[0, 1] ``control_image``), the text encoder's ``input_ids``, the VAE encoder's ``image`` in [-1, 1] and the VAE
decoder's scaled ``latent``. The registry (:mod:`pasd_verify.kinds`) gives each kind its layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PasdVerifyError
from ..presets import text_tokens
from ..ranges import LATENT_FACTOR, TEXT_LENGTH, UNET_RANGE, check_image, check_latent, check_tokens

# A calibration sample: one denoising step's inputs, as a user's pipeline dumps them (quant.calibration's files).
Sample = dict[str, torch.Tensor]
SAMPLE_KEYS = ("latent", "timestep", "encoder_hidden_states")
CONTROL_KEY = "control_image"
TRAIN_TIMESTEPS = 1000  # num_train_timesteps of every SD1.5 scheduler config
BASE_INPUTS = ("sample", "timestep", "encoder_hidden_states")


class CalibrationError(PasdVerifyError):
    """A calibration sample is missing, malformed, or does not fit the model."""


@dataclass(frozen=True)
class SampleLayout:
    """What one calibration sample of a kind holds (``keys``), how a seeded one of batch 1 is drawn at a working size
    (``draw(model, generator, size)``; the size is the latent's ``(h, w)``, None for the text encoder), how a user's is
    checked beyond the keys (``check(sample, model, source)``, raising naming the source and the key), which graph
    inputs it feeds (``feeds``), and the working size a sample is at (``size``; ``default_size`` from the config)."""

    keys: tuple[str, ...]
    draw: Callable[[nn.Module, torch.Generator, tuple[int, int] | None], Sample]
    check: Callable[[Sample, nn.Module, str], None]
    feeds: Callable[[Sample], dict[str, torch.Tensor]]
    size: Callable[[Sample], tuple[int, int] | None]
    default_size: Callable[[nn.Module], tuple[int, int] | None]
    integer_keys: tuple[str, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)


# --- sample layouts ---------------------------------------------------------------------------------------

def _config_latent(model: nn.Module) -> tuple[int, int]:
    size = model.config.get("sample_size")
    if size is None:
        raise CalibrationError(f"{type(model).__name__} has no sample_size in its config: give the latent size "
                               "(--latent H W)")
    return size, size


def _denoiser_layout(control: bool) -> SampleLayout:
    """One denoising step's inputs, as a user's pipeline dumps them; PASD's with the [0, 1] control image."""

    def draw(model, g, size):
        config = model.config
        height, width = size
        sample = {
            "latent": torch.randn(1, config.in_channels, height, width, generator=g),
            "timestep": torch.randint(0, 1000, (1,), generator=g),
            "encoder_hidden_states": torch.randn(1, TEXT_LENGTH, config.cross_attention_dim, generator=g),
        }
        if control:
            sample[CONTROL_KEY] = torch.rand(1, 3, height * LATENT_FACTOR, width * LATENT_FACTOR, generator=g)
        return sample

    def check(sample, model, source):
        config = model.config
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
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise CalibrationError(f"{source}: timestep has dtype {str(timestep.dtype).removeprefix('torch.')}; "
                                   "expected an integer or float step")
        worst = timestep.max() if timestep.max() > TRAIN_TIMESTEPS else timestep.min()
        if not 0 <= worst <= TRAIN_TIMESTEPS:
            raise CalibrationError(f"{source}: timestep {worst.item():g} is outside [0, {TRAIN_TIMESTEPS}], the steps "
                                   "SD1.5's schedulers train on")
        if control:
            image = sample[CONTROL_KEY]
            expected = (batch, 3, latent.shape[2] * LATENT_FACTOR, latent.shape[3] * LATENT_FACTOR)
            if tuple(image.shape) != expected:
                raise CalibrationError(f"{source}: control_image has shape {tuple(image.shape)}, expected {expected} "
                                       "(8x the latent, as PASD's images are)")
            if image.min() < 0 or image.max() > 1:
                raise CalibrationError(f"{source}: control_image has values in [{image.min():.3g}, "
                                       f"{image.max():.3g}]; the ControlNet takes images in [0, 1]")

    def feeds(sample):
        latent = sample["latent"]
        fed = {"sample": latent, "timestep": sample["timestep"].float().reshape(-1).expand(latent.shape[0]).contiguous(),
               "encoder_hidden_states": sample["encoder_hidden_states"]}
        if control:
            fed[CONTROL_KEY] = sample[CONTROL_KEY]
        return fed

    return SampleLayout(SAMPLE_KEYS + ((CONTROL_KEY,) if control else ()), draw, check, feeds,
                        size=lambda sample: tuple(sample["latent"].shape[-2:]), default_size=_config_latent,
                        integer_keys=("timestep",),
                        notes={"timestep": "float input; sinusoidal embedding computed in the graph"})


def _check_tokens(sample, model, source):
    check_tokens(sample["input_ids"], f"{source}: input_ids", vocab_size=model.config.vocab_size,
                 length=model.config.max_position_embeddings)


_TEXT_LAYOUT = SampleLayout(
    ("input_ids",),
    draw=lambda model, g, size: {"input_ids": text_tokens(model, generator=g)},
    check=_check_tokens,
    feeds=lambda sample: {"input_ids": sample["input_ids"].to(torch.int32)},  # the phone's input type
    size=lambda sample: None, default_size=lambda model: None, integer_keys=("input_ids",),
    notes={"input_ids": "int32 (B, 77), padded with the end token; the causal mask is built in the graph"})


def _vae_latent(model: nn.Module) -> tuple[int, int]:
    side = model.config.sample_size
    side = side[0] if isinstance(side, (list, tuple)) else side
    return side // LATENT_FACTOR, side // LATENT_FACTOR


def _check_vae_image(sample, model, source):
    check_image(sample["image"], f"{source}: image", value_range=UNET_RANGE, channels=model.config.in_channels)


_VAE_IMAGE_LAYOUT = SampleLayout(
    ("image",),
    draw=lambda model, g, size: {"image": torch.rand(1, model.config.in_channels, size[0] * LATENT_FACTOR,
                                                     size[1] * LATENT_FACTOR, generator=g) * 2 - 1},
    check=_check_vae_image,
    feeds=lambda sample: {"image": sample["image"]},
    size=lambda sample: tuple(s // LATENT_FACTOR for s in sample["image"].shape[-2:]), default_size=_vae_latent,
    notes={"image": "[-1, 1] (2 * photo - 1)",
           "latent_mean, latent_logvar": "unscaled; the app samples and multiplies by scaling_factor"})


def _check_vae_latent(sample, model, source):
    check_latent(sample["latent"], f"{source}: latent", channels=model.config.latent_channels,
                 scaling_factor=model.config.scaling_factor)


# a scaled latent of the denoising loop: about standard normal (its start is pure noise)
_VAE_LATENT_LAYOUT = SampleLayout(
    ("latent",),
    draw=lambda model, g, size: {"latent": torch.randn(1, model.config.latent_channels, *size, generator=g)},
    check=_check_vae_latent,
    feeds=lambda sample: {"latent": sample["latent"]},
    size=lambda sample: tuple(sample["latent"].shape[-2:]), default_size=_vae_latent,
    notes={"latent": "scaled by scaling_factor, as the loop holds it; the graph divides by it",
           "image": "about [-1, 1]; the app clamps (image / 2 + 0.5) to [0, 1] after the graph"})
