"""PASD's super-resolution as a diffusers ``DiffusionPipeline``: what PASD's ``test_pasd.py`` and
``pasd/pipelines/pipeline_pasd.py`` do, step for step (../REFERENCE section 11 lists what was measured by running
them), with the loop's randomness explicit and every step's tensors recorded for the checks that compare backends.

The components keep diffusers' and transformers' call conventions (``text_encoder(ids)[0]``,
``vae.encode(x).latent_dist``, ``vae.decode(z).sample``, the ControlNet's ``(rgbs, down, mid)`` and the UNet's
``return_dict=False`` tuple), so that a network on another backend plugs in as a module with the same call
(:mod:`pasd_verify.pipeline.networks`) and any diffusers scheduler can replace UniPC.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, UniPCMultistepScheduler
from PIL import Image

from ..errors import PasdVerifyError
from ..ranges import CONTROLNET_RANGE, LATENT_FACTOR, check_image

ADDED_PROMPT = "clean, high-resolution, 8k"
NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
PROCESS_SIZE = 768
ADDED_NOISE_LEVEL = 900
STEPS = 20
GUIDANCE = 9.0
CONDITIONING_SCALE = 1.0
STARTS = ("photo", "noise")

# SD1.5's scheduler/scheduler_config.json: PASD builds UniPC from it (linspace spacing, bh2, order 2)
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}


class PipelineInputError(PasdVerifyError):
    """A photo, prompt, noise file or setting the pipeline cannot take."""


def sd15_scheduler() -> UniPCMultistepScheduler:
    """UniPC as PASD builds it: ``from_pretrained(sd15, subfolder="scheduler")`` on SD1.5's PNDM config."""
    return UniPCMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """``text``'s token ids as SD pipelines make them: padded to the tokenizer's length (77), truncated."""
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def pasd_prompt(prompt: str) -> str:
    """``test_pasd.py`` joins the user's prompt and the added prompt with ", "."""
    return f"{prompt}, {ADDED_PROMPT}"


# --- the photo in, the picture out -----------------------------------------------------------------------------

def _short_side_to(width: int, height: int, side: int) -> tuple[int, int]:
    """torchvision's ``Resize(side)``: the short side becomes ``side``, the long one scales and is truncated."""
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def working_size(width: int, height: int, *, upscale: int = 1, process_size: int = PROCESS_SIZE) -> tuple[int, int]:
    """The (width, height) PASD denoises a ``width`` x ``height`` photo at (what :func:`preprocess` makes)."""
    width, height = width * upscale, height * upscale
    if min(width, height) < process_size:
        width, height = _short_side_to(width, height, process_size)
    return width // LATENT_FACTOR * LATENT_FACTOR, height // LATENT_FACTOR * LATENT_FACTOR


def preprocess(photo: Image.Image, *, upscale: int = 1, process_size: int = PROCESS_SIZE) -> Image.Image:
    """``test_pasd.py``'s pre-processing: resize by ``upscale`` (PIL bicubic); if the short side is then below
    ``process_size``, torchvision's bilinear resize (PIL's, on a PIL image) to it; sides floored to multiples of 8
    with PIL's bicubic resize."""
    if not isinstance(upscale, int) or upscale < 1:
        raise PipelineInputError(f"upscale must be a whole factor of at least 1, got {upscale!r}")
    photo = photo.convert("RGB")
    if upscale != 1:
        photo = photo.resize((photo.width * upscale, photo.height * upscale), Image.BICUBIC)
    if min(photo.size) < process_size:
        photo = photo.resize(_short_side_to(*photo.size, process_size), Image.BILINEAR)
    size = (photo.width // LATENT_FACTOR * LATENT_FACTOR, photo.height // LATENT_FACTOR * LATENT_FACTOR)
    return photo.resize(size, Image.BICUBIC) if size != photo.size else photo


def to_tensor(photo: Image.Image) -> torch.Tensor:
    """A PIL RGB image as PASD's ``prepare_image`` takes it: NCHW float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(photo.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def to_pil(picture: torch.Tensor) -> Image.Image:
    """diffusers' ``numpy_to_pil``: an NCHW [0, 1] picture rounded to uint8 (the first of the batch)."""
    array = (picture[0].permute(1, 2, 0).float().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=image.dtype) / 16
    kernel = kernel[None, None].repeat(image.shape[1], 1, 1, 1)
    image = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(image, kernel, groups=image.shape[1], dilation=radius)


def _wavelet_decomposition(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(image)
    for level in range(levels):
        low = _wavelet_blur(image, 2**level)
        high = high + (image - low)
        image = low
    return high, image


def wavelet_color_fix(picture: Image.Image, photo: Image.Image) -> Image.Image:
    """PASD's colour fix (from StableSR): the picture's five wavelet detail levels on the photo's low frequencies;
    the photo is resized to the picture first (LANCZOS); torchvision's ``ToPILImage`` truncates to uint8."""
    if photo.size != picture.size:
        photo = photo.resize(picture.size, Image.LANCZOS)
    high, _ = _wavelet_decomposition(to_tensor(picture))
    _, low = _wavelet_decomposition(to_tensor(photo))
    fixed = (high + low).clamp_(0.0, 1.0)
    return Image.fromarray((fixed[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))


# --- the start: PASD's three draws ----------------------------------------------------------------------------

NOISE_KEYS = ("posterior", "first", "added")


@dataclass(frozen=True)
class StartNoise:
    """The random tensors of one PASD run, in the order PASD draws them from its one generator: from a photo, the
    VAE posterior's sample, the noise added at the first timestep and the noise added at ``added_noise_level``;
    from pure noise (``init_latent_with_noise``), the starting latent alone (``first``)."""

    first: torch.Tensor
    posterior: torch.Tensor | None = None
    added: torch.Tensor | None = None

    @property
    def start(self) -> str:
        return "noise" if self.posterior is None else "photo"

    @classmethod
    def draw(cls, start: str, shape: tuple[int, ...], generator: torch.Generator) -> StartNoise:
        """PASD's draws from ``generator`` (``randn_tensor`` on the CPU is ``torch.randn``), in its order."""
        if start not in STARTS:
            raise PipelineInputError(f"start must be one of {STARTS}, got {start!r}")
        draws = [torch.randn(shape, generator=generator) for _ in range(3 if start == "photo" else 1)]
        if start == "noise":
            return cls(first=draws[0])
        return cls(posterior=draws[0], first=draws[1], added=draws[2])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in NOISE_KEYS if getattr(self, k) is not None}

    def save(self, path: str | os.PathLike) -> None:
        from ..io import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, start=np.array(self.start), **{k: v.numpy() for k, v in self.tensors().items()})

    @classmethod
    def load(cls, path: str | os.PathLike, shape: tuple[int, ...]) -> StartNoise:
        """Read a noise file; refuse, naming the file and key, one that is malformed, of another latent shape, not
        finite, or missing a draw its start needs. Each array's shape and dtype are read from its header in the zip
        before the array itself, and only the draws the start needs are read: a file of other arrays, or of
        larger ones, costs no memory."""
        import stat

        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError as e:
            raise PipelineInputError(f"{path}: not a readable noise file (.npz): {e.strerror}") from None
        if not regular:
            raise PipelineInputError(f"{path}: not a readable noise file (.npz): not a regular file")
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                npy = f.read(6) == b"\x93NUMPY"
            raise PipelineInputError(f"{path}: not a readable noise file (.npz): not a zip of arrays, as a run "
                                     "writes noise.npz beside its outputs" +
                                     ("; this is a single .npy array" if npy else ""))
        try:
            with zipfile.ZipFile(path) as archive:
                members = {n.removesuffix(".npy"): n for n in archive.namelist() if n.endswith(".npy")}
                start = "photo" if "posterior" in members else "noise"
                if "start" in members:
                    start = str(_read_member(archive, members["start"], path, "start", (), "U"))
                needed = NOISE_KEYS if start == "photo" else ("first",)
                missing = [k for k in needed if k not in members]
                if start not in STARTS or missing:
                    raise PipelineInputError(
                        f"{path}: a {start!r} start needs the keys {list(needed)}; missing {missing}"
                        if start in STARTS else f"{path}: start {start!r} is not one of {STARTS}")
                tensors = {}
                for key in needed:
                    array = _read_member(archive, members[key], path, key, tuple(shape), "f4")
                    if not np.isfinite(array).all():
                        raise PipelineInputError(f"{path}: {key} holds {int((~np.isfinite(array)).sum())} NaN or "
                                                 "Inf")
                    tensors[key] = torch.from_numpy(array)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise PipelineInputError(f"{path}: not a readable noise file (.npz): {e}") from None
        return cls(**tensors)


def _read_member(archive: zipfile.ZipFile, member: str, path: str | os.PathLike, key: str, shape: tuple[int, ...],
                 dtype: str) -> np.ndarray:
    """One array of an .npz, its header checked first: ``shape`` and ``dtype`` (``"U"``: any short text), no
    object arrays (which would need unpickling)."""
    from numpy.lib import format as npy

    with archive.open(member) as f:
        version = npy.read_magic(f)
        found_shape, fortran, found = (npy.read_array_header_1_0(f) if version == (1, 0) else
                                       npy.read_array_header_2_0(f))
        if found.hasobject:
            raise PipelineInputError(f"{path}: {key} is an array of Python objects; a noise file holds only numbers "
                                     "(and its start as text)")
        if dtype == "U":
            if not np.issubdtype(found, np.str_) or found_shape != () or found.itemsize > 64:
                raise PipelineInputError(f"{path}: {key} is {found} {found_shape}; expected a short text")
        elif found_shape != shape or found != np.dtype(dtype):
            raise PipelineInputError(f"{path}: {key} is {found} {found_shape}; this run needs float32 {shape} (the "
                                     "latent of the photo's working size)")
        count = int(np.prod(found_shape))
        data = bytearray(f.read(found.itemsize * count))  # a bytearray: the array over it is writable, as torch wants
        if len(data) != found.itemsize * count:
            raise PipelineInputError(f"{path}: {key} is cut short: {len(data)} of {found.itemsize * count} bytes")
        array = np.frombuffer(data, dtype=found)
        array = array.reshape(found_shape, order="F" if fortran else "C")
        return np.ascontiguousarray(array) if dtype != "U" else array[()]


# --- what a run records ---------------------------------------------------------------------------------------

@dataclass
class Trace:
    """Every step's tensors: the latent the step starts from, the scheduler-scaled latent the networks take (the
    teacher-forcing input), the two guidance halves' noise predictions and the latent after the step;
    ``embeddings`` is the text encoder's [uncond, cond] output, ``encoded_latent`` the photo's scaled posterior
    sample (a photo start only), ``start_latent`` the loop's first latent (noised: at the first timestep the photo
    keeps 7% of its amplitude, so the start hides most of an encoder's error, not the picture)."""

    timesteps: list[int] = field(default_factory=list)
    latents_in: list[torch.Tensor] = field(default_factory=list)
    model_inputs: list[torch.Tensor] = field(default_factory=list)
    noise_uncond: list[torch.Tensor] = field(default_factory=list)
    noise_cond: list[torch.Tensor] = field(default_factory=list)
    latents_out: list[torch.Tensor] = field(default_factory=list)
    embeddings: torch.Tensor | None = None
    encoded_latent: torch.Tensor | None = None
    start_latent: torch.Tensor | None = None


@dataclass
class PASDOutput:
    """``picture`` is the decoded picture, NCHW in [0, 1], before PASD's colour fix (which replaces its low
    frequencies by the photo's, and so would hide a colour failure); ``trace`` every step's tensors."""

    picture: torch.Tensor
    latents: torch.Tensor
    noise: StartNoise
    trace: Trace


class PASDPipeline(DiffusionPipeline):
    """PASD's super-resolution: prompt embeddings, the starting latent (the VAE-encoded photo with noise added, or
    pure noise), ``num_inference_steps`` of ControlNet then UNet with classifier-free guidance, the VAE decode."""

    model_cpu_offload_seq = "text_encoder->controlnet->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              controlnet=controlnet, scheduler=scheduler)

    # a component on another backend is no torch module with parameters: the device is the CPU's
    @property
    def _execution_device(self) -> torch.device:
        return torch.device("cpu")

    def encode_prompt(self, prompt: str, negative_prompt: str) -> torch.Tensor:
        """``[uncond, cond]`` embeddings, as PASD's ``_encode_prompt``: both padded to the tokenizer's length, no
        attention mask (CLIP's config asks for none)."""
        return torch.cat([self.text_encoder(tokenize(self.tokenizer, text))[0]
                          for text in (negative_prompt, prompt)]).float()

    def latent_shape(self, image: torch.Tensor) -> tuple[int, ...]:
        height, width = image.shape[-2:]
        return (1, self.unet.config.in_channels, height // LATENT_FACTOR, width // LATENT_FACTOR)

    def encode_photo(self, image: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
        """The VAE posterior of the photo (as ``2 * image - 1``) sampled with ``posterior`` as diffusers'
        ``DiagonalGaussianDistribution.sample`` does, times the scaling factor."""
        distribution = self.vae.encode(image * 2.0 - 1.0).latent_dist
        return (distribution.mean + distribution.std * posterior) * self.vae.config.scaling_factor

    def prepare_latents(self, image: torch.Tensor, noise: StartNoise, num_inference_steps: int,
                        trace: Trace | None = None) -> torch.Tensor:
        """PASD's ``prepare_latents``. From a photo: :meth:`encode_photo`, noised at the first timestep, then noised
        again "at ``added_noise_level`` 900", which UniPC's ``add_noise`` looks up in the inference timesteps, does
        not find, and takes at the schedule's LAST timestep; that is what PASD's released pictures use, so it is
        reproduced, not fixed."""
        if noise.posterior is None:
            return noise.first * self.scheduler.init_noise_sigma
        latents = self.encode_photo(image, noise.posterior)
        if trace is not None:
            trace.encoded_latent = latents
        self.scheduler.set_timesteps(num_inference_steps)
        latents = self.scheduler.add_noise(latents, noise.first, self.scheduler.timesteps[:1])
        latents = self.scheduler.add_noise(latents, noise.added, torch.tensor([ADDED_NOISE_LEVEL]))
        return latents * self.scheduler.init_noise_sigma

    def predict_noise(self, model_input: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                      image: torch.Tensor, conditioning_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's networks on the scheduler-scaled latent: the ControlNet then the UNet on both guidance halves
        (PASD's batch of two, uncond first); returns (uncond, cond)."""
        model_input = torch.cat([model_input] * 2)
        _, down, mid = self.controlnet(model_input, t, encoder_hidden_states=embeddings,
                                       controlnet_cond=torch.cat([image] * 2), conditioning_scale=conditioning_scale,
                                       return_dict=False)
        noise = self.unet(model_input, t, encoder_hidden_states=embeddings, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid, return_dict=False)[0]
        return noise.chunk(2)

    @torch.no_grad()
    def __call__(self, prompt: str, image: torch.Tensor, *, negative_prompt: str = NEGATIVE_PROMPT,
                 num_inference_steps: int = STEPS, guidance_scale: float = GUIDANCE,
                 conditioning_scale: float = CONDITIONING_SCALE, noise: StartNoise | None = None,
                 start: str = "photo", generator: torch.Generator | None = None,
                 on_step: Callable[[int, int], Any] | None = None) -> PASDOutput:
        """Super-resolve ``image`` (NCHW [0, 1], at its working size: :func:`preprocess`). ``noise`` gives the run's
        random tensors; without it they are drawn from ``generator`` in PASD's order (:meth:`StartNoise.draw`).
        ``prompt`` is used as given (:func:`pasd_prompt` adds PASD's added prompt)."""
        check_image(image, "image", value_range=CONTROLNET_RANGE)
        if image.shape[0] != 1:
            raise PipelineInputError(f"image: one photo at a time, got a batch of {image.shape[0]}")
        if num_inference_steps < 1:
            raise PipelineInputError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        shape = self.latent_shape(image)
        if noise is None:
            noise = StartNoise.draw(start, shape, generator or torch.Generator().manual_seed(0))
        trace = Trace(embeddings=self.encode_prompt(prompt, negative_prompt))
        latents = self.prepare_latents(image, noise, num_inference_steps, trace)
        trace.start_latent = latents
        self.scheduler.set_timesteps(num_inference_steps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            uncond, cond = self.predict_noise(model_input, t, trace.embeddings, image, conditioning_scale)
            trace.timesteps.append(int(t))
            trace.latents_in.append(latents)
            trace.model_inputs.append(model_input)
            trace.noise_uncond.append(uncond)
            trace.noise_cond.append(cond)
            latents = self.scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents,
                                          return_dict=False)[0]
            trace.latents_out.append(latents)
            if on_step is not None:
                on_step(i, int(t))
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        picture = (decoded / 2 + 0.5).clamp(0, 1)  # diffusers' postprocess (denormalize)
        return PASDOutput(picture=picture.float(), latents=latents, noise=noise, trace=trace)


def save_picture(picture: torch.Tensor, path: str | os.PathLike) -> None:
    """Write an NCHW [0, 1] picture as a PNG, atomically."""
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        to_pil(picture).save(tmp, format="PNG")

