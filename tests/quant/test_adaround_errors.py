"""Every refusal of AdaRound names what it is about: the setting and its value, the calibration sample, the module
or the layer. One test per ``raise AdaroundError`` of :mod:`pasd_verify.quant.adaround`, each on a model of a few
Linear layers whose forward is built to break one rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pasd_verify.quant.adaround import AdaroundConfig, AdaroundError, adaround


def _adaround(model: nn.Module, samples: list[tuple[tuple, dict]], **settings):
    """AdaRound ``model`` with one call per sample, ``m(*args, **kwargs)``, one iteration per layer."""
    calls = [lambda m, a=args, k=kwargs: m(*a, **k) for args, kwargs in samples]
    return adaround(model, calls, AdaroundConfig(iterations=1, **settings), progress=False)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- the settings -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, value, message", [
    ("param_bw", 1, r"param_bw must be 2\.\.16, got 1$"),
    ("param_bw", 17, r"param_bw must be 2\.\.16, got 17$"),
    ("iterations", 0, r"iterations must be positive, got 0$"),
    ("weights", "per_row", r"weights must be 'per_channel' or 'per_tensor', got 'per_row'$"),
    ("quant_scheme", "percentile", r"quant_scheme must be one of \['tf', 'tf_enhanced'\], got 'percentile'$"),
    ("cache_dtype", "bfloat16", r"cache_dtype must be one of \['float16', 'float32'\], got 'bfloat16'$"),
    ("working_bytes", 0, r"working_bytes must be positive, got 0$"),
    ("cache_budget", -1, r"cache_budget must be >= 0 bytes, got -1$"),
    ("warm_start", 1.0, r"warm_start must be in \[0, 1\), got 1\.0$"),
    ("warm_start", -0.5, r"warm_start must be in \[0, 1\), got -0\.5$"),
    ("device", "banana", r"device must be cpu, cuda or cuda:N, got 'banana'$"),
    ("device", "meta", r"device must be cpu, cuda or cuda:N, got 'meta'$"),
    ("device", 3.5, r"device must be cpu, cuda or cuda:N, got 3\.5$"),
])
def test_a_bad_setting_is_refused_naming_it_and_its_value(setting, value, message):
    with pytest.raises(AdaroundError, match=message):
        AdaroundConfig(**{setting: value})


def test_the_ends_of_each_settings_range_are_accepted():
    for settings in ({"param_bw": 2}, {"param_bw": 16}, {"iterations": 1}, {"iterations": None},
                     {"weights": "per_tensor"}, {"quant_scheme": "tf"}, {"cache_dtype": "float16"},
                     {"working_bytes": 1}, {"cache_budget": 0}, {"warm_start": 0.0}, {"warm_start": 0.99}):
        assert AdaroundConfig(**settings)


# --- the call -----------------------------------------------------------------------------------------------

def test_no_calibration_samples_is_refused():
    with pytest.raises(AdaroundError, match=r"^no calibration samples$"):
        adaround(nn.Sequential(nn.Linear(4, 4)), [], AdaroundConfig(iterations=1), progress=False)


def test_a_cuda_device_without_cuda_is_refused_naming_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AdaroundError, match=r"device 'cuda:0' was asked for, but torch sees no CUDA device"):
        AdaroundConfig(device="cuda:0")


def test_a_model_without_layers_to_round_is_refused_naming_only():
    with pytest.raises(AdaroundError, match=r"no Conv2d or Linear layer under \[\] runs in the model's forward"):
        _adaround(nn.Sequential(nn.ReLU()), [((_x(1, 4),), {})])
    with pytest.raises(AdaroundError, match=r"no Conv2d or Linear layer under \['nope'\] runs"):
        _adaround(nn.Sequential(nn.Linear(4, 4)), [((_x(1, 4),), {})], only=("nope",))


# --- the model's forward ------------------------------------------------------------------------------------

class _LayerTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.lin(x))


class _BlockTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4))

    def forward(self, x):
        return self.block(self.block(x))


@pytest.mark.parametrize("model, name", [(_LayerTwice, "lin"), (_BlockTwice, "block")])
def test_a_module_called_twice_in_one_forward_is_refused_naming_it(model, name):
    with pytest.raises(AdaroundError, match=rf"module\(s\) called more than once in one forward, e\.g\. '{name}'"):
        _adaround(model(), [((_x(1, 4),), {})])


class _Bypass(nn.Module):
    """Calls the layer inside ``block`` without calling ``block``."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4))

    def forward(self, x):
        return self.block[0](x)


def test_a_layer_run_outside_the_top_level_blocks_is_refused_naming_it():
    with pytest.raises(AdaroundError, match=r"layer 'block\.0' runs outside the model's top-level blocks"):
        _adaround(_Bypass(), [((_x(1, 4),), {})])


# --- the calibration samples --------------------------------------------------------------------------------

class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, skip=False):
        x = self.first(x)
        return x if skip else self.second(x)


def test_a_sample_that_does_not_reach_a_block_is_refused_naming_both():
    samples = [((_x(1, 4),), {}), ((_x(1, 4, seed=1),), {"skip": True})]
    with pytest.raises(AdaroundError, match=r"calibration sample 1 did not reach block 'second'"):
        _adaround(_Branch(), samples)


class _Sum(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, *rest):
        return self.lin(x) + sum(rest)


class _Passes(nn.Module):
    """Passes its arguments on to ``block``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return self.block(*args)


def test_a_sample_calling_a_block_with_other_arguments_is_refused_naming_both():
    samples = [((_x(1, 4),), {}), ((_x(1, 4), _x(1, 4, seed=1)), {})]
    with pytest.raises(AdaroundError, match=r"calibration sample 1 calls 'block' with another structure of arguments "
                                            r"than sample 0"):
        _adaround(_Passes(_Sum()), samples)


def test_a_sample_giving_a_block_another_input_shape_is_refused_naming_both():
    samples = [((_x(1, 4),), {}), ((_x(2, 4, seed=1),), {})]
    with pytest.raises(AdaroundError, match=r"calibration sample 1: an input of '0' has shape \(2, 4\), sample 0 had "
                                            r"\(1, 4\); every sample must have the same shapes"):
        _adaround(nn.Sequential(nn.Linear(4, 3)), samples)


class _Gated(nn.Module):
    """Runs its layer only where ``gate`` is positive: replaying it on cached inputs can skip the layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, gate):
        return self.lin(x) if gate.item() > 0 else x


def test_a_layer_that_does_not_run_when_its_block_is_replayed_is_refused_naming_layer_block_and_sample():
    samples = [((_x(1, 4), torch.tensor(1.0)), {}), ((_x(1, 4, seed=1), torch.tensor(-1.0)), {})]
    with pytest.raises(AdaroundError, match=r"layer 'block\.lin' did not run when 'block' was replayed on "
                                            r"calibration sample 1"):
        _adaround(_Passes(_Gated()), samples)


class _Sliced(nn.Module):
    """Gives its layer the first ``rows`` rows of ``x``: the block's input shapes agree, the layer's do not."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, rows):
        return self.lin(x[:int(rows.item())])


def test_a_sample_giving_a_layer_another_shape_is_refused_naming_layer_and_sample():
    samples = [((_x(2, 4), torch.tensor(2)), {}), ((_x(2, 4, seed=1), torch.tensor(1)), {})]
    with pytest.raises(AdaroundError, match=r"calibration sample 1 gives layer 'block\.lin' an input of shape \(1, 4\), "
                                            r"sample 0 gave \(2, 4\); every sample must have the same shapes"):
        _adaround(_Passes(_Sliced()), samples)
