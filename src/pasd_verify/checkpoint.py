"""Rewrite checkpoints between MHA and SHA form, driven by the name map of :func:`pasd_verify.convert_to_sha`.

In memory: :func:`split_state_dict` and :func:`merge_state_dict`. On disk: :func:`convert_checkpoint_file`,
which streams ``.safetensors`` one tensor at a time (a 3.4 GB SD1.5 UNet never sits in memory twice, or even
once) and memory-maps ``.pth``. Outputs are written to a temporary file and renamed into place; an input is
never overwritten.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .checkpoint_files import (_load_torch, _SafetensorsReader, _write_safetensors, check_tensor_values,
                               checkpoint_format, load_state_dict_file, save_state_dict_file)
from .errors import CheckpointError
from .io import atomic_path
from .name_map import NameMap, is_projection_key


# The rewrite, and the file functions users load and save checkpoints with (README), all from this module.
__all__ = ["convert_checkpoint_file", "load_state_dict_file", "merge_state_dict", "save_state_dict_file",
           "split_state_dict"]


def _check_splittable(key: str, shape, heads: int, source: str) -> None:
    """``shape`` is a Linear weight ``(rows, in)`` or bias ``(rows,)`` whose rows ``heads`` divide evenly, or an
    error naming the key. Both rewrites (in memory and file to file) check here, before anything is written."""
    if len(shape) not in (1, 2):
        raise CheckpointError(f"{source}: MHA key {key!r} has shape {tuple(shape)}, expected a Linear weight "
                              "or bias")
    if shape[0] % heads:
        raise CheckpointError(f"{source}: MHA key {key!r} has {shape[0]} rows, which {heads} heads do not divide "
                              "evenly")


def _split_tensor(tensor: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """Contiguous per-head row blocks of a checked Linear weight or bias; weights become 1x1 conv weights (views)."""
    chunks = tensor.chunk(heads, dim=0)
    if tensor.ndim == 2:
        chunks = tuple(c.reshape(*c.shape, 1, 1) for c in chunks)
    return list(chunks)


def _merge_tensors(key: str, chunks: list[torch.Tensor], source: str) -> torch.Tensor:
    """Inverse of :func:`_split_tensor`: 1x1 conv weights back to one Linear weight."""
    shapes = {tuple(c.shape) for c in chunks}
    if len(shapes) != 1:
        raise CheckpointError(f"{source}: the SHA heads of {key!r} have different shapes {sorted(shapes)}")
    shape = shapes.pop()
    if len(shape) == 4 and shape[2:] == (1, 1):
        chunks = [c.reshape(shape[0], shape[1]) for c in chunks]
    elif len(shape) != 1:
        raise CheckpointError(f"{source}: the SHA heads of {key!r} have shape {shape}, expected 1x1 conv weights "
                              "or biases")
    return torch.cat(chunks, dim=0)


def _check_keys(keys: set[str], present: list[str], absent: list[str], source: str, form: str) -> None:
    missing = [k for k in present if k not in keys]
    clashing = [k for k in absent if k in keys]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} {form} key(s) the name map needs are missing, e.g. {missing[0]!r}"
        )
    if clashing:
        raise CheckpointError(
            f"{source}: holds both MHA and SHA keys, e.g. {clashing[0]!r}; it is neither a clean MHA nor SHA checkpoint"
        )


# A projection key (name_map.is_projection_key) that the name map does not cover means the map came from another
# model (say, a stock UNet config for PASD's UNet), and converting would leave a half-SHA file.


def _check_mha_projections_mapped(keys, name_map: NameMap, source: str, allow_unconverted: bool) -> None:
    """Every MHA q/k/v key is one the name map splits, or the conversion stops naming it.

    ``allow_unconverted`` accepts MHA projections outside the map (modules left MHA by
    ``convert_to_sha(..., skip_unsupported=True)``).
    """
    if not allow_unconverted:
        _refuse_stray([k for k in keys if is_projection_key(k, "mha") and k not in name_map], "MHA", source,
                      "; pass allow_unconverted=True for modules deliberately left MHA")


def _check_sha_projections_mapped(keys, name_map: NameMap, source: str) -> None:
    """Every per-head SHA key is one the name map merges: outside the map such a key is never valid."""
    covered = set(name_map.sha_names())
    _refuse_stray([k for k in keys if is_projection_key(k, "sha") and k not in covered], "SHA", source, "")


def _refuse_stray(stray: list[str], form: str, source: str, hint: str) -> None:
    if stray:
        raise CheckpointError(
            f"{source}: {len(stray)} {form} q/k/v key(s) the name map does not rewrite, e.g. {stray[0]!r}; the name "
            f"map comes from another model than this checkpoint (for PASD's folders, let pasd_verify.kinds.loading choose "
            f"the model from the weights){hint}"
        )


def split_state_dict(
    state_dict: Mapping[str, torch.Tensor], name_map: NameMap, *, source: str = "state dict",
    allow_unconverted: bool = False,
) -> dict[str, torch.Tensor]:
    """The SHA state dict of an MHA one: each mapped key replaced by its per-head slices, the rest kept.

    Returns a new dict whose tensors are views of the input's (no copy); the input is not changed. A q/k/v
    projection the name map does not cover is an error unless ``allow_unconverted``.
    """
    name_map = NameMap.of(name_map)
    _check_keys(set(state_dict), list(name_map), name_map.sha_names(), source, "MHA")
    _check_mha_projections_mapped(state_dict, name_map, source, allow_unconverted)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in name_map:
            _check_splittable(key, tensor.shape, len(name_map[key]), source)
            out.update(zip(name_map[key], _split_tensor(tensor, len(name_map[key]))))
        else:
            out[key] = tensor
    return out


def merge_state_dict(
    state_dict: Mapping[str, torch.Tensor], name_map: NameMap, *, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """The MHA state dict of an SHA one, the exact inverse of :func:`split_state_dict`. The input is not changed."""
    name_map = NameMap.of(name_map)
    _check_keys(set(state_dict), name_map.sha_names(), list(name_map), source, "SHA")
    _check_sha_projections_mapped(state_dict, name_map, source)
    first_head = name_map.first_heads()
    consumed = set(name_map.sha_names())
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in first_head:
            mha = first_head[key]
            out[mha] = _merge_tensors(mha, [state_dict[k] for k in name_map[mha]], source)
        elif key not in consumed:
            out[key] = tensor
    return out


def convert_checkpoint_file(
    src: str | os.PathLike, dst: str | os.PathLike, name_map: NameMap, *, to: str = "sha",
    allow_unconverted: bool = False,
) -> dict[str, int]:
    """Rewrite the checkpoint ``src`` into ``dst`` in SHA (``to="sha"``) or MHA (``to="mha"``) form.

    ``.safetensors`` is read lazily and written one tensor at a time, so memory holds about one tensor;
    ``.pth`` is memory-mapped. ``dst`` has ``src``'s format, is written atomically, and may not be ``src``.
    Every q/k/v key of ``src`` must be one the name map rewrites (see :func:`split_state_dict` for
    ``allow_unconverted``); otherwise nothing is written. To check the checkpoint against a model config as
    well, use :func:`pasd_verify.convert.convert_checkpoint`. Returns counts: ``{"tensors_in", "tensors_out", "keys_rewritten"}``.
    """
    src, dst, name_map = Path(src), Path(dst), NameMap.of(name_map)
    if to not in ("sha", "mha"):
        raise ValueError(f"to must be 'sha' or 'mha', got {to!r}")
    if not src.is_file():
        raise CheckpointError(f"{src}: no such checkpoint file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: refusing to overwrite the input checkpoint")
    fmt = checkpoint_format(src)
    if checkpoint_format(dst) != fmt:
        raise CheckpointError(f"{dst}: output must have the input's format ({fmt}), as in {src.name}")

    if fmt == "torch":
        state_dict = {key: check_tensor_values(key, tensor, str(src))
                      for key, tensor in _load_torch(src, mmap=True).items()}
        if to == "sha":
            out = split_state_dict(state_dict, name_map, source=str(src), allow_unconverted=allow_unconverted)
        else:
            out = merge_state_dict(state_dict, name_map, source=str(src))
        save_state_dict_file(out, dst)
        return {"tensors_in": len(state_dict), "tensors_out": len(out), "keys_rewritten": len(name_map)}

    with _SafetensorsReader(src) as f:
        keys = f.keys()
        shapes = {k: f.dtype_and_shape(k) for k in keys}
        if to == "sha":
            _check_mha_projections_mapped(keys, name_map, str(src), allow_unconverted)
            plan = _sha_plan(keys, shapes, name_map, str(src))
        else:
            _check_sha_projections_mapped(keys, name_map, str(src))
            plan = _mha_plan(keys, shapes, name_map, str(src))
        out_shapes = {name: shape for name, shape, _ in plan}
        with atomic_path(dst) as tmp:
            _write_safetensors(
                tmp,
                ((name, lambda make=make: make(f)) for name, _, make in plan),
                out_shapes,
                metadata=f.metadata(),
            )
    return {"tensors_in": len(keys), "tensors_out": len(plan), "keys_rewritten": len(name_map)}


# A plan entry: (output name, (safetensors dtype, shape), function of the open input file giving the tensor).
_Plan = list[tuple[str, tuple[str, list[int]], Callable[["_SafetensorsReader"], torch.Tensor]]]


def _sha_plan(keys: list[str], shapes: dict, name_map: NameMap, source: str) -> _Plan:
    _check_keys(set(keys), list(name_map), name_map.sha_names(), source, "MHA")
    plan: _Plan = []
    for key in keys:
        dtype, shape = shapes[key]
        if key not in name_map:
            plan.append((key, (dtype, shape), lambda f, key=key: f.get_tensor(key)))
            continue
        heads = len(name_map[key])
        read = _shared_reader(key, heads)
        _check_splittable(key, shape, heads, source)
        head_shape = [shape[0] // heads, *shape[1:]] + ([1, 1] if len(shape) == 2 else [])
        for i, name in enumerate(name_map[key]):
            plan.append((name, (dtype, head_shape), lambda f, i=i, heads=heads, read=read: _split_tensor(
                read(f), heads)[i]))
    return plan


def _mha_plan(keys: list[str], shapes: dict, name_map: NameMap, source: str) -> _Plan:
    _check_keys(set(keys), name_map.sha_names(), list(name_map), source, "SHA")
    first_head = name_map.first_heads()
    consumed = set(name_map.sha_names())
    plan: _Plan = []
    for key in keys:
        dtype, shape = shapes[key]
        if key in first_head:
            mha = first_head[key]
            heads = name_map[mha]
            # a head's (rows, in, 1, 1) conv weight or (rows,) bias: the heads stack their rows. Any other shape
            # is refused by _merge_tensors as the tensor is made, before anything is renamed into place.
            merged = [shape[0] * len(heads), *shape[1:2]]
            plan.append((mha, (dtype, merged), lambda f, mha=mha, heads=heads: _merge_tensors(
                mha, [f.get_tensor(k) for k in heads], source)))
        elif key not in consumed:
            plan.append((key, (dtype, shape), lambda f, key=key: f.get_tensor(key)))
    return plan


def _shared_reader(key: str, uses: int):
    """Reads ``key`` once for all ``uses`` heads cut from it, and lets it go after the last one."""
    cache: dict[str, torch.Tensor] = {}
    count = [0]

    def read(f) -> torch.Tensor:
        if key not in cache:
            cache[key] = f.get_tensor(key)
        tensor = cache[key]
        count[0] += 1
        if count[0] == uses:
            cache.clear()
        return tensor

    return read


