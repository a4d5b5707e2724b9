"""The export workloads the benchmarks run in child processes (:func:`pasd_verify.memory.peak_rss_of`).

Each builds a seeded model, converts it to SHA when asked, and runs the whole ``pasd-verify export`` pipeline on it
(with the default rewrites, so that the HTP agrees and the run measures a passing export) into a temporary folder. The
result carries each stage's time and the peak RSS after it, the HTP child's own peak (compile and run happen in a
grandchild, which the caller's RSS does not see), and the figures that compare MHA with SHA on the HTP.

Targets: ``unet`` (the plain UNet; ``heads`` overrides its number of heads at the same width), ``pasd_unet`` and
``pasd_controlnet`` (the PASD pair, calibrated on the ControlNet's residuals), ``text_encoder``, ``vae_encoder`` and
``vae_decoder`` (the other three networks of a PASD app), each at the ``tiny`` or ``sd15`` preset's size (the VAE's
image is the latent size x 8). At SD1.5 size the run releases the torch weights after the float export, as ``pasd-verify export``
does: calibration needs that memory.
"""

from __future__ import annotations

import tempfile
from typing import Any

from ..kinds import preset_model
from ..presets import UNET_PRESETS
from .pipeline import ExportConfig, export_files

TARGETS = ("unet", "pasd_unet", "pasd_controlnet", "text_encoder", "vae_encoder", "vae_decoder")
FORMS = ("mha", "sha")


def export_run(target: str, form: str, heads: int | None = None, samples: int = 4, latent: list[int] | None = None,
               seed: int = 0, preset: str = "tiny", outputs: str | None = None) -> dict[str, Any]:
    """Export ``target`` in ``form`` (at the preset's latent size unless ``latent``) to a temporary folder; return
    its stages' times and memory and the HTP's figures (status, op count, emulated cycles, compile time, context
    binary size, agreement). ``outputs`` keeps the check input and each step's outputs there (``.npz``,
    :func:`pasd_verify.export.pipeline.save_check_outputs`), so that the MHA and SHA runs of one model can be
    compared with each other afterwards."""
    if target not in TARGETS or form not in FORMS:
        raise ValueError(f"target must be one of {TARGETS} and form one of {FORMS}")
    overrides = {"attention_head_dim": heads} if heads else {}
    loaded = preset_model(preset, target.replace("_", "-"), seed=seed, form=form, **overrides)
    latent = tuple(latent or [UNET_PRESETS[preset]["sample_size"]] * 2)
    with tempfile.TemporaryDirectory(prefix="pasd-verify-export-bench-") as out:
        config = ExportConfig(samples=samples, latent=latent, localize=False, seed=seed,
                              release_model=preset != "tiny", check_outputs=outputs)
        report = export_files(loaded.model, out, config, partner=loaded.partner)
    return report_figures(report)


def report_figures(report: dict[str, Any]) -> dict[str, Any]:
    """An export report's figures, flat: each stage's time and peak RSS, the HTP's status and profile, and every
    step's agreement."""
    stages = report["stages"]
    htp = stages["htp"]["htp"]
    profile = htp["profile"] or {}
    return {
        "passed": report["passed"],
        "stages": {name: {"seconds": s["seconds"], "peak_rss_bytes": s["peak_rss_bytes"]} for name, s in stages.items()},
        "seconds": sum(s["seconds"] for s in stages.values()),
        "htp_status": htp["status"],
        "htp_compile_seconds": htp["compile_seconds"],
        "htp_run_seconds": htp["run_seconds"],
        "htp_child_peak_rss_bytes": htp["peak_rss_bytes"],
        "htp_ops": profile.get("htp_ops"),
        "htp_execute_cycles": profile.get("execute_cycles"),
        "htp_attention_cycles": profile.get("attention_matmul_softmax_cycles"),
        "htp_finalize_ms": profile.get("finalize_ms"),
        "context_binary_bytes": stages["htp"].get("context_binary_bytes"),
        "cpu_vs_htp_sqnr_db": stages["htp"].get("cpu_vs_htp_sqnr_db"),
        "fp32_vs_htp_sqnr_db": stages["htp"].get("fp32_vs_htp_sqnr_db"),
        "qdq_nodes": stages["encodings_and_qdq"]["qdq_nodes"],
        "float_relative_error": stages["float_export"]["relative_error"],
        "sim_vs_qdq_sqnr_db": stages["encodings_and_qdq"]["sim_vs_qdq_sqnr_db"],
        "fp32_vs_qdq_sqnr_db": stages["encodings_and_qdq"]["fp32_vs_qdq_sqnr_db"],
    }
