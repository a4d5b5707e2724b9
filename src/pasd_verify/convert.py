"""Whole conversions of a user's files, the layer the command line calls.

:func:`convert_files` takes a model config, an MHA checkpoint and optionally AIMET encodings, and writes the
SHA checkpoint, the SHA encodings and the name map into one folder: all of them or none. Everything is checked
(checkpoint against config, encodings against the converted model) before an output file appears.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import convert_checkpoint_file
from .checkpoint_files import (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, check_checkpoint_matches, checkpoint_format,
                               checkpoint_shapes)
from .encodings import EncodingsError, convert_version, load_encodings_layout, mha_to_sha, save_encodings
from .encodings_check import check_encodings, required_sha_encodings
from .io import refuse_overwriting_inputs, staged_outputs
from .kinds.loading import ModelChoice, build_model, choose_model, parameter_shapes
from .name_map import NameMap
from .sha import convert_to_sha


@dataclass
class _Conversion:
    """A checkpoint checked against the model it is for: the model's shapes in both forms and the name map."""

    choice: ModelChoice
    mha_shapes: dict[str, tuple[int, ...]]
    sha_shapes: dict[str, tuple[int, ...]]
    name_map: NameMap

    def shapes(self, form: str) -> dict[str, tuple[int, ...]]:
        return self.sha_shapes if form == "sha" else self.mha_shapes


def _plan(config: str | os.PathLike | dict, checkpoint: Path, form: str, model_class: str | None) -> _Conversion:
    """Choose the model from the config and the checkpoint's keys, and check the checkpoint against it in ``form``."""
    checkpoint_format(checkpoint)  # an unknown suffix fails before any work
    shapes = checkpoint_shapes(checkpoint)
    choice = choose_model(config, shapes, model_class=model_class)
    model = build_model(config, choice, device="meta")
    mha_shapes = choice.file_shapes(parameter_shapes(model))
    # every name below is the checkpoint's (a 4.x text encoder's carry text_model.), the name map's included
    name_map = convert_to_sha(model).prefixed(choice.key_prefix)
    conversion = _Conversion(choice, mha_shapes, choice.file_shapes(parameter_shapes(model)), name_map)
    check_checkpoint_matches(shapes, conversion.shapes(form), f"{checkpoint} ({form.upper()} form)",
                             None if isinstance(config, dict) else config)
    return conversion


def _rewrite_checked(conversion: _Conversion, src: Path, staged: Path, final: Path, to: str) -> dict[str, int]:
    """Rewrite ``src`` into ``staged``, then read the written file back and check it fits the model in form ``to``."""
    counts = convert_checkpoint_file(src, staged, conversion.name_map, to=to)
    check_checkpoint_matches(checkpoint_shapes(staged), conversion.shapes(to), f"{final} ({to.upper()} form)")
    return counts


def convert_checkpoint(config: str | os.PathLike | dict, src: str | os.PathLike, dst: str | os.PathLike,
                       to: str = "sha", *, model_class: str | None = None) -> dict[str, Any]:
    """Rewrite checkpoint ``src`` into ``dst`` (to ``"sha"`` or back to ``"mha"``) for the model a diffusers config
    describes, with every check of ``pasd-verify convert``: the model is chosen from the config and the
    checkpoint's keys (PASD's folders included, see :func:`pasd_verify.kinds.loading.choose_model`; ``model_class``
    overrides), ``src`` must match it exactly, and the written file is read back and checked against the
    converted model before it appears at ``dst``. On any error nothing is written. Returns counts and the class."""
    src, dst = Path(src), Path(dst)
    if to not in ("sha", "mha"):
        raise ValueError(f"to must be 'sha' or 'mha', got {to!r}")
    refuse_overwriting_inputs(dst.parent, [dst.name], [src])
    checkpoint_format(dst)
    conversion = _plan(config, src, "mha" if to == "sha" else "sha", model_class)
    with staged_outputs(dst.parent, [dst.name]) as staging:
        counts = _rewrite_checked(conversion, src, staging / dst.name, dst, to)
    return {**counts, "model_class": conversion.choice.name}


def _sha_encodings(src: str | os.PathLike, name_map: NameMap, mha_shapes: dict, sha_shapes: dict,
                   dst: str | os.PathLike, version: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """MHA encodings file -> validated SHA encodings and the rewrite's counts (with ``encodings_layout``, the layout
    the file came in and the SHA file is written in unless ``version`` names one); raises listing every problem.

    The input is checked against the MHA model first, so that a fault of the user's file is named as the user can
    find it (their file, ``to_q.weight``); the check of the written SHA encodings then guards the rewrite itself."""
    mha_encodings, layout = load_encodings_layout(src)
    problems = check_encodings(mha_encodings, mha_shapes, source=str(src))
    if problems:
        raise EncodingsError(f"{len(problems)} problem(s) in the encodings:\n  " + "\n  ".join(problems))
    sha_encodings, report = mha_to_sha(mha_encodings, name_map, source=str(src))
    if version:
        sha_encodings = convert_version(sha_encodings, version, source=str(src))
    problems = check_encodings(sha_encodings, sha_shapes, source=str(dst),
                               required=required_sha_encodings(mha_encodings, name_map, str(src)))
    if problems:
        raise EncodingsError(f"{len(problems)} problem(s) in the converted encodings:\n  " + "\n  ".join(problems))
    return sha_encodings, {**report.as_dict(), "problems": 0, "encodings_layout": version or layout}


def convert_encodings_file(model_config: str | os.PathLike | dict, src: str | os.PathLike, dst: str | os.PathLike,
                           *, checkpoint: str | os.PathLike | None = None,
                           model_class: str | None = None) -> dict[str, Any]:
    """Rewrite MHA encodings ``src`` into validated SHA encodings ``dst`` for the model a config describes.

    A PASD folder's config names the stock class: give its ``checkpoint`` (whose keys say what the model is) or
    ``model_class``. The encodings must name only parameters of that model, so a wrong model is an error."""
    keys = checkpoint_shapes(checkpoint) if checkpoint is not None else None
    model = build_model(model_config, choose_model(model_config, keys, model_class=model_class), device="meta")
    mha_shapes = parameter_shapes(model)
    name_map = convert_to_sha(model)
    sha_encodings, counts = _sha_encodings(src, name_map, mha_shapes, parameter_shapes(model), dst)
    save_encodings(sha_encodings, dst, counts["encodings_layout"])
    return counts


def convert_files(model_config: str | os.PathLike, state_dict: str | os.PathLike, out_dir: str | os.PathLike,
                  encodings: str | os.PathLike | None = None, encodings_version: str | None = None,
                  model_class: str | None = None) -> dict[str, Any]:
    """Convert an MHA checkpoint (and AIMET encodings) to SHA into ``out_dir``; returns a summary of counts.

    Writes ``state_dict_sha.<input's suffix>``, ``parameters_sha.encodings`` (with ``encodings``) and
    ``name_map.json``. The model class comes from the config and the checkpoint's keys (``model_class``
    overrides); the summary says which and why. The encodings keep their format unless ``encodings_version``
    names the other one. Raises :class:`PasdVerifyError` naming the file and key on any problem, in which case
    no output file is left behind. Inputs are never overwritten.
    """
    config_path, state_dict, out_dir = Path(model_config), Path(state_dict), Path(out_dir)
    suffix = state_dict.name[len(state_dict.name.rsplit(".", 1)[0]):]
    outputs = {"state_dict": out_dir / f"state_dict_sha{suffix}", "name_map": out_dir / "name_map.json"}
    if encodings is not None:
        outputs["encodings"] = out_dir / "parameters_sha.encodings"
    # what an earlier run may have left: replaced as one set, so that no earlier file stays beside this run's
    family = sorted({p.name for p in outputs.values()} | {"parameters_sha.encodings"}
                    | {f"state_dict_sha{s}" for s in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES})
    refuse_overwriting_inputs(out_dir, family, [config_path, state_dict, encodings])
    conversion = _plan(config_path, state_dict, "mha", model_class)

    name_map = conversion.name_map
    summary: dict[str, Any] = {"model_class": conversion.choice.describe(),
                               "attention_modules": len(name_map.modules),
                               "checkpoint_keys_split": len(name_map)}
    sha_encodings = None
    if encodings is not None:  # checked first: it is cheap, the checkpoint rewrite is not
        sha_encodings, counts = _sha_encodings(encodings, name_map, conversion.mha_shapes, conversion.sha_shapes,
                                               outputs["encodings"], encodings_version)
        summary.update(counts)

    with staged_outputs(out_dir, family) as staging:
        staged = {key: staging / path.name for key, path in outputs.items()}
        counts = _rewrite_checked(conversion, state_dict, staged["state_dict"], outputs["state_dict"], "sha")
        summary["checkpoint_tensors_out"] = counts["tensors_out"]
        if sha_encodings is not None:
            save_encodings(sha_encodings, staged["encodings"], summary["encodings_layout"])
        staged["name_map"].write_text(name_map.to_json())
    summary["outputs"] = {key: str(path) for key, path in outputs.items()}
    return summary
