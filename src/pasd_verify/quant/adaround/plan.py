"""The model: its top-level blocks, the AdaRound layers in forward order with the modules replayed to reach
them, and its quantized mode."""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import LAYER_TYPES, NEAREST_TYPES, AdaroundConfig, AdaroundError
from .grid import WeightGrid, aimet_quantizer, dequantize


def _block_roots(model: nn.Module) -> dict[str, nn.Module]:
    """The modules a top-level forward calls directly: the root's children, with ModuleLists expanded."""
    roots = {}
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            roots.update({f"{name}.{n}": m for n, m in child.named_children()})
        else:
            roots[name] = child
    return roots


@dataclass
class _Group:
    """Layers called on the very same input tensor (an SHA module's per-head q/k/v convs, the per-head k/v convs
    that all read the text embedding), which exists before any of them runs, so nothing one of them does can
    change another's input, and one capture of that input serves them all. ``path`` names the modules replayed
    to reach them, outermost (a top-level block) first: each is called once per forward, inside the one before."""

    layers: list[tuple[str, nn.Module]]
    path: tuple[str, ...]


@dataclass
class _Plan:
    """The AdaRound layers' groups in forward order; ``units`` the modules their paths name; ``index`` each
    layer's position in forward order."""

    groups: list[_Group]
    units: dict[str, nn.Module] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return sum(len(group.layers) for group in self.groups)


def _selected(name: str, only: Sequence[str]) -> bool:
    return not only or any(name == prefix or name.startswith(prefix + ".") for prefix in only)


class _InputIdentity:
    """Names the tensor each layer is called on: two calls get the same key only when they receive the same
    tensor object, still alive and not modified in place in between (its version counter unchanged)."""

    def __init__(self):
        self._seen: dict[int, tuple[weakref.ref, int, str]] = {}

    def key(self, name: str, tensor: Any) -> str:
        if not isinstance(tensor, torch.Tensor):
            return name
        seen = self._seen.get(id(tensor))
        if seen is not None and seen[0]() is tensor and seen[1] == tensor._version:
            return seen[2]
        self._seen[id(tensor)] = (weakref.ref(tensor), tensor._version, name)
        return name


class _CallTrace:
    """Hooks on every module during one forward: how often each is called, which modules were running when it
    was first called, and the order in which the top-level blocks and the layers run."""

    def __init__(self, model: nn.Module, roots: dict[str, nn.Module], share_inputs: bool):
        self.calls: dict[str, int] = {}
        self.inside: dict[str, frozenset[str]] = {}
        self.block_order: list[str] = []
        self.layer_order: list[str] = []
        self.input_of: dict[str, str] = {}  # layer -> the first layer called on the same input tensor
        self._running: list[str] = []
        self._identity = _InputIdentity()
        self._share = share_inputs
        self._roots = set(roots)
        self._handles = []
        for name, module in model.named_modules():
            if name:
                self._handles += [module.register_forward_pre_hook(lambda m, a, n=name: self._enter(n, m, a)),
                                  module.register_forward_hook(self._leave)]

    def _enter(self, name: str, module: nn.Module, args: tuple) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.inside.setdefault(name, frozenset(self._running))
        self._running.append(name)
        if name in self._roots:
            self.block_order.append(name)
        if isinstance(module, LAYER_TYPES):
            self.layer_order.append(name)
            self.input_of[name] = self._identity.key(name, args[0] if args else None) if self._share else name

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._running.pop()  # returns None: a forward hook's return value would replace the output

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._identity = None


def _unit_path(trace: _CallTrace, block: str, layers: Sequence[str]) -> tuple[str, ...]:
    """The modules from ``block`` down to the innermost one holding all of ``layers`` that can be replayed on
    their own: called once per forward, while the previous one runs (``ff.net`` is a ModuleList, never called)."""
    parts = [name.split(".") for name in layers]
    common = os.path.commonprefix(parts)
    if len(layers) == 1 or common in parts:
        common = common[:-1]  # a layer's input comes from its parent
    path = [block]
    for depth in range(len(block.split(".")) + 1, len(common) + 1):
        name = ".".join(common[:depth])
        if trace.calls.get(name) == 1 and path[-1] in trace.inside[name]:
            path.append(name)
    return tuple(path)


def plan_layers(model: nn.Module, call: Callable[[nn.Module], Any], only: Sequence[str] = (),
                share_inputs: bool = True, nested: bool = True) -> _Plan:
    """Trace one forward (``call(model)``) to order the Conv2d/Linear layers as they run (those under the module
    names ``only``, when given), group the layers that read the same input tensor (each layer alone when
    ``share_inputs`` is False) and give each group the modules to replay to reach it: its top-level block, then,
    when ``nested``, each module inside it that holds this and at least one other group."""
    roots = _block_roots(model)
    trace = _CallTrace(model, roots, share_inputs)
    try:
        with torch.no_grad():
            call(model)
    finally:
        trace.remove()
    repeated = sorted({n for n in trace.layer_order if trace.calls[n] > 1} |
                      {n for n in trace.block_order if trace.calls[n] > 1})
    if repeated:
        raise AdaroundError(f"module(s) called more than once in one forward, e.g. {repeated[0]!r}; "
                            "AdaRound needs one input per layer and sample")
    groups: list[_Group] = []
    for block in trace.block_order:
        members: dict[str, list[str]] = {}
        for n in trace.layer_order:
            if (n == block or n.startswith(block + ".")) and _selected(n, only):
                members.setdefault(trace.input_of[n], []).append(n)
        groups += [_Group([(n, model.get_submodule(n)) for n in names],
                          _unit_path(trace, block, names) if nested else (block,)) for names in members.values()]
    outside = {n for n in trace.layer_order if _selected(n, only)} - {n for g in groups for n, _ in g.layers}
    if outside:
        raise AdaroundError(f"layer {sorted(outside)[0]!r} runs outside the model's top-level blocks")
    # a module replayed for one group only costs more than it saves: that group replays the module around it
    through: dict[str, int] = {}
    for group in groups:
        for name in group.path[1:]:
            through[name] = through.get(name, 0) + 1
    for group in groups:
        group.path = tuple(name for i, name in enumerate(group.path) if i == 0 or through[name] > 1)
    units = {name: model.get_submodule(name) for group in groups for name in group.path}
    return _Plan(groups, units, {n: i for i, n in enumerate(trace.layer_order)})


class _QuantizedMode:
    """The model's quantized form without a second copy: while active, each rounded layer computes with its
    dequantized integer codes, and each GroupNorm/LayerNorm with its weight rounded to nearest by AIMET's
    quantizer, swapped in just for its own forward."""

    def __init__(self, model: nn.Module, config: AdaroundConfig):
        self.codes: dict[str, tuple[torch.Tensor, WeightGrid]] = {}
        self.nearest = {name: aimet_quantizer(m.weight, config.param_bw, False, config.quant_scheme)
                        for name, m in model.named_modules() if isinstance(m, NEAREST_TYPES) and m.weight is not None}
        self.model = model

    def weight_for(self, name: str, module: nn.Module) -> torch.Tensor | None:
        if name in self.codes:
            codes, grid = self.codes[name]
            return dequantize(codes.to(module.weight.device), grid)
        if name in self.nearest:
            with torch.no_grad():
                return self.nearest[name](module.weight).as_subclass(torch.Tensor)
        return None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        saved: dict[nn.Module, nn.Parameter] = {}
        handles = []
        for name in (*self.codes, *self.nearest):
            module = self.model.get_submodule(name)

            def swap_in(m, args, name=name):
                saved[m] = m._parameters["weight"]
                m._parameters["weight"] = nn.Parameter(self.weight_for(name, m).to(saved[m].dtype), requires_grad=False)

            def swap_out(m, args, output):
                m._parameters["weight"] = saved.pop(m)

            handles += [module.register_forward_pre_hook(swap_in), module.register_forward_hook(swap_out)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for module, weight in saved.items():  # a forward stopped inside a module must not keep its swap
                module._parameters["weight"] = weight
