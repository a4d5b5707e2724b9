"""The pipeline check's verdicts: the figures it computes from two runs, and the thresholds it holds them to.

Pure arithmetic on tensors the check hands in, apart from the runs themselves (:mod:`pasd_verify.pipeline.check`):
what every verdict of ``pasd-verify pipeline`` rests on, under the mutation gate at the rewrite core's standard.
A NaN figure never passes a threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import PasdVerifyError
from ..export.agreement import sqnr_db
from .pasd import PASDOutput, Trace


@dataclass(frozen=True)
class Thresholds:
    """What the check holds each figure to. The picture's are the anchor's (ExecuTorch's HTP test of ai-hub-models'
    SD2.1: 20 dB, 0.8); the teacher-forced ones say when one network's own error is large enough to name it."""

    picture_psnr_db: float = 20.0
    picture_ssim: float = 0.8
    # the guidance difference's spread against fp32's: #155's W8A16 UNet kept 0.0091 / 0.175 = 5% of it
    guidance_std_ratio: tuple[float, float] = (0.5, 2.0)
    guidance_sqnr_db: float = 10.0
    # a network's teacher-forced output against fp32's (noise prediction, embeddings, start latent)
    network_sqnr_db: float = 20.0

    def __post_init__(self):
        object.__setattr__(self, "guidance_std_ratio", tuple(self.guidance_std_ratio))
        low, high = self.guidance_std_ratio
        if not 0 < low <= 1 <= high:
            raise PasdVerifyError(f"guidance_std_ratio must be (low, high) with 0 < low <= 1 <= high, got "
                                  f"{self.guidance_std_ratio}")
        for name in ("picture_psnr_db", "guidance_sqnr_db", "network_sqnr_db"):
            if not math.isfinite(getattr(self, name)):
                raise PasdVerifyError(f"{name} must be a finite number of dB, got {getattr(self, name)}")
        if not 0 < self.picture_ssim <= 1:
            raise PasdVerifyError(f"picture_ssim must be in (0, 1], got {self.picture_ssim}")


# --- figures --------------------------------------------------------------------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def picture_figures(reference: torch.Tensor, picture: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``picture`` against ``reference``, both NCHW in [0, 1] (scikit-image's metrics)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = (_np(x[0]).transpose(1, 2, 0).astype(np.float64) for x in (reference, picture))
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
    return {"psnr_db": float(psnr), "ssim": float(structural_similarity(a, b, data_range=1.0, channel_axis=-1))}


def guidance_figures(ref_uncond: torch.Tensor, ref_cond: torch.Tensor, uncond: torch.Tensor,
                     cond: torch.Tensor) -> dict[str, float]:
    """The guidance difference (cond - uncond) against fp32's: SQNR and the ratio of standard deviations."""
    reference, test = _np(ref_cond - ref_uncond), _np(cond - uncond)
    spread = float(reference.std())
    return {"guidance_sqnr_db": sqnr_db(reference, test),
            "guidance_std_ratio": float(test.std()) / spread if spread > 0 else float("nan")}


def step_figures(reference: Trace, trace: Trace, i: int) -> dict[str, float]:
    return {"step": i, "timestep": reference.timesteps[i],
            "noise_sqnr_db": min(sqnr_db(_np(reference.noise_uncond[i]), _np(trace.noise_uncond[i])),
                                 sqnr_db(_np(reference.noise_cond[i]), _np(trace.noise_cond[i]))),
            **guidance_figures(reference.noise_uncond[i], reference.noise_cond[i], trace.noise_uncond[i],
                               trace.noise_cond[i])}


def closed_loop(reference: PASDOutput, result: PASDOutput) -> list[dict[str, float]]:
    """Per step of a whole run: the latent after the step against fp32's, and the step's guidance signal."""
    return [{**step_figures(reference.trace, result.trace, i),
             "latent_sqnr_db": sqnr_db(_np(reference.trace.latents_out[i]), _np(result.trace.latents_out[i]))}
            for i in range(len(reference.trace.timesteps))]



# --- thresholds -----------------------------------------------------------------------------------------------

def at_least(value: float, limit: float) -> bool:
    """``value`` meets the lower threshold ``limit`` (at it counts); a NaN figure never does."""
    return value >= limit


def within(value: float, bounds: tuple[float, float]) -> bool:
    """``value`` lies in ``bounds`` (low, high), both ends included; a NaN figure never does."""
    low, high = bounds
    return low <= value <= high


def network_faults(network: str, figures: dict[str, Any], thresholds: Thresholds) -> list[dict[str, Any]]:
    """Where ``network``'s teacher-forced figures cross their thresholds, in step order."""
    faults = []

    def below(name: str, value: float, limit: float, step: int | None = None) -> None:
        if not at_least(value, limit):
            faults.append({"network": network, "step": step, "figure": name, "value": value, "threshold": limit})

    if "embeddings_sqnr_db" in figures:
        below("embeddings_sqnr_db", figures["embeddings_sqnr_db"], thresholds.network_sqnr_db)
    if "encoded_latent_sqnr_db" in figures:  # the encoder's own output; the start latent is mostly noise
        below("encoded_latent_sqnr_db", figures["encoded_latent_sqnr_db"], thresholds.network_sqnr_db)
    if "psnr_db" in figures:
        below("psnr_db", figures["psnr_db"], thresholds.picture_psnr_db)
        below("ssim", figures["ssim"], thresholds.picture_ssim)
    for step in figures.get("steps", ()):
        i = step["step"]
        below("noise_sqnr_db", step["noise_sqnr_db"], thresholds.network_sqnr_db, i)
        below("guidance_sqnr_db", step["guidance_sqnr_db"], thresholds.guidance_sqnr_db, i)
        ratio = step["guidance_std_ratio"]
        if not within(ratio, thresholds.guidance_std_ratio):
            faults.append({"network": network, "step": i, "figure": "guidance_std_ratio", "value": ratio,
                           "threshold": list(thresholds.guidance_std_ratio)})
    return faults


def closed_loop_checks(picture: dict[str, float], steps: list[dict[str, float]],
                       thresholds: Thresholds) -> dict[str, bool]:
    """The whole run with the chosen backends against its thresholds: the picture, and the guidance signal's spread
    at every step."""
    return {"picture_psnr": at_least(picture["psnr_db"], thresholds.picture_psnr_db),
            "picture_ssim": at_least(picture["ssim"], thresholds.picture_ssim),
            "guidance_std_ratio": all(within(s["guidance_std_ratio"], thresholds.guidance_std_ratio) for s in steps)}
