"""Models from local diffusers folders and configs (no hub, no network), PASD's folders included.

PASD names its classes ``UNet2DConditionModel`` and ``ControlNetModel`` and saves them with diffusers'
``save_pretrained``, so a PASD folder's ``config.json`` names the stock class. What the folder really holds is
read from its weights: pixel attentions (``up_blocks.*.pixel_attentions.*``) make a PASD UNet; RGB side outputs
(``controlnet_cond_embedding.to_rgbs.*``) or RRDB blocks (``controlnet_cond_embedding.preprocesser.*``) make a PASD
ControlNet and set its ``return_rgbs`` / ``use_rrdb``. :func:`choose_model` makes that decision and says why;
:func:`load_model` is the ``from_pretrained`` that uses it.

SD1.5's ``text_encoder/`` folder is transformers' layout: its ``config.json`` names ``architectures:
["CLIPTextModel"]`` instead of a ``_class_name``, and its weights (``model.safetensors``) carry the ``text_model.``
prefix transformers 4.x wrote (and, in older files, the ``position_ids`` buffer), which transformers 5's
``CLIPTextModel`` no longer has: a :class:`ModelChoice` records that prefix, so that checks and conversions speak the
file's names and loading strips them.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn

from ..checkpoint_files import check_checkpoint_matches, checkpoint_shapes, load_model_weights
from ..errors import PasdVerifyError
from ..models import PASDControlNetModel, PASDUNet2DConditionModel
from ..name_map import NameMap
from ..sha import convert_to_sha

logger = logging.getLogger(__name__)

MODEL_CLASSES: dict[str, type[nn.Module] | str] = {
    **{cls.__name__: cls
       for cls in (UNet2DConditionModel, ControlNetModel, PASDUNet2DConditionModel, PASDControlNetModel, AutoencoderKL)},
    # transformers' text encoder, imported only for a folder that holds one
    "CLIPTextModel": "transformers:CLIPTextModel",
}
# diffusers' weight file names, in the order from_pretrained prefers them, then transformers'; .pth is accepted too.
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.pth",
                "model.safetensors", "pytorch_model.bin")
# What transformers 4.x wrote before every text encoder key, and the buffer older files kept.
TEXT_MODEL_PREFIX = "text_model."
_POSITION_IDS = "embeddings.position_ids"
# Classes whose models keep a buffer their checkpoints do not hold (non-persistent: made at init)
_UNSAVED_BUFFERS = frozenset({"CLIPTextModel"})


def resolve_class(name: str) -> type[nn.Module]:
    """The class :data:`MODEL_CLASSES` names ``name``."""
    cls = MODEL_CLASSES[name]
    if isinstance(cls, str):
        module, _, attribute = cls.partition(":")
        cls = getattr(importlib.import_module(module), attribute)
    return cls

_PIXEL_ATTENTION = ".pixel_attentions."
_PASD_CONTROLNET_FLAGS = {"return_rgbs": "controlnet_cond_embedding.to_rgbs.",
                          "use_rrdb": "controlnet_cond_embedding.preprocesser."}
# PASD's own defaults for a ControlNet config that names neither flag (REFERENCE section 3).
_PASD_CONTROLNET_DEFAULTS = {"return_rgbs": True, "use_rrdb": False}


@dataclass(frozen=True)
class ModelChoice:
    """Which class a config (and its checkpoint) describes, the config values the weights decided, and why."""

    cls: type[nn.Module]
    reason: str
    overrides: dict[str, Any] = field(default_factory=dict)
    key_prefix: str = ""  # what the checkpoint puts before the model's own names (a 4.x text encoder's text_model.)
    file_only: dict[str, tuple[int, ...]] = field(default_factory=dict)  # checkpoint entries the model does not hold

    def file_shapes(self, model_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The model's state-dict shapes under the checkpoint's names, with the entries only the file holds."""
        return {**{self.key_prefix + k: v for k, v in model_shapes.items()}, **self.file_only}

    def model_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's state dict under the model's own names, without the entries only the file holds."""
        return {k[len(self.key_prefix):]: v for k, v in state.items() if k not in self.file_only}

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def load_device(self) -> str:
        """Where a model about to be given a checkpoint's tensors is built: on ``meta`` (no memory, no random init),
        except a class whose buffers its checkpoints do not hold, which must make them itself."""
        return "cpu" if self.name in _UNSAVED_BUFFERS else "meta"

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def load_config(config: str | os.PathLike | dict) -> dict[str, Any]:
    """A diffusers config dict from a dict, a ``config.json`` or a model folder holding one."""
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise PasdVerifyError(f"{path}: no such config file") from e
    except UnicodeDecodeError as e:
        raise PasdVerifyError(f"{path}: not a text file ({e.reason})") from e
    except json.JSONDecodeError as e:
        raise PasdVerifyError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(loaded, dict):
        raise PasdVerifyError(f"{path}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def _source(config: str | os.PathLike | dict) -> str:
    return "<config dict>" if isinstance(config, dict) else str(config)


def choose_model(config: str | os.PathLike | dict, keys: Iterable[str] | None = None, *,
                 model_class: str | None = None) -> ModelChoice:
    """The model class a config describes, reading PASD's folders by their weights' names ``keys``.

    ``model_class`` (one of :data:`MODEL_CLASSES`) overrides the class; the PASD ControlNet's ``return_rgbs`` /
    ``use_rrdb`` still follow the weights where ``keys`` are given, since a checkpoint without those weights
    cannot load into a model that has them.
    """
    cfg = load_config(config)
    shapes = keys if isinstance(keys, Mapping) else None  # checkpoint_shapes' dict: the keys with their shapes
    keys = None if keys is None else list(keys)
    if model_class is not None:
        if model_class not in MODEL_CLASSES:
            raise PasdVerifyError(f"model class {model_class!r} is not one of {sorted(MODEL_CLASSES)}")
        cls, reason = resolve_class(model_class), "given explicitly"
    else:
        cls, reason = _class_from(cfg, keys, _source(config))
    if cls.__name__ == "CLIPTextModel":
        return _text_encoder_choice(cls, reason, keys, shapes)
    if cls is not PASDControlNetModel:
        return ModelChoice(cls, reason)
    overrides, notes = _controlnet_flags(cfg, keys)
    return ModelChoice(cls, "; ".join([reason, *notes]), overrides)


def _text_encoder_choice(cls: type[nn.Module], reason: str, keys: list[str] | None,
                         shapes: Mapping[str, Any] | None) -> ModelChoice:
    """A text encoder's checkpoint names: with or without transformers 4.x's ``text_model.`` prefix, with or without
    the ``position_ids`` buffer (a constant ``arange``, which the model builds itself)."""
    if not keys or not all(k.startswith(TEXT_MODEL_PREFIX) for k in keys):
        return ModelChoice(cls, reason)
    position_ids = TEXT_MODEL_PREFIX + _POSITION_IDS
    file_only = {position_ids: tuple(shapes[position_ids]) if shapes else None} if position_ids in keys else {}
    return ModelChoice(cls, f"{reason}; the checkpoint's keys carry transformers 4.x's {TEXT_MODEL_PREFIX} prefix",
                       key_prefix=TEXT_MODEL_PREFIX, file_only=file_only)


def _class_from(cfg: dict, keys: list[str] | None, source: str) -> tuple[type[nn.Module], str]:
    class_name = cfg.get("_class_name")
    architectures = cfg.get("architectures")
    if class_name is None and architectures == ["CLIPTextModel"]:  # transformers' layout names no _class_name
        return resolve_class("CLIPTextModel"), "config architectures CLIPTextModel (transformers' layout)"
    if not isinstance(class_name, str) or class_name not in MODEL_CLASSES:
        raise PasdVerifyError(f"config {source}: _class_name {class_name!r} is not one of {sorted(MODEL_CLASSES)}; "
                              f"name the class with --model-class")
    if class_name == "UNet2DConditionModel" and keys is not None:
        pixel = sum(_PIXEL_ATTENTION in k for k in keys)
        if pixel:
            return PASDUNet2DConditionModel, f"the checkpoint has {pixel} pixel-attention weights (PASD's UNet)"
    if class_name == "ControlNetModel":
        pasd_keys = sorted(k for k in _PASD_CONTROLNET_FLAGS if k in cfg)
        if pasd_keys:
            return PASDControlNetModel, f"the config has PASD's ControlNet key(s) {', '.join(pasd_keys)}"
        found = [flag for flag, prefix in _PASD_CONTROLNET_FLAGS.items() if any(k.startswith(prefix) for k in keys or ())]
        if found:
            return PASDControlNetModel, f"the checkpoint has PASD's ControlNet weights ({', '.join(found)})"
    return MODEL_CLASSES[class_name], f"config _class_name {class_name}"


def _controlnet_flags(cfg: dict, keys: list[str] | None) -> tuple[dict[str, bool], list[str]]:
    """``return_rgbs`` / ``use_rrdb`` from the weights when given, else from the config, else PASD's defaults."""
    flags, notes = {}, []
    for flag, prefix in _PASD_CONTROLNET_FLAGS.items():
        if keys is not None:
            flags[flag] = any(k.startswith(prefix) for k in keys)
            if flag in cfg and bool(cfg[flag]) != flags[flag]:
                notes.append(f"config says {flag}={cfg[flag]}, the checkpoint's weights say {flags[flag]}: "
                             "following the weights")
        else:
            flags[flag] = bool(cfg.get(flag, _PASD_CONTROLNET_DEFAULTS[flag]))
    notes.append(", ".join(f"{k}={v}" for k, v in flags.items()))
    return flags, notes


# Config fields that count something (channels, layers, heads, pixels): each number in them is at least 1.
_COUNTS = frozenset({"in_channels", "out_channels", "conditioning_channels", "block_out_channels", "layers_per_block",
                     "norm_num_groups", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
                     "transformer_layers_per_block", "sample_size", "conv_in_kernel", "conv_out_kernel"})


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value can be what a diffusers ``__init__`` annotation says (JSON lists stand for tuples; a
    ``tuple[int]`` is read as diffusers uses it, a tuple of ints of any length)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list) or annotation in (tuple, list):
        element = next((a for a in args if a is not Ellipsis), Any)
        return isinstance(value, (list, tuple)) and all(_fits(v, element) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True  # a type this check does not know: diffusers decides


def _numbers(value: Any) -> Iterator[int]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, int) and not isinstance(value, bool):
        yield value


def check_config_fields(cfg: dict[str, Any], cls: type[nn.Module], source: str) -> None:
    """Raise naming the config and the field for a value of the wrong type for ``cls`` (``"two"`` for
    ``attention_head_dim``) or a count below 1 (a negative width), before diffusers meets it as a traceback."""
    signature = inspect.signature(cls.__init__).parameters
    for key, value in cfg.items():
        if key.startswith("_") or key not in signature:
            continue
        annotation = signature[key].annotation
        if isinstance(annotation, str):  # a postponed annotation: too costly to resolve for a check
            continue
        if not _fits(value, annotation):
            wanted = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            raise PasdVerifyError(f"config {source}: {key} is {value!r}; {cls.__name__} takes {wanted}")
        if key in _COUNTS and any(n < 1 for n in _numbers(value)):
            raise PasdVerifyError(f"config {source}: {key} is {value!r}; it counts something, so each number in it "
                                  "must be at least 1")


def build_model(config: str | os.PathLike | dict, choice: ModelChoice, *,
                device: str | torch.device = "meta") -> nn.Module:
    """Instantiate ``choice`` from ``config``; on ``meta`` no memory is used."""
    cfg = {**load_config(config), **choice.overrides}
    library = "transformers" if choice.name == "CLIPTextModel" else "diffusers"
    if library == "diffusers":
        check_config_fields(cfg, choice.cls, _source(config))
    with torch.device(device):
        try:
            if library == "transformers":
                config_class = choice.cls.config_class
                return choice.cls._from_config(config_class.from_dict(cfg), attn_implementation="sdpa").eval()
            return choice.cls.from_config(cfg).eval()
        except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, AttributeError) as e:
            # fields that are each fine but do not fit together (a list per block of the wrong length, ...)
            raise PasdVerifyError(f"config {_source(config)}: {library} cannot build a {choice.cls.__name__} from "
                                  f"it: {type(e).__name__}: {e}") from e


def model_from_config(config: str | os.PathLike | dict, *, keys: Iterable[str] | None = None,
                      model_class: str | None = None, device: str | torch.device = "meta") -> nn.Module:
    """The model a config (and optionally its checkpoint's ``keys``) describes; see :func:`choose_model`."""
    return build_model(config, choose_model(config, keys, model_class=model_class), device=device)


def name_map_from_config(config: str | os.PathLike | dict, *, keys: Iterable[str] | None = None,
                         model_class: str | None = None) -> NameMap:
    """The MHA -> SHA name map of the model a config describes, computed on the meta device (instant, no memory)."""
    return convert_to_sha(model_from_config(config, keys=keys, model_class=model_class))


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry's shape (works on the meta device)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def find_weights(folder: str | os.PathLike) -> Path:
    """The weights file of a diffusers model folder."""
    folder = Path(folder)
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise PasdVerifyError(f"{folder}: no weights file; expected one of {WEIGHT_NAMES}")


def load_model(folder: str | os.PathLike, *, model_class: str | None = None,
               weights: str | os.PathLike | None = None, sha: bool = False) -> nn.Module:
    """A model with its weights from a local diffusers folder, like diffusers' ``from_pretrained``, but the class
    comes from :func:`choose_model`: a PASD folder gives the PASD model, whatever its config's ``_class_name``.

    The weights (``weights``, or the folder's ``diffusion_pytorch_model.*``) must match the model exactly; an
    error names the file and the first missing, unexpected or mis-shaped key. Returns the model in eval mode on
    the CPU, with the weights' dtype. ``sha``: the weights are in SHA form (the ``NameMap`` naming scheme), and load
    into the model rewritten to SHA.
    """
    weights = Path(weights) if weights is not None else find_weights(folder)
    shapes = checkpoint_shapes(weights)
    choice = choose_model(folder, shapes, model_class=model_class)
    # Built on meta and given the file's tensors: no random init, no second copy of the weights. The text encoder
    # keeps a buffer its checkpoints do not hold (position_ids, non-persistent), which only a real init makes; it
    # is small enough (0.5 GB at SD1.5 size) to build on the CPU.
    model = build_model(folder, choice, device=choice.load_device)
    if sha:
        convert_to_sha(model)
    check_checkpoint_matches(shapes, choice.file_shapes(parameter_shapes(model)),
                             f"{weights} (SHA form)" if sha else str(weights), folder)
    model.load_state_dict(choice.model_state(load_model_weights(weights)), strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise PasdVerifyError(f"{weights}: {choice.name} has state outside its checkpoint; cannot load it here")
    logger.info("%s: loaded as %s", folder, choice.describe())
    return model
