"""The AdaRound grid and rounding laws, against independent references: AIMET's own quantizer (what nearest
rounding on its grid gives), and rounding written out by hand in float64. Every AdaRound gain is measured against
the nearest-rounding baseline these functions compute, so a baseline one code short of the top, or rounding the
wrong way, must fail here (these tests are the mutation gate's for ``quant/adaround/grid.py``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pasd_verify.quant.adaround import (AdaroundConfig, WeightGrid, dequantize, initial_alpha, integer_codes,
                                        soft_rounded, weight_grid)
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


@st.composite
def asymmetric_grids(draw, rows: int = 3):
    """Hand-built grids in AIMET's unsigned asymmetric convention (q in [0, 2^bw - 1], offset in [-(2^bw - 1), 0]):
    AIMET's weight quantizer is symmetric (offset 0), so only these show the offset's sign. Power-of-two scales, so
    that half steps are exact."""
    bw = draw(st.integers(2, 8))
    top = 2**bw - 1
    scale = torch.tensor([2.0 ** draw(st.integers(-6, 2)) for _ in range(rows)]).view(-1, 1)
    offset = torch.tensor([float(-draw(st.integers(0, top))) for _ in range(rows)]).view(-1, 1)
    return WeightGrid(scale, offset, 0, top, [])


@given(grid=asymmetric_grids(), seed=st.integers(0, 2**16))
def test_codes_dequantize_and_soft_rounding_keep_the_offset_on_an_asymmetric_grid(grid, seed):
    g = torch.Generator().manual_seed(seed)
    span = (grid.qmax + 4) * grid.scale
    weight = (torch.rand(3, 16, generator=g) * span - 2 * grid.scale) + grid.offset * grid.scale  # past both ends
    codes = integer_codes(weight, None, grid)
    where = _away_from_ties(weight, grid)
    assert torch.equal(codes.double()[where], _by_hand(weight, grid, None)[where])
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    assert torch.equal(dequantize(codes, grid).double(), (codes.double() + grid.offset.double()) * grid.scale.double())
    alpha = torch.randn(weight.shape, generator=g)
    hard = torch.clamp(torch.floor(weight.double() / grid.scale) + (alpha >= 0) - grid.offset, grid.qmin, grid.qmax)
    assert torch.equal(integer_codes(weight, alpha, grid).double()[where], hard[where])
    soft = soft_rounded(weight, alpha, grid).double()
    expected = (torch.clamp(torch.floor(weight.double() / grid.scale) + _rectified_sigmoid(alpha).double()
                            - grid.offset, grid.qmin, grid.qmax) + grid.offset) * grid.scale
    torch.testing.assert_close(soft, expected, rtol=1e-5, atol=1e-4 * grid.scale.max().item())  # float32 codes up to 255


@given(grid=asymmetric_grids(), k=st.integers(-20, 20))
def test_an_exact_half_step_rounds_up_for_nearest_as_for_the_warm_start(grid, k):
    """At an exact tie (k + 0.5 steps, exact with a power-of-two scale) nearest rounding goes up, as hard rounding
    of AIMET's warm start does (its alpha is 0 there, and alpha >= 0 rounds up)."""
    weight = ((k + 0.5) * grid.scale).expand(-1, 4).contiguous()
    expected = torch.clamp(torch.full_like(weight, k + 1.0) - grid.offset, grid.qmin, grid.qmax)
    assert torch.equal(integer_codes(weight, None, grid), expected)
    assert torch.equal(integer_codes(weight, initial_alpha(weight, grid), grid), expected)


def test_a_min_max_grid_puts_the_extremes_on_the_end_codes():
    """AIMET's symmetric min-max ("tf") weight grid, per row or for the whole tensor: the scale is the larger of
    max / qmax and min / qmin (a symmetric grid has one more negative code than positive ones)."""
    weight = torch.tensor([[0.5, -2.0, 1.0], [0.25, 0.125, -0.0625]]).view(2, 3, 1, 1)
    by_row = torch.tensor([max(1.0 / 7, 2.0 / 8), max(0.25 / 7, 0.0625 / 8)])
    for weights, expected in (("per_channel", by_row), ("per_tensor", by_row.max().view(1))):
        grid = weight_grid(weight, AdaroundConfig(param_bw=4, weights=weights, quant_scheme="tf"))
        assert (grid.qmin, grid.qmax) == (-8, 7) and not grid.offset.any()
        torch.testing.assert_close(grid.scale.flatten(), expected)
        assert [e["bitwidth"] for e in grid.encodings] == [4] * len(expected)
        torch.testing.assert_close(torch.tensor([e["scale"] for e in grid.encodings]), expected)


def test_tf_enhanced_narrows_the_range_of_a_heavy_tailed_weight_that_min_max_spans_whole():
    """AIMET's SQNR-searching analyzer, not min-max, gives the "tf_enhanced" grid."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1, 256, 1, 1, generator=g) * 0.05
    weight[0, 0] = 4.0
    grids = {scheme: weight_grid(weight, AdaroundConfig(param_bw=4, quant_scheme=scheme)) for scheme in ("tf", "tf_enhanced")}
    torch.testing.assert_close(grids["tf"].scale.flatten(), torch.tensor([4.0 / 7]))
    assert grids["tf_enhanced"].scale.item() < 0.99 * grids["tf"].scale.item()


def test_soft_rounding_computes_in_float32_for_a_half_precision_weight():
    """A float16 weight on a per-tensor grid (a 0-dim scale, which would leave a float16 division in float16) is
    soft-rounded exactly as its float32 copy; a float64 weight stays float64."""
    grid = WeightGrid(torch.tensor(0.1), torch.tensor(0.0), -128, 127, [])
    weight = torch.linspace(-12, 12, 4001).half()
    alpha = torch.zeros(weight.shape)
    assert torch.equal(soft_rounded(weight, alpha, grid), soft_rounded(weight.float(), alpha, grid))
    assert soft_rounded(weight.double(), alpha, grid).dtype == torch.float64


@pytest.mark.parametrize("qmin,qmax,expected", [
    (-128, 127, torch.int8), (0, 127, torch.int8), (-129, 127, torch.int16), (-128, 128, torch.int16),
    (0, 255, torch.int16), (-32768, 32767, torch.int16), (-32769, 0, torch.int32), (0, 32768, torch.int32),
    (0, 65535, torch.int32)])
def test_codes_are_kept_in_the_narrowest_integer_dtype_holding_both_ends(qmin, qmax, expected):
    grid = WeightGrid(torch.ones(1), torch.zeros(1), qmin, qmax, [])
    assert _code_dtype(grid) == expected
    ends = torch.tensor([qmin, qmax], dtype=torch.float64)
    assert torch.equal(ends.to(expected).double(), ends)


@pytest.mark.parametrize("bitwidth", range(2, 17))
def test_every_code_of_a_grid_fits_the_dtype_it_is_kept_in(bitwidth):
    config = AdaroundConfig(param_bw=bitwidth)
    grid = weight_grid(torch.linspace(-1, 1, 64).view(2, 32, 1, 1), config)
    codes = torch.tensor([grid.qmin, grid.qmax], dtype=torch.float64)
    dtype = _code_dtype(grid)
    assert torch.equal(codes.to(dtype).double(), codes)
    assert dtype == (torch.int8 if bitwidth <= 8 else torch.int16)
