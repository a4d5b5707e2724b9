"""Whole conversions of a user's files, the layer the command line calls."""

from __future__ import annotations

import os

from .checkpoint import convert_checkpoint_file
from .presets import name_map_from_config


def convert_checkpoint(config: str | os.PathLike | dict, src: str | os.PathLike, dst: str | os.PathLike,
                       to: str = "sha") -> dict[str, int]:
    """Rewrite checkpoint ``src`` into ``dst`` for the model a diffusers ``config`` describes (see
    :func:`pasd_verify.checkpoint.convert_checkpoint_file`); the name map comes from the config, on the meta device."""
    return convert_checkpoint_file(src, dst, name_map_from_config(config), to=to)
