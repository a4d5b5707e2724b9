"""When one export step agrees with the one before it: the measures against sums written out in Python's exact
``math.fsum`` over float64 values, and each verdict at its threshold, inclusive (these tests are the mutation gate's
for ``export/agreement.py``)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pasd_verify.export.agreement import (FLOAT_TOLERANCE, HTP_SQNR_DB, QDQ_SQNR_DB, float_agrees, htp_agrees,
                                          qdq_agrees, relative_error, sqnr_db, worst)

values = st.floats(-1e3, 1e3, allow_nan=False, width=32)
pairs = st.integers(1, 12).flatmap(lambda n: st.tuples(st.lists(values, min_size=n, max_size=n),
                                                       st.lists(values, min_size=n, max_size=n)))


@given(pairs)
def test_sqnr_is_the_signal_over_noise_power_in_decibels(pair):
    reference, test = (np.array(v, dtype=np.float32) for v in pair)
    signal = math.fsum(float(r) ** 2 for r in reference)
    noise = math.fsum((float(r) - float(t)) ** 2 for r, t in zip(reference, test))
    got = sqnr_db(reference, test)
    if noise == 0:
        assert got == math.inf
    elif signal == 0:
        assert got == -math.inf
    else:
        assert got == pytest.approx(10 * math.log10(signal / noise), rel=1e-9, abs=1e-9)


@given(pairs)
def test_relative_error_is_the_largest_error_over_the_largest_reference_value(pair):
    reference, test = (np.array(v, dtype=np.float32) for v in pair)
    largest = max(abs(float(r)) for r in reference)
    error = max(abs(float(t) - float(r)) for r, t in zip(reference, test))
    assert relative_error(reference, test) == pytest.approx(error / largest if largest else error, rel=1e-12)


def test_the_measures_on_known_cases():
    ones = np.ones(4, dtype=np.float32)
    assert sqnr_db(ones, ones * 1.1) == pytest.approx(20.0)  # noise 1/100 of the signal's power
    assert sqnr_db(ones * 0.1, ones * 0.11) == pytest.approx(20.0)  # a signal below 1 is a signal
    assert sqnr_db(ones, ones * 2) == pytest.approx(0.0)
    assert sqnr_db(ones, ones) == math.inf and sqnr_db(np.zeros(2), np.zeros(2)) == math.inf
    assert relative_error(np.array([2.0, -4.0]), np.array([2.0, -3.0])) == 0.25
    assert relative_error(np.array([0.5, -0.125]), np.array([0.25, -0.125])) == 0.5  # a reference below 1 scales too
    assert relative_error(np.zeros(2), np.array([0.5, -0.25])) == 0.5


def test_a_zero_reference_against_noise_is_minus_infinity_without_a_numpy_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # log10(0) would warn: a user running with -W error must not see a crash
        assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf


def test_each_verdict_holds_at_its_threshold_and_not_beyond():
    assert float_agrees([0.0, FLOAT_TOLERANCE]) and not float_agrees([0.0, FLOAT_TOLERANCE * 1.001])
    assert qdq_agrees(QDQ_SQNR_DB) and not qdq_agrees(QDQ_SQNR_DB - 1e-9) and qdq_agrees(math.inf)
    assert htp_agrees(HTP_SQNR_DB, HTP_SQNR_DB) and not htp_agrees(HTP_SQNR_DB - 1e-9, HTP_SQNR_DB)
    assert not htp_agrees(None, HTP_SQNR_DB), "an HTP that did not run does not agree"
    assert not htp_agrees(-math.inf, HTP_SQNR_DB) and htp_agrees(12.0, 10.0) and not htp_agrees(9.0, 10.0)


def test_the_thresholds_lie_between_what_a_sound_and_a_broken_graph_give():
    """REFERENCE section 8: 16-bit activations agree at 61.8-61.9 dB on an SD1.5-width transformer, a broken
    GroupNorm -> SiLU -> Conv at about 0 dB; the float graph agrees to fp32 rounding."""
    assert qdq_agrees(61.8) and not qdq_agrees(0.0)
    assert htp_agrees(61.8, HTP_SQNR_DB) and not htp_agrees(0.0, HTP_SQNR_DB) and not htp_agrees(None, HTP_SQNR_DB)
    assert float_agrees([1e-7]) and not float_agrees([2e-3])


def test_the_worst_output_is_the_least_agreeing_one_first_of_equals():
    assert worst({"a": 50.0, "b": 20.0, "c": 40.0}) == "b"
    assert worst({"a": 20.0, "b": 20.0}) == "a"
    assert worst({"a": math.inf, "b": -math.inf}) == "b"


@pytest.mark.parametrize("per_output, expected", [
    ({"a": 50.0, "b": math.nan, "c": 20.0}, "b"), ({"a": math.nan, "b": 20.0}, "a"), ({"a": 20.0, "b": math.nan}, "b"),
    ({"a": math.inf, "b": math.nan}, "b"), ({"a": math.nan, "b": math.nan}, "a"), ({"a": -math.inf, "b": math.nan}, "a"),
])
def test_a_nan_output_agrees_least_wherever_it_is(per_output, expected):
    """No comparison with NaN holds, so a plain ``min`` keeps or skips a NaN by where it stands."""
    assert worst(per_output) == expected
