"""aimet-torch's own AdaRound, run on the same models, data and settings as :func:`pasd_verify.quant.adaround.adaround`.

It is the reference our AdaRound is checked against (the aimet test tier) and the baseline its memory and time
are measured against (the bench tier): whatever ours computes or costs is a ratio to this, measured in the same run.
This is the one module that touches aimet-torch's private ``AdaroundOptimizer`` (its caching switch and its per-layer
call); tests/test_private_apis.py fails, naming it, when an aimet release changes either.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from collections.abc import Iterator, Sequence

import torch
from aimet_torch._base.adaround.adaround_optimizer import AdaroundOptimizer
from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
from aimet_torch.common.defs import QuantScheme
from torch import nn
from torch.utils.data import DataLoader

from ..kinds import Sample, graph_of
from . import QUANTSIM_CONFIGS, aimet_torch_session

SCHEMES = {"tf_enhanced": QuantScheme.post_training_tf_enhanced, "tf": QuantScheme.post_training_tf}


def aimet_rows(model: nn.Module, samples: Sequence[Sample],
               partner: nn.Module | None = None) -> tuple[nn.Module, list[tuple[torch.Tensor, ...]]]:
    """``model`` as its kind's flat-signature graph module (what AIMET traces) and, per sample, that graph's inputs
    (a partner's outputs computed by the float partner) with the batch axis dropped: AIMET's DataLoader adds it
    back."""
    graph = graph_of(model)
    rows = []
    for s in samples:
        feeds = graph.feeds(s, partner)
        rows.append(tuple(feeds[name][0] for name in graph.input_names))
    return graph.module, rows


def aimet_adaround(model: nn.Module, rows: Sequence[tuple[torch.Tensor, ...]], *, iterations: int, param_bw: int = 4,
                   weights: str = "per_channel", quant_scheme: str = "tf_enhanced", cached: bool = True,
                   folder: str | os.PathLike | None = None, seed: int = 0,
                   ignore: Sequence[str] = ()) -> tuple[nn.Module, str | None]:
    """``Adaround.apply_adaround`` on a deep copy of ``model`` (called as ``model(*row)`` per sample, batch 1).

    ``cached=False`` is AIMET's only memory lever (``AdaroundOptimizer.is_activation_caching_enabled``): two
    partial forwards per optimisation step instead of a cache of every sample. Returns AIMET's rounded model and,
    when ``folder`` is given, the path of its parameter encodings (``aimet.encodings``, 0.6.1 layout).
    ``ignore`` names modules AIMET leaves unquantized (its ``ignore_quant_ops_list``), so that it rounds only the
    rest: a sample of the layers of a model too large to round whole in a benchmark.
    """
    params = AdaroundParameters(DataLoader(list(rows), batch_size=1), len(rows), default_num_iterations=iterations,
                                forward_fn=lambda m, batch: m(*batch))
    dummy = tuple(t.unsqueeze(0) for t in rows[0])
    previous = AdaroundOptimizer.is_activation_caching_enabled
    AdaroundOptimizer.is_activation_caching_enabled = cached
    torch.manual_seed(seed)
    try:
        with tempfile.TemporaryDirectory() as tmp, aimet_torch_session():
            out = str(folder) if folder is not None else tmp
            copied = copy.deepcopy(model)
            rounded = Adaround.apply_adaround(
                copied, dummy, params, out, "aimet", default_param_bw=param_bw,
                ignore_quant_ops_list=[copied.get_submodule(name) for name in ignore] or None,
                default_quant_scheme=SCHEMES[quant_scheme], default_config_file=str(QUANTSIM_CONFIGS[weights]))
    finally:
        AdaroundOptimizer.is_activation_caching_enabled = previous
    return rounded, (os.path.join(folder, "aimet.encodings") if folder is not None else None)


@contextlib.contextmanager
def timed_aimet_layers(seconds: list[float]) -> Iterator[None]:
    """Append the wall time of each layer AIMET's ``AdaroundOptimizer.adaround_module`` rounds to ``seconds``."""
    original = AdaroundOptimizer.__dict__["adaround_module"]

    def timed(cls, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original.__func__(cls, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    AdaroundOptimizer.adaround_module = classmethod(timed)
    try:
        yield
    finally:
        AdaroundOptimizer.adaround_module = original
