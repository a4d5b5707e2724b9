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

Adding a kind: write its model (``models/``), its flat-signature wrapper below, its :class:`SampleLayout`
(:mod:`.samples`), and one :data:`KINDS` entry; the command line's ``--kind`` offers it from then on. Which class a
user's model folder holds is read from its config and weights in :mod:`.loading`, the one other place that names
model classes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from ..checkpoint_files import checkpoint_shapes
from ..errors import ImageInputError, LatentInputError, PasdVerifyError, TokenInputError
from ..models import PASDControlNetModel, PASDUNet2DConditionModel, VAEDecoder, VAEEncoder, split_vae
from ..name_map import NameMap, holds_sha_projections
from ..presets import UNET_PRESETS, build_pasd, build_text_encoder, build_unet, build_vae
from ..sha import convert_to_sha, sha_name_map
from .loading import load_model
from .samples import (_TEXT_LAYOUT, _VAE_IMAGE_LAYOUT, _VAE_LATENT_LAYOUT, BASE_INPUTS, CONTROL_KEY, SAMPLE_KEYS,
                      TRAIN_TIMESTEPS, CalibrationError, Sample, SampleLayout, _denoiser_layout)

__all__ = ["BASE_INPUTS", "CONTROL_KEY", "KINDS", "SAMPLE_KEYS", "TRAIN_TIMESTEPS", "CalibrationError", "ExportGraph",
           "LoadedModel", "ModelKind", "Sample", "SampleLayout", "get_kind", "graph_of", "kind_of", "load_model_form",
           "networks_of", "preset_model", "skip_count"]


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


def networks_of(whole: nn.Module) -> dict[str, nn.Module]:
    """The networks a loaded folder's model holds, by kind: a VAE's two halves (views of its modules), else the
    model itself."""
    if isinstance(whole, AutoencoderKL):
        return dict(zip(("vae-encoder", "vae-decoder"), split_vae(whole)))
    return {kind_of(whole).name: whole}


def _network(whole: nn.Module, kind: str | None, source: str | os.PathLike) -> nn.Module:
    """The network of ``kind`` in a loaded folder's model: the model itself, or one half of a VAE."""
    found = networks_of(whole)
    if len(found) > 1 and kind not in found:
        raise PasdVerifyError(f"{source}: a VAE holds two networks; choose "
                              + " or ".join(f"--kind {name}" for name in found))
    if kind is not None and kind not in found:
        raise PasdVerifyError(f"{source}: holds a {kind_of(whole).name} ({type(whole).__name__}), not a {kind}")
    return found[kind] if kind is not None else whole
