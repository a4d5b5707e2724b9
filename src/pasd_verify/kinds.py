"""Model kinds: one registry entry per kind of network, read by every stage.

As diffusers' tester configs do for its tests, a :class:`ModelKind` states once what the rest of pasd-verify needs to
know about a kind of model: its class, how to build it from a preset and a seed, which seeded inputs and calibration
samples it takes and how to check a user's, how to run it as a graph with plain named tensor inputs and outputs (what
ONNX export, AIMET and the HTP see), and which partner it needs (the PASD UNet runs on its ControlNet's residuals).
Export, AdaRound, calibration, the command line and the demo read the registry; no other module branches on a
model's class or a kind's name.

Graph signatures (the timestep is a float ``(batch,)`` input whose sinusoidal embedding is computed in the graph:
the scheduler hands the model a timestep, the HTP takes Sin and Cos, and a graph fed a precomputed embedding would
move part of the model into every caller):

- ``unet``: ``sample, timestep, encoder_hidden_states -> noise``;
- ``pasd-unet``: the same plus ``down_residual_{i}`` (one per skip, 12 for SD1.5) and ``mid_residual``;
- ``pasd-controlnet``: ``sample, timestep, encoder_hidden_states, control_image -> rgb_{i}..., down_residual_{i}...,
  mid_residual``. A partner's outputs feed the inputs of the same names;
- ``text-encoder``: ``input_ids`` (int32, ``(B, 77)``) ``-> last_hidden_state``;
- ``vae-encoder``: ``image`` in [-1, 1] ``-> latent_mean, latent_logvar`` (unscaled);
- ``vae-decoder``: ``latent`` (scaled, as the denoising loop holds it) ``-> image`` in about [-1, 1].

Each kind's calibration samples have a :class:`SampleLayout`: the denoisers' are one step's inputs (``latent``,
``timestep``, ``encoder_hidden_states`` and for PASD ``control_image``); the text encoder's ``input_ids``; the VAE
encoder's ``image``; the VAE decoder's ``latent``.

Adding a kind: write its model (``models/``), its flat-signature wrapper below, and one :data:`KINDS` entry; the
command line's ``--kind`` offers it from then on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from .checkpoint_files import checkpoint_shapes
from .errors import ImageInputError, LatentInputError, PasdVerifyError, TokenInputError
from .loading import load_model
from .models import PASDControlNetModel, PASDUNet2DConditionModel, VAEDecoder, VAEEncoder, split_vae
from .name_map import NameMap, holds_sha_projections
from .presets import UNET_PRESETS, build_pasd, build_text_encoder, build_unet, build_vae, text_tokens
from .ranges import LATENT_FACTOR, TEXT_LENGTH, UNET_RANGE, check_image, check_latent, check_tokens
from .sha import convert_to_sha, sha_name_map

# A calibration sample: one denoising step's inputs, as a user's pipeline dumps them (quant.calibration's files).
Sample = dict[str, torch.Tensor]
SAMPLE_KEYS = ("latent", "timestep", "encoder_hidden_states")
CONTROL_KEY = "control_image"
TRAIN_TIMESTEPS = 1000  # num_train_timesteps of every SD1.5 scheduler config
BASE_INPUTS = ("sample", "timestep", "encoder_hidden_states")


class CalibrationError(PasdVerifyError):
    """A calibration sample is missing, malformed, or does not fit the model."""


# --- flat-signature wrappers: what tracing, ONNX export and AIMET call ---------------------------------------

class _UNetGraph(nn.Module):
    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _PASDUNetGraph(nn.Module):
    def __init__(self, unet: PASDUNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        *down, mid = residuals
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


class _PASDControlNetGraph(nn.Module):
    def __init__(self, controlnet: PASDControlNetModel):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, control_image):
        rgbs, down, mid = self.controlnet(sample, timestep, encoder_hidden_states, control_image)
        return (*(rgbs or ()), *down, mid)


class _TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids=input_ids, return_dict=False)[0]


class _VAEGraph(nn.Module):
    """Either half of the VAE, under the name ``vae`` (its modules then carry the VAE checkpoint's names after it)."""

    def __init__(self, half: VAEEncoder | VAEDecoder):
        super().__init__()
        self.vae = half

    def forward(self, x):
        return self.vae(x)


def skip_count(unet: UNet2DConditionModel) -> int:
    """How many down residuals a UNet's up path consumes (12 for SD1.5)."""
    return sum(len(block.resnets) for block in unet.up_blocks)


def _residual_names(count: int) -> list[str]:
    return [f"down_residual_{i}" for i in range(count)] + ["mid_residual"]


# --- the graph a kind's model is exported and quantized as ---------------------------------------------------

@dataclass
class ExportGraph:
    """A model wrapped with a flat tensor signature, its input and output names in order, and its kind (None for a
    bare module exported as it is, which is fed by name)."""

    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    kind: ModelKind | None = None

    def feeds(self, sample: Sample, partner: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The graph's inputs for one calibration sample; a kind with a partner takes the inputs the partner's graph
        outputs under the same names (a PASD UNet's residuals, from its ControlNet run on the same sample)."""
        if self.kind is None:
            raise ValueError("a bare module's graph has no sample layout; feed it by input name")
        # the sample's tensors this graph takes (a PASD UNet's sample holds the control image its ControlNet takes)
        feeds = {name: t for name, t in self.kind.layout.feeds(sample).items() if name in self.input_names}
        if self.kind.partner is not None:
            if partner is None:
                raise ValueError(f"a {self.kind.name} graph's inputs {self.input_names[len(feeds)]}... come from its "
                                 f"{self.kind.partner}; pass it")
            producer = graph_of(partner)
            produced = producer(producer.feeds(sample))
            feeds.update({name: produced[name] for name in self.input_names if name not in feeds})
        return feeds

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            outputs = self.module(*(feeds[name] for name in self.input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(self.output_names, outputs))


# --- the kinds -----------------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class ModelKind:
    """What every stage needs to know about one kind of model.

    ``preset(name, seed, **overrides)`` builds the seeded model and its partner (or None) together, as one draw;
    ``wrapper`` is its flat-signature module; ``inputs``/``outputs`` name the graph's tensors for a given model;
    ``layout`` says what its calibration samples hold; ``control`` says whether they carry a [0, 1] control image 8x
    the latent; ``partner`` names the kind whose outputs feed it.
    """

    name: str
    model_class: type[nn.Module] | str  # or "module:Class", for a class of a library imported only when used
    preset: Callable[..., tuple[nn.Module, nn.Module | None]]
    wrapper: type[nn.Module]
    inputs: Callable[[nn.Module], list[str]]
    outputs: Callable[[nn.Module], list[str]]
    layout: SampleLayout
    control: bool = False
    partner: str | None = None
    description: str = ""

    def graph(self, model: nn.Module) -> ExportGraph:
        """``model`` with a flat tensor signature (``model`` is wrapped, not copied)."""
        return ExportGraph(self.wrapper(model).eval(), self.inputs(model), self.outputs(model), self)

    @property
    def class_name(self) -> str:
        cls = self.model_class
        return cls.rpartition(":")[2] if isinstance(cls, str) else cls.__name__

    def holds(self, model: nn.Module) -> bool:
        """Whether ``model`` is of this kind's class. A lazily named class is only looked up when its module is
        loaded: a model of it cannot exist before."""
        cls = self.model_class
        if isinstance(cls, str):
            module, _, name = cls.partition(":")
            if module not in sys.modules:
                return False
            cls = getattr(sys.modules[module], name)
        return isinstance(model, cls)

    def seeded_samples(self, model: nn.Module, count: int, *, latent: tuple[int, int] | None = None,
                       seed: int = 0) -> list[Sample]:
        """``count`` seeded samples of batch 1 for ``model``'s config, at the latent size ``latent`` (default: from
        the config; the text encoder has none)."""
        if latent is not None and (len(latent) != 2 or min(latent) < 1):
            raise CalibrationError(f"latent must be two positive sizes (H W), got {tuple(latent)}")
        size = tuple(latent) if latent is not None else self.layout.default_size(model)
        return [self.layout.draw(model, torch.Generator().manual_seed(seed * 100003 + i), size) for i in range(count)]

    @property
    def sample_keys(self) -> tuple[str, ...]:
        return self.layout.keys

    def report_notes(self, size: tuple[int, int] | None) -> dict[str, Any]:
        """What a report says about the graph's inputs beyond their names: the working size, and the layout's notes
        on how each input or output is computed or converted (``conventions``)."""
        return {**({"latent": list(size)} if size is not None else {}), "conventions": dict(self.layout.notes)}

    def sample_size(self, sample: Sample) -> tuple[int, int] | None:
        """The latent size ``(h, w)`` ``sample`` is at (None for the text encoder)."""
        return self.layout.size(sample)

    def check_sample(self, sample: Sample, model: nn.Module, source: str, *, like: Sample | None = None) -> None:
        """Raise naming ``source`` and the key for anything in ``sample`` that does not fit ``model``."""
        wanted = self.sample_keys
        for key in wanted:
            if key not in sample:
                raise CalibrationError(f"{source}: missing key {key!r}; a sample holds {list(wanted)}")
        for key, tensor in sample.items():
            if key not in wanted:
                raise CalibrationError(f"{source}: unexpected key {key!r}; a sample holds {list(wanted)}")
            if key not in self.layout.integer_keys and not tensor.is_floating_point():
                raise CalibrationError(f"{source}: {key} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                       "expected floating point")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CalibrationError(f"{source}: {key} holds NaN or Inf")
            if 0 in tensor.shape:
                raise CalibrationError(f"{source}: {key} has shape {tuple(tensor.shape)}, which holds nothing")
        try:
            self.layout.check(sample, model, source)
        except (ImageInputError, TokenInputError, LatentInputError) as e:
            raise CalibrationError(str(e)) from e
        if like is not None:
            for key in wanted:
                if sample[key].shape != like[key].shape:
                    raise CalibrationError(f"{source}: {key} has shape {tuple(sample[key].shape)}, the first sample "
                                           f"{tuple(like[key].shape)}; every sample must have the same shapes")

    def calls(self, model: nn.Module, samples: Sequence[Sample], *, partner: nn.Module | None = None,
              device: str | torch.device = "cpu") -> list[Callable[[nn.Module], Any]]:
        """One call per sample that runs a model of this kind on it, through its flat signature; a partner's outputs
        are computed once here, by the float partner."""
        if self.partner is not None and partner is None:
            raise CalibrationError(f"a {self.name} is calibrated on its {self.partner}'s outputs: give the "
                                   f"{self.partner} too")
        graph = self.graph(model)
        if partner is not None:
            partner.to(device)
        calls = []
        for sample in samples:
            feeds = graph.feeds({k: v.to(device) for k, v in sample.items()}, partner)
            args = tuple(feeds[name] for name in graph.input_names)
            calls.append(lambda m, args=args: self.wrapper(m)(*args))
        return calls


def _base_inputs(model: nn.Module) -> list[str]:
    return list(BASE_INPUTS)


def _noise(model: nn.Module) -> list[str]:
    return ["noise"]


def _unet_preset(preset: str, seed: int = 0, **overrides: Any) -> tuple[nn.Module, None]:
    return build_unet(preset, seed=seed, **overrides), None


def _no_overrides(kind: str, overrides: dict[str, Any]) -> None:
    if overrides:
        raise ValueError(f"config overrides apply to the plain UNet only, not to {kind}")


def _pasd_unet_preset(preset: str, seed: int = 0, **overrides: Any) -> tuple[nn.Module, nn.Module]:
    _no_overrides("pasd-unet", overrides)
    return build_pasd(preset, seed=seed)


def _pasd_controlnet_preset(preset: str, seed: int = 0, **overrides: Any) -> tuple[nn.Module, None]:
    _no_overrides("pasd-controlnet", overrides)
    return build_pasd(preset, seed=seed)[1], None


def _controlnet_outputs(model: nn.Module) -> list[str]:
    rgbs = len(model.controlnet_cond_embedding.to_rgbs) if model.config.return_rgbs else 0
    return [f"rgb_{i}" for i in range(rgbs)] + _residual_names(len(model.controlnet_down_blocks))


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


def _text_encoder_preset(preset: str, seed: int = 0, **overrides: Any) -> tuple[nn.Module, None]:
    return build_text_encoder(preset, seed=seed, **overrides), None


def _vae_preset(half: int) -> Callable[..., tuple[nn.Module, None]]:
    def preset(preset: str, seed: int = 0, **overrides: Any) -> tuple[nn.Module, None]:
        return split_vae(build_vae(preset, seed=seed, **overrides))[half], None
    return preset


# In lookup order: a subclass before the class it extends (a PASD UNet is a UNet2DConditionModel).
KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (
    ModelKind("pasd-unet", PASDUNet2DConditionModel, _pasd_unet_preset, _PASDUNetGraph,
              inputs=lambda m: _base_inputs(m) + _residual_names(skip_count(m)), outputs=_noise,
              layout=_denoiser_layout(control=True), control=True, partner="pasd-controlnet",
              description="PASD's UNet, run on its ControlNet's residuals"),
    ModelKind("pasd-controlnet", PASDControlNetModel, _pasd_controlnet_preset, _PASDControlNetGraph,
              inputs=lambda m: _base_inputs(m) + [CONTROL_KEY], outputs=_controlnet_outputs,
              layout=_denoiser_layout(control=True), control=True,
              description="PASD's ControlNet: RGB side outputs and the UNet's residuals"),
    ModelKind("unet", UNet2DConditionModel, _unet_preset, _UNetGraph, inputs=_base_inputs, outputs=_noise,
              layout=_denoiser_layout(control=False), description="SD1.5's UNet2DConditionModel"),
    ModelKind("text-encoder", "transformers.models.clip.modeling_clip:CLIPTextModel", _text_encoder_preset,
              _TextEncoderGraph, inputs=lambda m: ["input_ids"], outputs=lambda m: ["last_hidden_state"],
              layout=_TEXT_LAYOUT, description="SD1.5's CLIP text encoder (transformers' CLIPTextModel)"),
    ModelKind("vae-encoder", VAEEncoder, _vae_preset(0), _VAEGraph, inputs=lambda m: ["image"],
              outputs=lambda m: ["latent_mean", "latent_logvar"], layout=_VAE_IMAGE_LAYOUT,
              description="the VAE's encoder: the photo becomes PASD's starting latent"),
    ModelKind("vae-decoder", VAEDecoder, _vae_preset(1), _VAEGraph, inputs=lambda m: ["latent"],
              outputs=lambda m: ["image"], layout=_VAE_LATENT_LAYOUT,
              description="the VAE's decoder: the final latent becomes the picture"),
)}


def get_kind(name: str) -> ModelKind:
    """The registry entry called ``name``."""
    if name not in KINDS:
        raise PasdVerifyError(f"unknown model kind {name!r}; choose one of {sorted(KINDS)}")
    return KINDS[name]


def kind_of(model: nn.Module) -> ModelKind:
    """The registry entry of ``model`` (MHA or SHA form alike: the rewrite swaps modules inside it)."""
    for kind in KINDS.values():
        if kind.holds(model):
            return kind
    raise PasdVerifyError(f"{type(model).__name__} is not a kind pasd-verify knows; expected one of "
                          f"{', '.join(k.class_name for k in KINDS.values())}")


def graph_of(model: nn.Module) -> ExportGraph:
    """``model`` as the flat-signature graph its kind defines."""
    return kind_of(model).graph(model)


# --- models in the form a command works on -------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model in the form a command asked for, its partner when its kind needs one, and where they came from."""

    model: nn.Module
    partner: nn.Module | None
    kind: ModelKind
    source: dict[str, Any]
    name_map: NameMap | None = None


def preset_model(preset: str, kind: str, *, seed: int = 0, form: str = "mha", **overrides: Any) -> LoadedModel:
    """An embedded seeded model of ``kind`` and its partner, in ``form`` (the partner stays float MHA: it makes the
    model's inputs); ``overrides`` replace entries of the plain UNet's config (:func:`pasd_verify.presets.build_unet`)."""
    if preset not in UNET_PRESETS:
        raise PasdVerifyError(f"unknown preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
    entry = get_kind(kind)
    model, partner = entry.preset(preset, seed, **overrides)
    name_map = convert_to_sha(model) if _form(form) == "sha" else None
    source = {"preset": preset, "kind": kind, "seed": seed, "form": form, "model_class": type(model).__name__}
    return LoadedModel(model, partner, entry, source, name_map)


def _form(form: str) -> str:
    if form not in ("mha", "sha"):
        raise PasdVerifyError(f"form must be 'mha' or 'sha', got {form!r}")
    return form


def load_model_form(model_config: str | os.PathLike, state_dict: str | os.PathLike, *, form: str = "sha",
                    model_class: str | None = None, partner: str | os.PathLike | None = None,
                    kind: str | None = None) -> LoadedModel:
    """The model a config and an MHA or SHA checkpoint describe, in ``form``, and its partner from the folder
    ``partner``: an MHA checkpoint is rewritten to SHA in memory for ``form="sha"``; an SHA checkpoint (the
    ``NameMap`` naming scheme) loads into the SHA model directly. ``kind`` names the network when the folder holds
    more than one (a VAE: ``vae-encoder`` or ``vae-decoder``), and must match the folder otherwise."""
    state_dict = Path(state_dict)
    sha_file = holds_sha_projections(checkpoint_shapes(state_dict))
    if sha_file and _form(form) != "sha":
        raise PasdVerifyError(f"{state_dict}: holds an SHA checkpoint; use --form sha")
    whole = load_model(model_config, model_class=model_class, weights=state_dict, sha=sha_file)
    model = _network(whole, kind, model_config)
    name_map = sha_name_map(model) if sha_file else (convert_to_sha(model) if _form(form) == "sha" else None)
    loaded_partner = load_model(partner) if partner is not None else None
    source = {"model_config": str(model_config), "state_dict": str(state_dict), "form": form,
              "model_class": type(whole).__name__, **({"kind": kind} if kind else {})}
    return LoadedModel(model, loaded_partner, kind_of(model), source, name_map)


def _network(whole: nn.Module, kind: str | None, source: str | os.PathLike) -> nn.Module:
    """The network of ``kind`` in a loaded folder's model: the model itself, or one half of a VAE."""
    if isinstance(whole, AutoencoderKL):
        halves = {"vae-encoder": 0, "vae-decoder": 1}
        if kind not in halves:
            raise PasdVerifyError(f"{source}: a VAE holds two networks; choose --kind vae-encoder or --kind vae-decoder")
        return split_vae(whole)[halves[kind]]
    if kind is not None and kind_of(whole).name != kind:
        raise PasdVerifyError(f"{source}: holds a {kind_of(whole).name} ({type(whole).__name__}), not a {kind}")
    return whole
