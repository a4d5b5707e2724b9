"""How far one step of an export is from the step before it, and when that is close enough: every verdict of
``pasd-verify export`` and of the localization of a divergence is taken here.

====================================  ======================================================================
comparison                            agrees when
====================================  ======================================================================
torch fp32 vs float ONNX (CPU)        relative error <= ``FLOAT_TOLERANCE`` (fp32 rounding, summation order)
AIMET sim vs QDQ graph (CPU)          SQNR >= ``QDQ_SQNR_DB``: the same quantizers, only float rounding apart
QDQ graph on CPU vs on the HTP        SQNR >= the threshold (default ``HTP_SQNR_DB``), and the HTP ran
====================================  ======================================================================
"""

from __future__ import annotations

import math

import numpy as np

FLOAT_TOLERANCE = 1e-4
QDQ_SQNR_DB = 40.0
# 16-bit activations quantize each tensor at ~90 dB; the HTP's fixed-point requantization and the CPU's float
# emulation of the same QDQ graph round differently, which an SD1.5-width transformer shows at 61.9 dB. 30 dB (3%
# rms error) is far below that and far above a broken graph (GroupNorm -> SiLU -> Conv at 16 bits: ~0 dB).
HTP_SQNR_DB = 30.0


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal to quantization-noise ratio of ``test`` against ``reference``, in dB (inf when equal)."""
    reference = reference.astype(np.float64)
    noise = float(((reference - test.astype(np.float64)) ** 2).sum())
    signal = float((reference ** 2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(signal / noise)) if signal > 0 else float("-inf")


def relative_error(reference: np.ndarray, test: np.ndarray) -> float:
    """max |test - reference| / max |reference| (the absolute error where the reference is all zeros)."""
    scale = float(np.abs(reference).max())
    return float(np.abs(test.astype(np.float64) - reference).max()) / (scale if scale > 0 else 1.0)


def float_agrees(relative_errors: list[float]) -> bool:
    """The float graph (and any exact rewrite) computes what torch computes, to fp32 rounding."""
    return max(relative_errors) <= FLOAT_TOLERANCE


def qdq_agrees(sqnr: float) -> bool:
    """The QDQ graph on the CPU computes what AIMET's simulation computes."""
    return sqnr >= QDQ_SQNR_DB


def htp_agrees(sqnr: float | None, threshold_db: float) -> bool:
    """The HTP ran (``sqnr`` is None when it did not) and agrees with the CPU on the same QDQ graph."""
    return sqnr is not None and sqnr >= threshold_db


def worst(per_output: dict[str, float]) -> str:
    """The output that agrees least (the first of equals, in the graph's order); a NaN figure (a device that
    answered NaN) agrees least of all: ``min`` alone would pass over it, since no comparison with NaN holds."""
    return min(per_output, key=lambda name: -math.inf if math.isnan(per_output[name]) else per_output[name])
