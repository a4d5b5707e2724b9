"""The AdaRound grid and rounding laws, against independent references: AIMET's own quantizer (what nearest
rounding on its grid gives), and rounding written out by hand in float64. Every AdaRound gain is measured against
the nearest-rounding baseline these functions compute, so a baseline one code short of the top, or rounding the
wrong way, must fail here (these tests are the mutation gate's for ``quant/adaround/grid.py``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pasd_verify.quant.adaround import AdaroundConfig, dequantize, initial_alpha, integer_codes, soft_rounded, weight_grid
from pasd_verify.quant.adaround.grid import _code_dtype, _rectified_sigmoid, aimet_quantizer


@st.composite
def weights(draw, max_rows: int = 6, max_cols: int = 12):
    """A seeded conv-like weight (rows are output channels), with a drawn spread per row."""
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    spread = torch.tensor([draw(st.sampled_from([1e-3, 0.1, 1.0, 30.0])) for _ in range(rows)])
    return torch.randn(rows, cols, 1, 1, generator=g) * spread.view(-1, 1, 1, 1)


configs = st.builds(AdaroundConfig, param_bw=st.integers(2, 8), weights=st.sampled_from(["per_channel", "per_tensor"]),
                    quant_scheme=st.sampled_from(["tf", "tf_enhanced"]))


def _by_hand(weight: torch.Tensor, grid, up: torch.Tensor | None) -> torch.Tensor:
    """Codes written out in float64: floor, plus one where rounding goes up (nearest: half or more), clamped."""
    scaled = weight.double() / grid.scale.double()
    if up is None:
        up = scaled - torch.floor(scaled) >= 0.5
    return torch.clamp(torch.floor(scaled) + up.double() - grid.offset.double(), grid.qmin, grid.qmax)


def _away_from_ties(weight: torch.Tensor, grid) -> torch.Tensor:
    """Where float32 and float64 division agree on the rounding: not within 1e-3 of a half step or a grid point."""
    frac = (weight.double() / grid.scale.double()) % 1
    return ((frac - 0.5).abs() > 1e-3) & (frac > 1e-3) & (frac < 1 - 1e-3)


@given(weight=weights(), config=configs)
def test_nearest_rounding_is_aimets_quantizer_on_its_own_grid(weight, config):
    """The baseline every gain is measured against: dequantized nearest codes are what AIMET's quantizer gives."""
    grid = weight_grid(weight, config)
    ours = dequantize(integer_codes(weight, None, grid), grid)
    quantizer = aimet_quantizer(weight, config.param_bw, config.weights == "per_channel", config.quant_scheme)
    with torch.no_grad():
        aimet = quantizer(weight).as_subclass(torch.Tensor)
    where = _away_from_ties(weight, grid)
    torch.testing.assert_close(ours[where], aimet[where], rtol=1e-6, atol=1e-6 * grid.scale.max().item())


@given(weight=weights(), config=configs)
def test_nearest_codes_are_rounding_written_out_by_hand(weight, config):
    grid = weight_grid(weight, config)
    codes = integer_codes(weight, None, grid)
    where = _away_from_ties(weight, grid)
    assert torch.equal(codes.double()[where], _by_hand(weight, grid, None)[where])
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax


@given(weight=weights(), config=configs)
def test_nearest_rounding_picks_the_nearest_code_of_the_whole_grid(weight, config):
    """Against every code of the grid, tried one by one: no code lies nearer a weight than the one chosen (a code
    range one short of either end, or rounding the wrong way, picks a farther one)."""
    grid = weight_grid(weight, config)
    chosen = dequantize(integer_codes(weight, None, grid), grid).double()
    every = torch.arange(grid.qmin, grid.qmax + 1, dtype=torch.float64)
    points = (every.view(-1, *[1] * weight.ndim) + grid.offset.double()) * grid.scale.double()
    nearest = (points - weight.double()).abs().min(dim=0).values
    # float32 dequantizing is a few ulps of the weight off the float64 grid points
    assert ((chosen - weight.double()).abs() <= nearest + 1e-6 * (weight.double().abs() + grid.scale.double())).all()


@given(weight=weights(), config=configs.filter(lambda c: c.quant_scheme == "tf"))
def test_a_min_max_grid_puts_each_extreme_weight_on_an_end_code(weight, config):
    """Min-max: each row's (per channel) or the tensor's largest magnitude lands on the top or the bottom code."""
    grid = weight_grid(weight, config)
    codes = integer_codes(weight, None, grid)
    rows = codes.flatten(1) if config.weights == "per_channel" else codes.flatten().unsqueeze(0)
    assert ((rows == grid.qmin) | (rows == grid.qmax)).any(dim=1).all()


@given(weight=weights(), config=configs, seed=st.integers(0, 2**16))
def test_hard_rounding_goes_up_exactly_where_alpha_is_not_negative(weight, config, seed):
    grid = weight_grid(weight, config)
    alpha = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    alpha[0].zero_()  # alpha == 0 rounds up
    codes = integer_codes(weight, alpha, grid)
    where = _away_from_ties(weight, grid)
    assert torch.equal(codes.double()[where], _by_hand(weight, grid, alpha >= 0)[where])


@given(weight=weights(), config=configs)
def test_the_warm_start_soft_rounds_each_weight_to_itself(weight, config):
    """AIMET's warm start: the alpha whose rectified sigmoid is each weight's fractional part, so soft rounding
    starts at the float weight (inside the grid's range) and hard rounding of it is nearest rounding."""
    grid = weight_grid(weight, config)
    alpha = initial_alpha(weight, grid)
    scaled = weight.double() / grid.scale.double()
    inside = _away_from_ties(weight, grid)
    torch.testing.assert_close(_rectified_sigmoid(alpha).double()[inside], (scaled - torch.floor(scaled))[inside],
                               rtol=0, atol=1e-4)
    soft = soft_rounded(weight, alpha, grid)
    codes = _by_hand(weight, grid, None)
    in_range = inside & (codes > grid.qmin) & (codes < grid.qmax)
    torch.testing.assert_close(soft[in_range], weight[in_range], rtol=1e-4, atol=1e-4 * grid.scale.max().item())
    assert torch.equal(integer_codes(weight, alpha, grid)[inside], integer_codes(weight, None, grid)[inside])


@given(weight=weights(), config=configs, seed=st.integers(0, 2**16))
def test_soft_rounding_stays_between_the_neighbouring_codes_and_is_clamped_to_the_grid(weight, config, seed):
    grid = weight_grid(weight, config)
    alpha = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * 10
    soft = soft_rounded(weight, alpha, grid).double()
    scaled = weight.double() / grid.scale.double()
    low = (torch.clamp(torch.floor(scaled) - grid.offset, grid.qmin, grid.qmax) + grid.offset) * grid.scale
    high = (torch.clamp(torch.floor(scaled) + 1 - grid.offset, grid.qmin, grid.qmax) + grid.offset) * grid.scale
    tolerance = 1e-5 * grid.scale.double()
    assert (soft >= low - tolerance).all() and (soft <= high + tolerance).all()


def test_the_rectified_sigmoid_is_aimets_stretched_sigmoid_clipped_to_zero_and_one():
    alpha = torch.linspace(-20, 20, 401)
    h = _rectified_sigmoid(alpha)
    assert h[0] == 0 and h[-1] == 1 and (h.diff() >= 0).all()
    # the stretch (zeta 1.1, gamma -0.1) reaches both ends at finite alpha: log(11) ~ 2.4 on either side
    assert h[alpha <= -2.4].eq(0).all() and h[alpha >= 2.4].eq(1).all() and (h[(alpha > -2.39) & (alpha < 2.39)] > 0).all()
    assert torch.isclose(_rectified_sigmoid(torch.tensor(0.0)), torch.tensor(0.5))


@pytest.mark.parametrize("bitwidth", range(2, 17))
def test_every_code_of_a_grid_fits_the_dtype_it_is_kept_in(bitwidth):
    config = AdaroundConfig(param_bw=bitwidth)
    grid = weight_grid(torch.linspace(-1, 1, 64).view(2, 32, 1, 1), config)
    codes = torch.tensor([grid.qmin, grid.qmax], dtype=torch.float64)
    dtype = _code_dtype(grid)
    assert torch.equal(codes.to(dtype).double(), codes)
    assert dtype == (torch.int8 if bitwidth <= 8 else torch.int16)
