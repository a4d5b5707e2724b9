"""Capture: a module's inputs cached by a partial forward of the module around it, and a group's layer inputs
and outputs by replaying the innermost module around it; the stack of modules whose inputs are cached."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cache import ActivationCache, _Rows, _StructureCache
from .config import AdaroundError
from .plan import _QuantizedMode


class _Stop(Exception):
    """Ends a forward as soon as what it was run for has been captured."""


def _capture_block_inputs(model: nn.Module, block_name: str, block: nn.Module,
                          calls: Sequence[Callable[[nn.Module], Any]], store: _StructureCache) -> None:
    """Run the model on each sample until ``block`` is called; cache what it is called with."""
    for index, call in enumerate(calls):
        def hook(m, args, kwargs, index=index):
            store.write(index, (args, kwargs))
            raise _Stop

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                call(model)
        except _Stop:
            pass
        else:
            raise AdaroundError(f"calibration sample {index} did not reach block {block_name!r}")
        finally:
            handle.remove()


def _capture(block: nn.Module, layers: Sequence[nn.Module], names: Sequence[str], store: _StructureCache, rows: int,
             cache: ActivationCache, device: torch.device, want: str) -> list[_Rows]:
    """Run ``block`` on each cached input until every one of ``layers`` (called ``names``) has run; cache each one's
    input (``want="input"``) or output, one buffer per layer."""
    buffers: list[_Rows | None] = [None] * len(layers)
    for index in range(rows):
        captured: dict[int, torch.Tensor] = {}

        def hook(m, args, output, i: int):
            captured[i] = args[0] if want == "input" else output
            if len(captured) == len(layers):
                raise _Stop

        handles = [layer.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i, layer in enumerate(layers)]
        try:
            _replay(store, index, device, block)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(captured) != len(layers):
            missing = next(i for i in range(len(layers)) if i not in captured)
            raise AdaroundError(f"layer {names[missing]!r} did not run when {store.name!r} was replayed on "
                                f"calibration sample {index}")
        for i, value in sorted(captured.items()):
            if buffers[i] is None:  # AIMET concatenates samples along the batch axis: one row per batch element
                buffers[i] = cache.buffer(rows * value.shape[0], value.shape[1:])
                buffers[i].first_batch = value.shape[0]
            buffer = buffers[i]
            if value.shape[0] != buffer.first_batch or tuple(value.shape[1:]) != buffer.shape:
                raise AdaroundError(f"calibration sample {index} gives layer {names[i]!r} an {want} of shape "
                                    f"{tuple(value.shape)}, sample 0 gave {(buffer.first_batch, *buffer.shape)}; "
                                    "every sample must have the same shapes")
            for row in range(value.shape[0]):
                buffer.write(index * value.shape[0] + row, value[row])
    return buffers


def _replay(store: _StructureCache, index: int, device: torch.device, module: nn.Module) -> Any:
    """Call ``module`` on sample ``index`` of its cached inputs."""
    args, kwargs = store.read(index, device)
    with torch.no_grad():
        return module(*args, **kwargs)


@dataclass
class _Level:
    """A module on the way to a group, with its cached float and quantized inputs for every sample."""

    name: str
    module: nn.Module
    float_inputs: _StructureCache
    quant_inputs: _StructureCache

    def calls(self, quantized: bool, device: torch.device) -> list[Callable[[nn.Module], Any]]:
        """One call per sample that replays this module on its cached inputs."""
        store = self.quant_inputs if quantized else self.float_inputs
        return [functools.partial(_replay, store, i, device) for i in range(store.rows)]

    def release(self) -> None:
        self.float_inputs.release()
        self.quant_inputs.release()


class _Levels:
    """The stack of modules whose inputs are cached, outermost first. A group's inputs are captured by replaying
    the innermost module of its path; entering a module captures its inputs by replaying the one around it (the
    model itself for a top-level block). A module's quantized inputs stay valid while it is on the stack: groups
    come in forward order, so every layer rounded after it was entered runs after it is called."""

    def __init__(self, model: nn.Module, calls: Sequence[Callable[[nn.Module], Any]], units: dict[str, nn.Module],
                 quantized: _QuantizedMode, cache: ActivationCache, device: torch.device):
        self.model, self.model_calls, self.units = model, calls, units
        self.quantized, self.cache, self.device = quantized, cache, device
        self.stack: list[_Level] = []

    def enter(self, path: tuple[str, ...]) -> _Level:
        """Make ``path`` the stack's prefix (leaving modules off it) and return the level of its last module."""
        keep = 0
        while keep < min(len(path), len(self.stack)) and self.stack[keep].name == path[keep]:
            keep += 1
        if keep < len(path):
            self.leave(keep)
        for name in path[len(self.stack):]:
            self.stack.append(self._capture(name))
        return self.stack[len(path) - 1]

    def leave(self, depth: int) -> None:
        """Free the cached inputs of the modules deeper than ``depth``."""
        while len(self.stack) > depth:
            self.stack.pop().release()

    def _capture(self, name: str) -> _Level:
        module = self.units[name]
        outer = self.stack[-1] if self.stack else None
        stores = []
        for quantized in (False, True):
            store = _StructureCache(self.cache, len(self.model_calls), name)
            calls = outer.calls(quantized, self.device) if outer else self.model_calls
            with self.quantized.active() if quantized else contextlib.nullcontext():
                _capture_block_inputs(outer.module if outer else self.model, name, module, calls, store)
            stores.append(store)
        return _Level(name, module, *stores)
