"""Seeded model presets and building models from local diffusers configs (no hub, no network).

``tiny`` runs a whole UNet forward in milliseconds on a CPU; ``sd15`` has Stable Diffusion 1.5's real
dimensions (320/640/1280/1280 channels, 8 heads, text 77 x 768) with random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from .errors import PasdVerifyError
from .sha import NameMap, convert_to_sha

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


def build_unet(preset: str = "tiny", *, seed: int = 0) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` of the named preset, with weights drawn from ``torch.manual_seed(seed)``."""
    if preset not in UNET_PRESETS:
        raise PasdVerifyError(f"unknown preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**UNET_PRESETS[preset]).eval()


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


_CONFIG_CLASSES = {cls.__name__: cls for cls in (UNet2DConditionModel, ControlNetModel)}


def load_config(config: str | os.PathLike | dict) -> dict[str, Any]:
    """A diffusers config dict from a dict, a ``config.json`` or a model folder holding one."""
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise PasdVerifyError(f"{path}: no such config file") from e
    except json.JSONDecodeError as e:
        raise PasdVerifyError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def model_from_config(config: str | os.PathLike | dict, *, device: str | torch.device = "meta") -> nn.Module:
    """Instantiate the diffusers model a config describes, by its ``_class_name``; on ``meta`` no memory is used."""
    cfg = load_config(config)
    class_name = cfg.get("_class_name")
    if class_name not in _CONFIG_CLASSES:
        raise PasdVerifyError(
            f"config {config if not isinstance(config, dict) else '<dict>'}: _class_name {class_name!r} is not one "
            f"of {sorted(_CONFIG_CLASSES)}"
        )
    with torch.device(device):
        return _CONFIG_CLASSES[class_name].from_config(cfg)


def name_map_from_config(config: str | os.PathLike | dict) -> NameMap:
    """The MHA -> SHA name map of the model a config describes, computed on the meta device (instant, no memory)."""
    return convert_to_sha(model_from_config(config, device="meta"))
