"""Whole conversions of a user's files, the layer the command line calls.

:func:`convert_files` takes a model config, an MHA checkpoint and optionally AIMET encodings, and writes the
SHA checkpoint, the SHA encodings and the name map into one folder: all of them or none. Everything is checked
(checkpoint against config, encodings against the converted model) before an output file appears.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint import checkpoint_shapes, check_checkpoint_matches, checkpoint_format, convert_checkpoint_file
from .encodings import (
    EncodingsError,
    check_encodings,
    convert_version,
    load_encodings,
    mha_to_sha,
    required_sha_encodings,
    save_encodings,
)
from .errors import PasdVerifyError
from .presets import load_config, model_from_config, name_map_from_config
from .sha import convert_to_sha


def convert_checkpoint(config: str | os.PathLike | dict, src: str | os.PathLike, dst: str | os.PathLike,
                       to: str = "sha") -> dict[str, int]:
    """Rewrite checkpoint ``src`` into ``dst`` for the model a diffusers ``config`` describes (see
    :func:`pasd_verify.checkpoint.convert_checkpoint_file`); the name map comes from the config, on the meta device."""
    return convert_checkpoint_file(src, dst, name_map_from_config(config), to=to)


def _sha_encodings(src: str | os.PathLike, name_map, sha_shapes: dict, dst: str | os.PathLike,
                   version: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """MHA encodings file -> validated SHA encodings and the rewrite's counts; raises listing every problem."""
    mha_encodings = load_encodings(src)
    sha_encodings, report = mha_to_sha(mha_encodings, name_map, source=str(src))
    if version:
        sha_encodings = convert_version(sha_encodings, version, source=str(src))
    problems = check_encodings(sha_encodings, sha_shapes, source=str(dst),
                               required=required_sha_encodings(mha_encodings, name_map, str(src)))
    if problems:
        raise EncodingsError(f"{len(problems)} problem(s) in the converted encodings:\n  " + "\n  ".join(problems))
    return sha_encodings, {**report.as_dict(), "problems": 0}


def convert_encodings_file(model_config: str | os.PathLike | dict, src: str | os.PathLike,
                           dst: str | os.PathLike) -> dict[str, Any]:
    """Rewrite MHA encodings ``src`` into validated SHA encodings ``dst`` for the model a config describes."""
    model = model_from_config(model_config, device="meta")
    name_map = convert_to_sha(model)
    sha_encodings, counts = _sha_encodings(src, name_map, _parameter_shapes(model), dst)
    save_encodings(sha_encodings, dst)
    return counts


def _parameter_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def convert_files(model_config: str | os.PathLike, state_dict: str | os.PathLike, out_dir: str | os.PathLike,
                  encodings: str | os.PathLike | None = None, encodings_version: str | None = None) -> dict[str, Any]:
    """Convert an MHA checkpoint (and AIMET encodings) to SHA into ``out_dir``; returns a summary of counts.

    Writes ``state_dict_sha.<input's suffix>``, ``parameters_sha.encodings`` (with ``encodings``) and
    ``name_map.json``. The encodings keep their format unless ``encodings_version`` names the other one.
    Raises :class:`PasdVerifyError` naming the file and key on any problem, in which case no output file is
    left behind. Inputs are never overwritten.
    """
    config_path, state_dict, out_dir = Path(model_config), Path(state_dict), Path(out_dir)
    checkpoint_format(state_dict)  # an unknown suffix fails before any work
    config = load_config(config_path)
    model = model_from_config(config, device="meta")
    mha_shapes = _parameter_shapes(model)
    check_checkpoint_matches(checkpoint_shapes(state_dict), mha_shapes, str(state_dict))
    name_map = convert_to_sha(model)
    sha_shapes = _parameter_shapes(model)

    suffix = state_dict.name[len(state_dict.name.rsplit(".", 1)[0]):]
    outputs = {"state_dict": out_dir / f"state_dict_sha{suffix}", "name_map": out_dir / "name_map.json"}
    if encodings is not None:
        outputs["encodings"] = out_dir / "parameters_sha.encodings"
    inputs = {p.resolve() for p in (config_path, state_dict, *([Path(encodings)] if encodings else [])) if p.exists()}
    for path in outputs.values():
        if path.exists() and path.resolve() in inputs:
            raise PasdVerifyError(f"{path}: refusing to overwrite an input; choose another --out")

    summary: dict[str, Any] = {"attention_modules": len({k.rsplit(".", 2)[0] for k in name_map}),
                               "checkpoint_keys_split": len(name_map)}
    sha_encodings = None
    if encodings is not None:  # checked first: it is cheap, the checkpoint rewrite is not
        sha_encodings, counts = _sha_encodings(encodings, name_map, sha_shapes, outputs["encodings"],
                                               encodings_version)
        summary.update(counts)

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pasd-verify-", dir=out_dir))
    try:
        staged = {key: staging / path.name for key, path in outputs.items()}
        counts = convert_checkpoint_file(state_dict, staged["state_dict"], name_map, to="sha")
        # the written file, read back, must fit the converted model exactly (a strict load by shapes)
        check_checkpoint_matches(checkpoint_shapes(staged["state_dict"]), sha_shapes, str(outputs["state_dict"]))
        summary["checkpoint_tensors_out"] = counts["tensors_out"]
        if sha_encodings is not None:
            save_encodings(sha_encodings, staged["encodings"])
        staged["name_map"].write_text(json.dumps(name_map, indent=2) + "\n")
        for key, path in outputs.items():
            os.replace(staged[key], path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary["outputs"] = {key: str(path) for key, path in outputs.items()}
    return summary
