"""pasd-verify: convert Stable Diffusion 1.5 / PASD attention to single-head form and prove the numbers stay.

Data flow: ``sha`` (module rewrite, which yields the MHA -> SHA ``name_map``) -> ``checkpoint`` (state dicts) ->
``encodings`` (AIMET encodings) -> ``quant`` (AdaRound) / ``export`` (ONNX, QNN HTP).

The names below are imported when first used (PEP 562): importing ``pasd_verify.cli`` must not cost torch's and
diffusers' 5-10 s, so that the command line handles SIGTERM and answers ``--help`` before they load.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "convert_checkpoint_file": "checkpoint", "merge_state_dict": "checkpoint", "split_state_dict": "checkpoint",
    "AttentionInputError": "errors", "CheckpointError": "errors", "PasdVerifyError": "errors",
    "UnsupportedAttentionError": "errors", "NameMap": "name_map", "NameMapError": "name_map",
    "SHAAttention": "sha", "convert_to_mha": "sha", "convert_to_sha": "sha",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
