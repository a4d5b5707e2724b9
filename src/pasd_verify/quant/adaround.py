"""AdaRound with memory bounded by design: AIMET's optimisation, without AIMET's copies.

aimet-torch's ``Adaround.apply_adaround`` deep-copies the model into a QuantizationSimModel, pickles every
calibration batch, and for each layer gathers the inputs and outputs of all samples in lists joined by
``torch.cat`` (REFERENCE section 6). This module runs the same optimisation with:

- one copy of the weights: the float model is the reference; its "quantized" form is the same modules with
  forward hooks that swap in the weights rounded so far (kept as integer codes, a quarter of float32 or less);
- activation buffers allocated once per layer and filled in place, in float32 or float16, in memory up to a
  byte budget and in files beyond it (plain reads and writes, not mmap, whose pages would count as resident);
- block-wise sampling: the inputs of each top-level block (``down_blocks.1``, ``mid_block``, ...) are captured
  once per block by a partial forward, and inside it the inputs of each module that holds several groups of
  layers (a resnet, a transformer block, an attention) by replaying the block; only the innermost module around
  a group is run to give its layers' inputs and targets.

The maths is AIMET's own: the quantization grid of every weight comes from AIMET's quantizer with AIMET's
encoding analyzer, the loss is AIMET's ``AdaroundLoss`` (reconstruction + annealed rounding regulariser), the
soft rounding is AIMET's rectified sigmoid, Adam on 32-sample minibatches, the same warm start and defaults.
As in AIMET's quantization sim, the quantized path also rounds GroupNorm/LayerNorm weights to nearest.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from aimet_torch.adaround.adaround_loss import AdaroundHyperParameters, AdaroundLoss
from aimet_torch.common.defs import AdaroundConstants
from aimet_torch.quantization.affine import QuantizeDequantize
from aimet_torch.quantization.encoding_analyzer import MinMaxEncodingAnalyzer, TfEnhancedEncodingAnalyzer
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..errors import PasdVerifyError
from ..memory import peak_rss_bytes

logger = logging.getLogger(__name__)

LAYER_TYPES = (nn.Conv2d, nn.Linear)
# Modules whose weight AIMET's default config quantizes (to nearest) besides the AdaRounded layers.
NEAREST_TYPES = (nn.GroupNorm, nn.LayerNorm)
MINIBATCH = 32  # AIMET's AdaroundOptimizer BATCH_SIZE
_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_ANALYZERS = {"tf_enhanced": TfEnhancedEncodingAnalyzer, "tf": MinMaxEncodingAnalyzer}


class AdaroundError(PasdVerifyError):
    """AdaRound cannot run on this model, configuration or calibration data."""


@dataclass(frozen=True)
class AdaroundConfig:
    """AdaRound settings; the defaults are aimet-torch 2.42's (``AdaroundParameters`` and ``apply_adaround``).

    ``iterations`` None means AIMET's default: 10,000 per layer, 15,000 below 8 bits. ``cache_budget`` is the
    number of bytes activation buffers may take in memory; buffers beyond it live in files under ``cache_dir``
    (a temporary folder by default). ``working_bytes`` bounds the activations one optimisation step holds at a
    time: a minibatch larger than that is processed in chunks whose gradients add up to the minibatch's.
    ``device`` runs the optimisation and the block forwards; caches stay on the host and only chunks move.
    ``only`` restricts AdaRound to the layers under these module names (``("up_blocks.3", "mid_block")``): the
    rest keep their float weights, as when a long run is split into parts. ``share_inputs`` captures once the
    input several layers read (exact; False captures it per layer, to check that it changes nothing). Each layer
    draws its minibatches from its own generator, seeded with ``seed`` plus its position in forward order, so
    the order in which layers are optimised does not change their result. ``nested_replay`` replays the
    innermost module around a group (a transformer block, an attention) rather than its whole top-level block
    (exact; False replays top-level blocks only, to check that it changes nothing).
    """

    param_bw: int = 4
    iterations: int | None = None
    reg_param: float = 0.01
    beta_range: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    weights: str = "per_channel"
    quant_scheme: str = "tf_enhanced"
    cache_dtype: str = "float32"
    cache_budget: int | None = None
    cache_dir: str | None = None
    working_bytes: int = 64 * 2**20
    device: str = "cpu"
    seed: int = 0
    only: tuple[str, ...] = ()
    share_inputs: bool = True
    nested_replay: bool = True

    def __post_init__(self):
        if not 2 <= self.param_bw <= 16:
            raise AdaroundError(f"param_bw must be 2..16, got {self.param_bw}")
        if self.iterations is not None and self.iterations < 1:
            raise AdaroundError(f"iterations must be positive, got {self.iterations}")
        if self.weights not in ("per_channel", "per_tensor"):
            raise AdaroundError(f"weights must be 'per_channel' or 'per_tensor', got {self.weights!r}")
        if self.quant_scheme not in _ANALYZERS:
            raise AdaroundError(f"quant_scheme must be one of {sorted(_ANALYZERS)}, got {self.quant_scheme!r}")
        if self.cache_dtype not in _CACHE_DTYPES:
            raise AdaroundError(f"cache_dtype must be one of {sorted(_CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.working_bytes < 1:
            raise AdaroundError(f"working_bytes must be positive, got {self.working_bytes}")
        if self.cache_budget is not None and self.cache_budget < 0:
            raise AdaroundError(f"cache_budget must be >= 0 bytes, got {self.cache_budget}")
        if not 0 <= self.warm_start < 1:
            raise AdaroundError(f"warm_start must be in [0, 1), got {self.warm_start}")

    @property
    def num_iterations(self) -> int:
        if self.iterations is not None:
            return self.iterations
        return 15000 if self.param_bw < 8 else 10000


# --- the grid: AIMET's quantizer computes it ----------------------------------------------------------------

@dataclass
class WeightGrid:
    """A weight's quantization grid as AIMET computed it: dequantized value = (q + offset) * scale, q in
    [qmin, qmax]; ``encodings`` is AIMET's own 0.6.1 form, one entry per channel."""

    scale: torch.Tensor
    offset: torch.Tensor
    qmin: int
    qmax: int
    encodings: list[dict[str, Any]]


def aimet_quantizer(weight: torch.Tensor, bitwidth: int, per_channel: bool, quant_scheme: str) -> QuantizeDequantize:
    """AIMET's symmetric weight quantizer for ``weight``, with its encodings computed by AIMET's analyzer."""
    shape = (weight.shape[0],) + (1,) * (weight.ndim - 1) if per_channel else ()
    quantizer = QuantizeDequantize(shape, bitwidth, True, _ANALYZERS[quant_scheme](shape)).to(weight.device)
    with torch.no_grad(), quantizer.compute_encodings():
        quantizer(weight.detach().float())
    return quantizer


def weight_grid(weight: torch.Tensor, config: AdaroundConfig) -> WeightGrid:
    quantizer = aimet_quantizer(weight, config.param_bw, config.weights == "per_channel", config.quant_scheme)
    # scale and offset keep the quantizer's shape ((C, 1, ...) per channel, () per tensor) and broadcast: kept
    # for every rounded layer, weight-sized copies would double the model's memory and the cost of dequantizing
    with torch.no_grad():
        scale, offset = quantizer.get_scale().detach(), quantizer.get_offset().detach()
    return WeightGrid(scale, offset, quantizer.qmin, quantizer.qmax, quantizer.get_legacy_encodings())


def _rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    zeta, gamma = AdaroundConstants.ZETA, AdaroundConstants.GAMMA
    return torch.clamp(torch.sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)


def initial_alpha(weight: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """AIMET's warm start: the alpha whose soft rounding reproduces the float weight exactly."""
    zeta, gamma = AdaroundConstants.ZETA, AdaroundConstants.GAMMA
    scaled = weight.detach().float() / grid.scale
    rest = scaled - torch.floor(scaled)
    return -torch.log((zeta - gamma) / (rest - gamma) - 1)


def integer_codes(weight: torch.Tensor, alpha: torch.Tensor | None, grid: WeightGrid) -> torch.Tensor:
    """The rounded weight's integers q (hard rounding: up where alpha >= 0; nearest when ``alpha`` is None)."""
    scaled = weight.detach().float() / grid.scale
    up = (alpha >= 0).float() if alpha is not None else (scaled - torch.floor(scaled) >= 0.5).float()
    return torch.clamp(torch.floor(scaled) + up - grid.offset, grid.qmin, grid.qmax)


def dequantize(codes: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    return (codes.float() + grid.offset) * grid.scale


def soft_rounded(weight: torch.Tensor, alpha: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """AIMET's soft-rounded weight, differentiable in ``alpha`` (float32, or float64 for a float64 weight)."""
    scaled = torch.floor(weight.detach().to(torch.promote_types(weight.dtype, torch.float32)) / grid.scale) \
        + _rectified_sigmoid(alpha)
    return (torch.clamp(scaled - grid.offset, grid.qmin, grid.qmax) + grid.offset) * grid.scale


def _code_dtype(grid: WeightGrid) -> torch.dtype:
    return torch.int8 if grid.qmin >= -128 and grid.qmax <= 127 else torch.int16 if grid.qmax <= 32767 else torch.int32


# --- activation buffers ------------------------------------------------------------------------------------

class ActivationCache:
    """Buffers of ``rows`` samples, allocated once and filled row by row: in memory while the byte budget
    allows, else in a file read and written with plain I/O (a memory map's touched pages would count as RSS)."""

    def __init__(self, dtype: torch.dtype, budget: int | None, folder: str | None):
        self.dtype = dtype
        self.budget = budget
        self._folder = folder
        self._tmp: tempfile.TemporaryDirectory | None = None
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
            self._tmp = tempfile.TemporaryDirectory(prefix="pasd-verify-adaround-", dir=self._folder)
        self._count += 1
        self.bytes_on_disk += nbytes
        return _FileRows(self, Path(self._tmp.name) / f"{self._count}.bin", rows, shape, dtype, nbytes)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


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
    """A cached structure (args, kwargs) per sample: tensors in :class:`ActivationCache` rows, the rest kept once."""

    def __init__(self, cache: ActivationCache, rows: int):
        self.cache, self.rows = cache, rows
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
            raise AdaroundError(f"calibration sample {index} calls a block with another structure than sample 0")
        for slot, leaf in zip(self.leaves, leaves):
            if isinstance(slot, _Rows):
                if tuple(leaf.shape) != slot.shape:
                    raise AdaroundError(f"calibration sample {index}: a block input has shape {tuple(leaf.shape)}, "
                                        f"sample 0 had {slot.shape}; every sample must have the same shapes")
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


# --- the model: blocks, layers, quantized mode --------------------------------------------------------------

class _Stop(Exception):
    """Ends a forward as soon as what it was run for has been captured."""


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


# --- per layer ---------------------------------------------------------------------------------------------

@dataclass
class LayerReport:
    name: str
    shape: list[int]
    iterations: int
    mse_nearest: float
    mse_soft_before: float
    mse_after: float
    seconds: float
    peak_rss_bytes: int
    cache_bytes_in_memory: int
    cache_bytes_on_disk: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, layer.bias)


def reconstruction_backward(layer: nn.Module, weight: torch.Tensor, alpha: nn.Parameter, grid: WeightGrid,
                            inputs: _Rows, targets: _Rows, indices: list[int], act: Callable, chunk: int,
                            device: torch.device) -> None:
    """Add the gradient of AIMET's reconstruction loss over the rows ``indices`` to ``alpha.grad``.

    AIMET's loss is a mean over the minibatch's rows, so its gradient is the row-weighted sum of the gradients of
    chunks of rows: the same step, holding the activations of ``chunk`` rows at a time instead of all of them.
    The soft-rounded weight is computed once per step: the chunks add their gradients up on it, and one backward
    carries the sum to ``alpha`` (the chain rule is linear in the upstream gradient).
    """
    soft = soft_rounded(weight, alpha, grid)
    chunked = len(indices) > chunk
    shared = soft.detach().requires_grad_() if chunked else soft
    for start in range(0, len(indices), chunk):
        part = indices[start:start + chunk]
        x = inputs.read(part).to(device, weight.dtype)
        y = act(targets.read(part).to(device, weight.dtype))
        out = act(_layer_output(layer, x, shared))
        (AdaroundLoss.compute_recon_loss(out, y) * (len(part) / len(indices))).backward()
    if chunked:
        soft.backward(shared.grad)


def optimize_layer(layer: nn.Module, grid: WeightGrid, inputs: _Rows, targets: _Rows, config: AdaroundConfig,
                   act_func: nn.Module | None, device: torch.device, generator: torch.Generator,
                   progress: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """AIMET's per-layer optimisation on cached inputs (quantized path) and targets (float path).

    Returns the learned alpha and the reconstruction MSEs, computed as AIMET logs them: on the first sample,
    nearest rounding (hard rounding at the warm start), soft rounding before, hard rounding after.
    """
    weight = layer.weight.detach().to(device, torch.float32)
    grid = WeightGrid(grid.scale.to(device), grid.offset.to(device), grid.qmin, grid.qmax, grid.encodings)
    alpha = nn.Parameter(initial_alpha(weight, grid))
    iterations = config.num_iterations
    params = AdaroundHyperParameters(iterations, config.reg_param, config.beta_range, config.warm_start)
    act = act_func or (lambda t: t)

    first = list(range(inputs.first_batch))  # AIMET measures on the first calibration batch

    def mses() -> tuple[float, float]:
        x0 = inputs.read(first).to(device, torch.float32)
        y0 = act(targets.read(first).to(device, torch.float32))
        with torch.no_grad():
            hard = act(_layer_output(layer, x0, dequantize(integer_codes(weight, alpha, grid), grid)))
            soft = act(_layer_output(layer, x0, soft_rounded(weight, alpha, grid)))
        return F.mse_loss(hard, y0).item(), F.mse_loss(soft, y0).item()

    nearest, soft_before = mses()
    optimizer = torch.optim.Adam([alpha])
    rows = inputs.rows
    row_bytes = 4 * (math.prod(inputs.shape) + 3 * math.prod(targets.shape))  # x; y, output and its gradient
    chunk = max(1, min(MINIBATCH, config.working_bytes // row_bytes))
    # an inner bar only where a layer takes long enough to watch
    for iteration in tqdm(range(iterations), desc="iterations", leave=False, unit="it",
                          disable=not progress or iterations < 500):
        indices = torch.randperm(rows, generator=generator)[:MINIBATCH].tolist()
        optimizer.zero_grad()
        reconstruction_backward(layer, weight, alpha, grid, inputs, targets, indices, act, chunk, device)
        round_loss = AdaroundLoss.compute_round_loss(alpha, params, iteration)
        if isinstance(round_loss, torch.Tensor):  # AIMET returns a plain 0 during its warm start
            round_loss.backward()
        optimizer.step()
    after, _ = mses()
    return alpha.detach(), {"mse_nearest": nearest, "mse_soft_before": soft_before, "mse_after": after}


# --- the whole model ---------------------------------------------------------------------------------------

@dataclass
class AdaroundResult:
    """What :func:`adaround` did: per-layer reports, each layer's grid and AIMET-form encodings."""

    layers: list[LayerReport] = field(default_factory=list)
    grids: dict[str, WeightGrid] = field(default_factory=dict)
    seconds: float = 0.0
    samples: int = 0

    def param_encodings(self, prefix: str = "") -> dict[str, list[dict[str, Any]]]:
        """``{"<prefix><layer>.weight": [AIMET 0.6.1 encoding per channel]}`` for every AdaRounded layer."""
        return {f"{prefix}{name}.weight": grid.encodings for name, grid in self.grids.items()}

    def summary(self) -> dict[str, Any]:
        reports = self.layers
        gain = [r.mse_nearest / r.mse_after for r in reports if r.mse_after > 0]
        return {
            "layers": len(reports),
            "samples": self.samples,
            "seconds": self.seconds,
            "mse_nearest_total": sum(r.mse_nearest for r in reports),
            "mse_after_total": sum(r.mse_after for r in reports),
            "layers_improved": sum(r.mse_after < r.mse_nearest for r in reports),
            "median_gain_over_nearest": sorted(gain)[len(gain) // 2] if gain else None,
            "peak_rss_bytes": max((r.peak_rss_bytes for r in reports), default=0),
        }


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


def _capture(block: nn.Module, layers: Sequence[nn.Module], store: _StructureCache, rows: int,
             cache: ActivationCache, device: torch.device, want: str) -> list[_Rows]:
    """Run ``block`` on each cached input until every one of ``layers`` has run; cache each one's input
    (``want="input"``) or output, one buffer per layer."""
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
            raise AdaroundError(f"a layer did not run when its block was replayed on sample {index}")
        for i, value in sorted(captured.items()):
            if buffers[i] is None:  # AIMET concatenates samples along the batch axis: one row per batch element
                buffers[i] = cache.buffer(rows * value.shape[0], value.shape[1:])
                buffers[i].first_batch = value.shape[0]
            buffer = buffers[i]
            if value.shape[0] != buffer.first_batch or tuple(value.shape[1:]) != buffer.shape:
                raise AdaroundError(f"calibration sample {index} gives a layer {tuple(value.shape)}, sample 0 gave "
                                    f"{(buffer.first_batch, *buffer.shape)}; every sample must have the same shapes")
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
            store = _StructureCache(self.cache, len(self.model_calls))
            calls = outer.calls(quantized, self.device) if outer else self.model_calls
            with self.quantized.active() if quantized else contextlib.nullcontext():
                _capture_block_inputs(outer.module if outer else self.model, name, module, calls, store)
            stores.append(store)
        return _Level(name, module, *stores)


def adaround(model: nn.Module, calls: Sequence[Callable[[nn.Module], Any]], config: AdaroundConfig = AdaroundConfig(),
             *, act_funcs: dict[str, nn.Module | None] | None = None, progress: bool = True,
             on_layer: Callable[[LayerReport], None] | None = None) -> AdaroundResult:
    """AdaRound every Conv2d and Linear of ``model`` in place; ``calls`` run the model on one calibration sample
    each (``lambda m: m(**inputs)``). Layers are optimized in forward order, as AIMET does; on return their
    weights are the hard-rounded values, exactly on the grids of ``result.grids``.

    ``act_funcs`` maps a layer name to the activation AIMET's connected graph finds right after it (its loss is
    taken after that activation); see :func:`aimet_act_funcs`.
    """
    if not calls:
        raise AdaroundError("no calibration samples")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdaroundError("device 'cuda' was asked for, but torch sees no CUDA device")
    started = time.perf_counter()
    model.eval().to(device)
    plan = plan_layers(model, calls[0], config.only, config.share_inputs, config.nested_replay)
    if not plan.layers:
        raise AdaroundError(f"no Conv2d or Linear layer under {list(config.only)} runs in the model's forward")
    quantized = _QuantizedMode(model, config)
    cache = ActivationCache(_CACHE_DTYPES[config.cache_dtype], config.cache_budget, config.cache_dir)
    levels = _Levels(model, calls, plan.units, quantized, cache, device)
    last_use = {name: i for i, group in enumerate(plan.groups) for name in group.path}
    result = AdaroundResult(samples=len(calls))
    act_funcs = act_funcs or {}
    bar = tqdm(total=plan.layers, desc="adaround", unit="layer", disable=not progress)
    try:
        for position, group in enumerate(plan.groups):
            start = time.perf_counter()
            level = levels.enter(group.path)
            modules = [layer for _, layer in group.layers]
            with quantized.active():
                [inputs] = _capture(level.module, modules[:1], level.quant_inputs, len(calls), cache, device, "input")
            targets = _capture(level.module, modules, level.float_inputs, len(calls), cache, device, "output")
            # inputs no later group needs are freed before optimising
            levels.leave(next((d for d, lv in enumerate(levels.stack) if last_use[lv.name] <= position),
                              len(levels.stack)))
            capture_seconds = (time.perf_counter() - start) / len(group.layers)
            for (name, layer), target in zip(group.layers, targets):
                start = time.perf_counter()
                grid = weight_grid(layer.weight, config)
                generator = torch.Generator().manual_seed(config.seed + plan.index[name])
                alpha, mses = optimize_layer(layer, grid, inputs, target, config, act_funcs.get(name), device,
                                             generator, progress)
                codes = integer_codes(layer.weight.to(device), alpha, _grid_on(grid, device)).to(_code_dtype(grid))
                quantized.codes[name] = (codes.cpu(), grid)
                result.grids[name] = grid
                report = LayerReport(name, list(layer.weight.shape), config.num_iterations, **mses,
                                     seconds=capture_seconds + time.perf_counter() - start,
                                     peak_rss_bytes=peak_rss_bytes(), cache_bytes_in_memory=cache.bytes_in_memory,
                                     cache_bytes_on_disk=cache.bytes_on_disk)
                target.release()
                result.layers.append(report)
                if on_layer:
                    on_layer(report)
                bar.update(1)
                bar.set_postfix_str(f"{name} mse {mses['mse_nearest']:.3g}->{mses['mse_after']:.3g}")
            inputs.release()
        with torch.no_grad():  # fold: the model's weights become the rounded ones
            for name, (codes, grid) in quantized.codes.items():
                layer = model.get_submodule(name)
                layer.weight.copy_(dequantize(codes.to(layer.weight.device), _grid_on(grid, layer.weight.device)))
    finally:
        levels.leave(0)
        bar.close()
        cache.close()
    result.seconds = time.perf_counter() - started
    return result


def _grid_on(grid: WeightGrid, device) -> WeightGrid:
    return WeightGrid(grid.scale.to(device), grid.offset.to(device), grid.qmin, grid.qmax, grid.encodings)


def aimet_act_funcs(model: nn.Module, dummy_input: tuple, prefix: str = "") -> dict[str, nn.Module | None]:
    """AIMET's own pairing of each layer with the activation right after it (``get_module_act_func_pair``),
    keyed by layer name inside ``model`` (``prefix`` strips a wrapper's name)."""
    from aimet_torch.meta import connectedgraph_utils

    pairs = connectedgraph_utils.get_module_act_func_pair(model, dummy_input)
    names = {m: n for n, m in model.named_modules()}
    return {names[m][len(prefix):]: act for m, act in pairs.items() if isinstance(m, LAYER_TYPES) and act is not None}
