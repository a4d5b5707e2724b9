"""Assertions shared by the test modules."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping

import torch

from pasd_verify.cli import build_parser


def assert_same_state_dict(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *,
                           ordered: bool = True) -> None:
    """The same keys (in the same order, unless a file reader chose its own) and each tensor bit-identical, of the
    same dtype, on the same device, naming the first key that differs."""
    if ordered:
        assert list(actual) == list(expected), "the keys or their order differ"
    else:
        assert set(actual) == set(expected), f"keys differ: {sorted(set(actual) ^ set(expected))[:5]}"
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=0, equal_nan=False, check_dtype=True,
                                   check_device=True, msg=lambda message, key=key: f"{key}: {message}")


def option_choices(command: str, flag: str) -> list[str]:
    """The choices ``pasd-verify COMMAND`` offers for ``FLAG``, read from the command line's own parser."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in commands.choices[command]._actions if flag in a.option_strings)
    return list(action.choices)


def write_folders(root):
    """The tiny preset in the layouts users hold: an SD1.5 folder as diffusers and transformers save one, and a
    PASD folder with its unet/ and controlnet/."""
    from pasd_verify.pipeline import preset_components
    from pasd_verify.presets import write_tokenizer

    components = preset_components("tiny", seed=0)
    sd, pasd = root / "sd15", root / "pasd"
    components.text_encoder.save_pretrained(sd / "text_encoder")
    components.vae.save_pretrained(sd / "vae")
    write_tokenizer(sd / "tokenizer")
    (sd / "scheduler").mkdir()
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(components.scheduler_config))
    components.unet.save_pretrained(pasd / "unet")
    components.controlnet.save_pretrained(pasd / "controlnet")
    return sd, pasd
