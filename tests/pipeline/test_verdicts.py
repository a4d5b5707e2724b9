"""The pipeline check's arithmetic, which needs no HTP: each figure computed from the data (against figures worked
out by hand from tensors built for them), and each threshold firing just past its limit and holding at it, a NaN
figure passing none. Thresholds here are all distinct and none the default, so a figure held to another figure's
threshold, or to a default written in place of the field, fails."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pasd_verify.errors import PasdVerifyError
from pasd_verify.pipeline.verdicts import (Thresholds, at_least, closed_loop, closed_loop_checks, guidance_figures,
                                          network_faults, picture_figures, step_figures, within)
from pasd_verify.pipeline.pasd import PASDOutput, Trace

NAN = math.nan
LIMITS = Thresholds(picture_psnr_db=21.0, picture_ssim=0.7, guidance_std_ratio=(0.25, 4.0), guidance_sqnr_db=12.0,
                    network_sqnr_db=23.0)


def below(limit: float) -> float:
    """The largest float under ``limit``: just past a lower threshold."""
    return math.nextafter(limit, -math.inf)


def above(limit: float) -> float:
    return math.nextafter(limit, math.inf)


def signs(shape=(1, 4, 4, 4), seed: int = 0) -> torch.Tensor:
    """+-1 in equal numbers: mean exactly 0 and standard deviation exactly 1, so a * signs has std |a| exactly."""
    flat = torch.tensor([1.0, -1.0]).repeat(math.prod(shape) // 2)
    return flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))].reshape(shape)


def on_grid(seed: int, shape=(1, 4, 4, 4)) -> torch.Tensor:
    """Eighths in [-2, 2): adding a power of two times ``signs`` to it and subtracting it again is exact."""
    return torch.randint(-16, 16, shape, generator=torch.Generator().manual_seed(seed)).float() / 8


# --- the comparisons ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, limit, holds", [
    (23.0, 23.0, True), (above(23.0), 23.0, True), (below(23.0), 23.0, False), (math.inf, 23.0, True),
    (-math.inf, 23.0, False), (NAN, 23.0, False), (NAN, -math.inf, False), (0.0, -0.0, True),
])
def test_at_least_holds_at_the_limit_fails_just_below_and_never_for_nan(value, limit, holds):
    assert at_least(value, limit) is holds


@pytest.mark.parametrize("value, holds", [
    (0.25, True), (4.0, True), (1.0, True), (below(0.25), False), (above(4.0), False), (0.0, False),
    (math.inf, False), (NAN, False),
])
def test_within_holds_on_both_ends_fails_just_outside_and_never_for_nan(value, holds):
    assert within(value, (0.25, 4.0)) is holds


def test_within_holds_anything_in_unbounded_bounds_but_nan():
    assert within(1e300, (0.0, math.inf)) and within(0.0, (0.0, math.inf))
    assert not within(NAN, (-math.inf, math.inf))


@pytest.mark.parametrize("field, value", [("picture_psnr_db", NAN), ("guidance_sqnr_db", math.inf),
                                          ("network_sqnr_db", NAN), ("picture_ssim", NAN), ("picture_ssim", 0.0),
                                          ("guidance_std_ratio", (NAN, 2.0)), ("guidance_std_ratio", (0.5, NAN))])
def test_a_threshold_that_no_figure_could_be_compared_with_is_refused(field, value):
    with pytest.raises(PasdVerifyError, match=field):
        Thresholds(**{field: value})


@pytest.mark.parametrize("bounds", [(1.0, 1.0), (0.5, 1.5), (1e-9, math.inf), (0.25, 4.0)])
def test_guidance_std_ratio_bounds_around_one_are_accepted_each_end_inclusive(bounds):
    assert Thresholds(guidance_std_ratio=bounds).guidance_std_ratio == bounds


@pytest.mark.parametrize("bounds", [(0.0, 2.0), (-0.5, 2.0), (above(1.0), 2.0), (0.5, below(1.0)), (2.0, 0.5)])
def test_guidance_std_ratio_bounds_that_exclude_one_or_start_at_zero_are_refused(bounds):
    with pytest.raises(PasdVerifyError) as refused:
        Thresholds(guidance_std_ratio=bounds)
    assert str(refused.value) == (f"guidance_std_ratio must be (low, high) with 0 < low <= 1 <= high, got {bounds}")


def test_guidance_std_ratio_given_as_a_list_is_kept_as_a_tuple():
    """A list read from JSON: the frozen thresholds keep a tuple, so they hash and compare like the defaults."""
    thresholds = Thresholds(guidance_std_ratio=[0.5, 2.0])
    assert type(thresholds.guidance_std_ratio) is tuple and thresholds == Thresholds()
    assert hash(thresholds) == hash(Thresholds())


@pytest.mark.parametrize("ssim, accepted", [(1.0, True), (1e-9, True), (above(1.0), False), (1.5, False),
                                            (0.0, False), (-0.5, False)])
def test_picture_ssim_threshold_lies_in_zero_to_one_one_included(ssim, accepted):
    if accepted:
        assert Thresholds(picture_ssim=ssim).picture_ssim == ssim
        return
    with pytest.raises(PasdVerifyError) as refused:
        Thresholds(picture_ssim=ssim)
    assert str(refused.value) == f"picture_ssim must be in (0, 1], got {ssim}"


@pytest.mark.parametrize("field", ["picture_psnr_db", "guidance_sqnr_db", "network_sqnr_db"])
def test_a_db_threshold_must_be_finite_and_may_be_negative(field):
    assert getattr(Thresholds(**{field: -5.0}), field) == -5.0
    for value in (math.inf, -math.inf, NAN):
        with pytest.raises(PasdVerifyError) as refused:
            Thresholds(**{field: value})
        assert str(refused.value) == f"{field} must be a finite number of dB, got {value}"


# --- the figures, from the data -------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0.0525, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
def test_the_guidance_std_ratio_is_the_candidates_spread_over_fp32s(k):
    """fp32's guidance difference is 0.25 * signs (std 0.25), the candidate's k times it, around other unconditional
    predictions: the ratio is k and the SQNR of k * g against g is -20 log10 |1 - k|."""
    g = 0.25 * signs()
    ref_uncond, uncond = on_grid(1), on_grid(2)
    figures = guidance_figures(ref_uncond, ref_uncond + g, uncond, uncond + k * g)
    assert figures["guidance_std_ratio"] == pytest.approx(k, rel=1e-5)  # float32 sums
    expected_sqnr = math.inf if k == 1.0 else -20 * math.log10(abs(1 - k))
    assert figures["guidance_sqnr_db"] == pytest.approx(expected_sqnr, rel=1e-5)


def test_a_sign_flipped_guidance_keeps_its_spread_but_not_its_sqnr():
    g = 0.5 * signs()
    zero = torch.zeros_like(g)
    figures = guidance_figures(zero, g, zero, -g)
    assert figures["guidance_std_ratio"] == 1.0
    assert figures["guidance_sqnr_db"] == pytest.approx(-20 * math.log10(2), rel=1e-9)  # noise 2g: -6.02 dB


def test_ai_hub_apps_155_collapsed_guidance_fails_the_check():
    """#155: the W8A16 UNet's guidance difference had std 0.0091 where fp32's had 0.175: ratio 0.052, a fault at
    the default thresholds."""
    g = signs()
    uncond = on_grid(3)
    step = step_figures(Trace(timesteps=[981], noise_uncond=[uncond], noise_cond=[uncond + 0.175 * g]),
                        Trace(timesteps=[981], noise_uncond=[uncond], noise_cond=[uncond + 0.0091 * g]), 0)
    assert step["guidance_std_ratio"] == pytest.approx(0.0091 / 0.175, rel=1e-5)
    faults = network_faults("unet", {"steps": [step]}, Thresholds())
    assert [(f["figure"], f["step"]) for f in faults if f["figure"] == "guidance_std_ratio"] == [
        ("guidance_std_ratio", 0)]
    assert closed_loop_checks({"psnr_db": 40.0, "ssim": 0.99}, [step], Thresholds())["guidance_std_ratio"] is False


def test_a_guidance_fp32_gives_none_of_has_no_ratio_and_fails():
    uncond = on_grid(4)
    figures = guidance_figures(uncond, uncond, uncond, uncond + 0.25 * signs())
    assert math.isnan(figures["guidance_std_ratio"])
    assert closed_loop_checks({"psnr_db": 40.0, "ssim": 0.99}, [figures], LIMITS)["guidance_std_ratio"] is False


def test_a_steps_noise_sqnr_is_its_worse_half():
    """The unconditional half 10% off (20 dB), the conditional 1% off (40 dB): the step is judged at 20 dB, and the
    same with the halves the other way round."""
    u, c = on_grid(5) + 4.0, on_grid(6) + 4.0  # no zeros
    reference = Trace(timesteps=[500], noise_uncond=[u], noise_cond=[c])
    first = step_figures(reference, Trace(timesteps=[500], noise_uncond=[u * 1.1], noise_cond=[c * 1.01]), 0)
    second = step_figures(reference, Trace(timesteps=[500], noise_uncond=[u * 1.01], noise_cond=[c * 1.1]), 0)
    assert first["noise_sqnr_db"] == pytest.approx(20.0, abs=1e-4)
    assert second["noise_sqnr_db"] == pytest.approx(20.0, abs=1e-4)
    assert (first["step"], first["timestep"]) == (0, 500)


def test_the_closed_loop_figures_are_each_steps_own():
    """Two steps: the first's latent 1% off (40 dB) and guidance halved, the second's latent exact and guidance
    doubled; each step's figures are computed from its own tensors."""
    g, u = 0.25 * signs(), on_grid(7)
    latent = on_grid(8) + 4.0

    def output(scale: float, factors: tuple[float, float]) -> PASDOutput:
        trace = Trace(timesteps=[900, 400], noise_uncond=[u, u], noise_cond=[u + factors[0] * g, u + factors[1] * g],
                      latents_out=[latent * scale, latent])
        return PASDOutput(picture=torch.zeros(1, 3, 8, 8), latents=latent, noise=None, trace=trace)

    steps = closed_loop(output(1.0, (1.0, 1.0)), output(1.01, (0.5, 2.0)))
    assert [s["step"] for s in steps] == [0, 1] and [s["timestep"] for s in steps] == [900, 400]
    assert steps[0]["latent_sqnr_db"] == pytest.approx(40.0, abs=1e-4) and steps[1]["latent_sqnr_db"] == math.inf
    assert [s["guidance_std_ratio"] for s in steps] == pytest.approx([0.5, 2.0], rel=1e-6)


def test_picture_figures_are_psnr_and_ssim_against_the_reference():
    """A grey picture 0.1 off everywhere: MSE 0.01, PSNR 20 dB; SSIM of a constant shift is the luminance term
    (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1), C1 = (0.01 * 1)^2."""
    reference = torch.full((1, 3, 16, 16), 0.5)
    shifted = reference + 0.1
    figures = picture_figures(reference, shifted)
    mu1, mu2, c1 = 0.5, float(np.float32(0.6)), 1e-4
    assert figures["psnr_db"] == pytest.approx(20.0, abs=1e-5)
    assert figures["ssim"] == pytest.approx((2 * mu1 * mu2 + c1) / (mu1 ** 2 + mu2 ** 2 + c1), rel=1e-6)
    with np.errstate(divide="ignore"):  # scikit-image's PSNR of equal pictures divides by a zero error
        assert picture_figures(reference, reference) == {"psnr_db": math.inf, "ssim": 1.0}


# --- each threshold fires -------------------------------------------------------------------------------------

def good_step(i: int) -> dict:
    return {"step": i, "timestep": 1000 - i, "noise_sqnr_db": 60.0, "guidance_sqnr_db": 60.0,
            "guidance_std_ratio": 1.0}


def good_figures() -> dict:
    """Every figure a network can have, all far inside LIMITS; the start latent is not judged (mostly noise)."""
    return {"embeddings_sqnr_db": 60.0, "encoded_latent_sqnr_db": 60.0, "start_latent_sqnr_db": -10.0,
            "psnr_db": 60.0, "ssim": 0.99, "steps": [good_step(0), good_step(1), good_step(2)]}


# (figure, threshold in LIMITS, whether the figure is a step's)
LOWER = [("embeddings_sqnr_db", 23.0, False), ("encoded_latent_sqnr_db", 23.0, False), ("psnr_db", 21.0, False),
         ("ssim", 0.7, False), ("noise_sqnr_db", 23.0, True), ("guidance_sqnr_db", 12.0, True)]


def test_good_figures_have_no_faults():
    assert network_faults("unet", good_figures(), LIMITS) == []
    assert network_faults("unet", {}, LIMITS) == []


@pytest.mark.parametrize("figure, limit, per_step", LOWER)
@pytest.mark.parametrize("value, fires", [("at", False), ("just below", True), ("nan", True), ("-inf", True)])
def test_each_lower_threshold_fires_just_past_it_and_on_nan(figure, limit, per_step, value, fires):
    value = {"at": limit, "just below": below(limit), "nan": NAN, "-inf": -math.inf}[value]
    figures = good_figures()
    if per_step:
        figures["steps"][1][figure] = value
    else:
        figures[figure] = value
    faults = network_faults("unet", figures, LIMITS)
    if not fires:
        assert faults == []
        return
    assert len(faults) == 1
    fault = faults[0]
    assert (fault["network"], fault["step"], fault["figure"], fault["threshold"]) == (
        "unet", 1 if per_step else None, figure, limit)
    assert fault["value"] is value or fault["value"] == value


@pytest.mark.parametrize("value, fires", [(0.25, False), (4.0, False), (below(0.25), True), (above(4.0), True),
                                          (0.0525, True), (NAN, True), (math.inf, True)])
def test_the_guidance_std_ratio_fires_outside_its_bounds_and_on_nan(value, fires):
    figures = good_figures()
    figures["steps"][2]["guidance_std_ratio"] = value
    faults = network_faults("unet", figures, LIMITS)
    assert faults == ([{"network": "unet", "step": 2, "figure": "guidance_std_ratio", "value": value,
                        "threshold": [0.25, 4.0]}] if fires else [])


def test_faults_come_in_step_order_each_named_by_its_step():
    figures = good_figures()
    figures["steps"][2]["noise_sqnr_db"] = 1.0
    figures["steps"][0]["guidance_sqnr_db"] = 1.0
    figures["steps"][0]["guidance_std_ratio"] = 0.1
    figures["ssim"] = 0.5
    faults = network_faults("unet", figures, LIMITS)
    assert [(f["step"], f["figure"]) for f in faults] == [
        (None, "ssim"), (0, "guidance_sqnr_db"), (0, "guidance_std_ratio"), (2, "noise_sqnr_db")]


@pytest.mark.parametrize("figure, check, limit", [("psnr_db", "picture_psnr", 21.0), ("ssim", "picture_ssim", 0.7)])
def test_the_closed_loop_picture_checks_fire_just_past_their_threshold_and_on_nan(figure, check, limit):
    steps = [good_step(0)]
    picture = {"psnr_db": 60.0, "ssim": 0.99}
    assert closed_loop_checks(picture, steps, LIMITS) == {"picture_psnr": True, "picture_ssim": True,
                                                          "guidance_std_ratio": True}
    for value, holds in ((limit, True), (below(limit), False), (NAN, False)):
        checks = closed_loop_checks({**picture, figure: value}, steps, LIMITS)
        assert checks == {"picture_psnr": True, "picture_ssim": True, "guidance_std_ratio": True, check: holds}


@pytest.mark.parametrize("ratio, holds", [(0.25, True), (4.0, True), (below(0.25), False), (above(4.0), False),
                                          (NAN, False)])
def test_the_closed_loop_guidance_check_fires_on_any_step_outside_its_bounds(ratio, holds):
    picture = {"psnr_db": 60.0, "ssim": 0.99}
    steps = [good_step(0), {**good_step(1), "guidance_std_ratio": ratio}, good_step(2)]
    assert closed_loop_checks(picture, steps, LIMITS) == {"picture_psnr": True, "picture_ssim": True,
                                                          "guidance_std_ratio": holds}
