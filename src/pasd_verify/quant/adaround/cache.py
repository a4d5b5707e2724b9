"""Activation buffers: per-layer rows in memory up to a byte budget and in files beyond it, and the cached
(args, kwargs) of a module per calibration sample."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ...io import private_folder
from .config import AdaroundError


class ActivationCache:
    """Buffers of ``rows`` samples, allocated once and filled row by row: in memory while the byte budget
    allows, else in a file read and written with plain I/O (a memory map's touched pages would count as RSS)."""

    def __init__(self, dtype: torch.dtype, budget: int | None, folder: str | None):
        self.dtype = dtype
        self.budget = budget
        self._folder = folder
        self._tmp: contextlib.AbstractContextManager | None = None
        self._tmp_path: Path | None = None
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0
        self.peak_bytes_in_memory = 0
        self._count = 0

    def buffer(self, rows: int, shape: Sequence[int], dtype: torch.dtype | None = None) -> _Rows:
        dtype = dtype or self.dtype
        nbytes = rows * math.prod(shape) * dtype.itemsize
        if self.budget is None or self.bytes_in_memory + nbytes <= self.budget:
            self.bytes_in_memory += nbytes
            self.peak_bytes_in_memory = max(self.peak_bytes_in_memory, self.bytes_in_memory)
            return _MemoryRows(self, rows, shape, dtype, nbytes)
        if self._tmp is None:
            self._tmp = private_folder("pasd-verify-adaround-", self._folder)
            self._tmp_path = self._tmp.__enter__()
        self._count += 1
        self.bytes_on_disk += nbytes
        return _FileRows(self, self._tmp_path / f"{self._count}.bin", rows, shape, dtype, nbytes)

    def close(self) -> None:
        if self._tmp is not None:
            tmp, self._tmp, self._tmp_path = self._tmp, None, None
            tmp.__exit__(None, None, None)


class _Rows:
    def __init__(self, cache: ActivationCache, rows: int, shape: Sequence[int], dtype: torch.dtype, nbytes: int):
        self.cache, self.rows, self.shape, self.dtype, self.nbytes = cache, rows, tuple(shape), dtype, nbytes
        self.first_batch = 1

    def write(self, index: int, value: torch.Tensor) -> None:
        raise NotImplementedError

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        pass


class _MemoryRows(_Rows):
    def __init__(self, *args):
        super().__init__(*args)
        self.data = torch.empty(self.rows, *self.shape, dtype=self.dtype)

    def write(self, index: int, value: torch.Tensor) -> None:
        self.data[index].copy_(value)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        return self.data[torch.as_tensor(list(indices))]

    def release(self) -> None:
        if self.data is not None:
            self.data = None
            self.cache.bytes_in_memory -= self.nbytes


class _FileRows(_Rows):
    def __init__(self, cache, path: Path, *args):
        super().__init__(cache, *args)
        self.path = path
        self.row_bytes = math.prod(self.shape) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, self.rows * self.row_bytes)

    def write(self, index: int, value: torch.Tensor) -> None:
        data = value.detach().to("cpu", self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        os.pwrite(self.fd, data.tobytes(), index * self.row_bytes)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        out = torch.empty(len(indices), *self.shape, dtype=self.dtype)
        flat = out.view(len(indices), -1).view(torch.uint8)
        for i, index in enumerate(indices):
            flat[i].numpy()[:] = memoryview(os.pread(self.fd, self.row_bytes, index * self.row_bytes))
        return out

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.path.unlink(missing_ok=True)
            self.cache.bytes_on_disk -= self.nbytes


class _StructureCache:
    """A cached structure (args, kwargs) per sample: tensors in :class:`ActivationCache` rows, the rest kept once.
    ``name`` is the module called with it, for messages."""

    def __init__(self, cache: ActivationCache, rows: int, name: str = ""):
        self.cache, self.rows, self.name = cache, rows, name
        self.spec = None
        self.leaves: list[Any] = []
        self.dtypes: list[torch.dtype | None] = []

    def write(self, index: int, structure: Any) -> None:
        leaves, spec = pytree.tree_flatten(structure)
        if self.spec is None:
            self.spec = spec
            self.leaves = [self.cache.buffer(self.rows, leaf.shape, _cache_dtype_for(leaf, self.cache.dtype))
                           if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
            self.dtypes = [leaf.dtype if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
        elif spec != self.spec:
            raise AdaroundError(f"calibration sample {index} calls {self.name!r} with another structure of arguments "
                                "than sample 0")
        for slot, leaf in zip(self.leaves, leaves):
            if isinstance(slot, _Rows):
                if tuple(leaf.shape) != slot.shape:
                    raise AdaroundError(f"calibration sample {index}: an input of {self.name!r} has shape "
                                        f"{tuple(leaf.shape)}, sample 0 had {slot.shape}; every sample must have "
                                        "the same shapes")
                slot.write(index, leaf)

    def read(self, index: int, device: torch.device) -> Any:
        """Sample ``index`` as it was written, each tensor back in its own dtype (a float16 cache is widened)."""
        leaves = [slot.read([index])[0].to(device, dtype) if isinstance(slot, _Rows) else slot
                  for slot, dtype in zip(self.leaves, self.dtypes)]
        return pytree.tree_unflatten(leaves, self.spec)

    def release(self) -> None:
        for slot in self.leaves:
            if isinstance(slot, _Rows):
                slot.release()


def _cache_dtype_for(tensor: torch.Tensor, float_dtype: torch.dtype) -> torch.dtype:
    return float_dtype if tensor.is_floating_point() else tensor.dtype
