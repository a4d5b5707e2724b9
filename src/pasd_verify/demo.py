"""The main job on embedded default models: rewrite to SHA, prove it equivalent, rewrite the checkpoint, and
run the tiny PASD pair on a real photo.

Each stage measures numbers and passes or fails on a tolerance; :func:`run_demo` collects them into the
report that ``pasd-verify demo`` prints and writes to ``report.json``.
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import convert_checkpoint_file, load_state_dict_file, save_state_dict_file
from .io import write_json
from .logs import library_warnings
from .name_map import NameMap
from .models import pasd_forward
from .presets import build_pasd, build_unet, unet_inputs
from .ranges import check_control_image, latent_size, prepare_control_image
from .sha import SHAAttention, convert_to_mha, convert_to_sha

logger = logging.getLogger(__name__)

# max |SHA - MHA| over max |MHA|: fp32 summation order differs between the paths; fp64 should be exact to ulps.
FP32_TOLERANCE = 1e-5
FP64_TOLERANCE = 1e-12
# A short AdaRound: enough iterations for the optimisation to show, few enough for a demo.
ADAROUND_SAMPLES, ADAROUND_ITERATIONS = 4, 50
# The export stage: calibration samples, and the exact rewrites without which the HTP disagrees (README: export).
EXPORT_SAMPLES, EXPORT_REWRITES = 2, ("silu-as-division", "layernorm-identity-mul")


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """max |candidate - reference|, max |reference| and their ratio."""
    max_abs_error = (candidate - reference).abs().max().item()
    max_abs_output = reference.abs().max().item()
    return {
        "max_abs_error": max_abs_error,
        "max_abs_output": max_abs_output,
        "relative_error": max_abs_error / max_abs_output if max_abs_output else max_abs_error,
    }


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


class _Demo:
    """State shared by the stages: the reference MHA model, its SHA rewrite and the output folder."""

    def __init__(self, out_dir: Path, seed: int):
        self.out_dir = out_dir
        self.seed = seed
        self.mha = build_unet("tiny", seed=seed)
        self.sha = copy.deepcopy(self.mha)
        self.name_map: NameMap = NameMap()
        self.inputs = unet_inputs(self.mha, seed=seed)

    def sha_rewrite(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.name_map = convert_to_sha(self.sha)
        seconds = time.perf_counter() - start
        converted = sum(isinstance(m, SHAAttention) for m in self.sha.modules())
        left = sum(isinstance(m, Attention) for m in self.sha.modules())
        return {
            "passed": converted > 0 and left == 0,
            "attention_modules_converted": converted,
            "attention_modules_left_mha": left,
            "parameters_split": len(self.name_map),
            "seconds": seconds,
        }

    def equivalence_fp32(self) -> dict[str, Any]:
        numbers = relative_error(_forward(self.mha, self.inputs), _forward(self.sha, self.inputs))
        return {"passed": numbers["relative_error"] <= FP32_TOLERANCE, **numbers, "tolerance": FP32_TOLERANCE}

    def equivalence_fp64(self) -> dict[str, Any]:
        inputs = unet_inputs(self.mha, seed=self.seed, dtype=torch.float64)
        mha, sha = copy.deepcopy(self.mha).double(), copy.deepcopy(self.sha).double()
        numbers = relative_error(_forward(mha, inputs), _forward(sha, inputs))
        return {"passed": numbers["relative_error"] <= FP64_TOLERANCE, **numbers, "tolerance": FP64_TOLERANCE}

    def checkpoint(self) -> dict[str, Any]:
        mha_file = self.out_dir / "state_dict_mha.safetensors"
        sha_file = self.out_dir / "state_dict_sha.safetensors"
        back_file = self.out_dir / "state_dict_mha_roundtrip.safetensors"
        save_state_dict_file(self.mha.state_dict(), mha_file)
        counts = convert_checkpoint_file(mha_file, sha_file, self.name_map, to="sha")

        reloaded = copy.deepcopy(self.sha)
        for p in reloaded.parameters():  # so that only the file can make the outputs right
            nn.init.zeros_(p)
        reloaded.load_state_dict(load_state_dict_file(sha_file), strict=True)
        numbers = relative_error(_forward(self.mha, self.inputs), _forward(reloaded, self.inputs))

        convert_checkpoint_file(sha_file, back_file, self.name_map, to="mha")
        original, back = load_state_dict_file(mha_file), load_state_dict_file(back_file)
        identical = original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
        back_file.unlink()
        return {
            "passed": identical and numbers["relative_error"] <= FP32_TOLERANCE,
            **counts,
            "loads_strict": True,
            "roundtrip_bit_identical": identical,
            **numbers,
            "mha_bytes": mha_file.stat().st_size,
            "sha_bytes": sha_file.stat().st_size,
        }

    def pasd(self) -> dict[str, Any]:
        """The tiny PASD UNet + ControlNet on a real photo, MHA against SHA."""
        from skimage import data as skdata  # bundled photos, no download

        control = prepare_control_image(skdata.astronaut())  # 512x512 -> 768x768, PASD's minimum
        check_control_image(control)
        unet, controlnet = build_pasd("tiny", seed=self.seed)
        inputs = unet_inputs(unet, batch=1, latent=latent_size(*control.shape[-2:]), seed=self.seed)
        inputs["controlnet_cond"] = control
        sha_unet, sha_controlnet = copy.deepcopy(unet), copy.deepcopy(controlnet)
        converted = len(convert_to_sha(sha_unet)) + len(convert_to_sha(sha_controlnet))
        with torch.no_grad():
            reference, rgbs = pasd_forward(unet, controlnet, **inputs)
            candidate, _ = pasd_forward(sha_unet, sha_controlnet, **inputs)
        numbers = relative_error(reference, candidate)
        pixel_attentions = sum(len(block.pixel_attentions) for block in unet.up_blocks)
        return {
            "passed": numbers["relative_error"] <= FP32_TOLERANCE,
            "photo": "skimage.data.astronaut",
            "control_image": list(control.shape),
            "latent": list(inputs["sample"].shape),
            "rgb_outputs": [list(r.shape) for r in rgbs],
            "pixel_attentions": pixel_attentions,
            "parameters_split": converted,
            **numbers,
            "tolerance": FP32_TOLERANCE,
        }

    def encodings(self) -> dict[str, Any]:
        """AIMET calibrates the MHA model; its encodings are converted, validated, and compared with the
        encodings AIMET computes on the SHA model directly (per-channel weights must agree)."""
        from .encodings import (
            SCALE_RTOL,
            check_encodings,
            compare_encodings,
            load_encodings,
            mha_to_sha,
            required_sha_encodings,
            save_encodings,
        )
        from .kinds import graph_of
        from .quant import export_encodings, quantize

        dummy = tuple(unet_inputs(self.mha, batch=1, seed=self.seed).values())
        mha_file = export_encodings(quantize(graph_of(copy.deepcopy(self.mha)).module, dummy), dummy,
                                    self.out_dir / "parameters_mha.encodings")
        mha_encodings = load_encodings(mha_file)
        start = time.perf_counter()
        sha_encodings, report = mha_to_sha(mha_encodings, self.name_map, source=str(mha_file))
        seconds = time.perf_counter() - start
        sha_shapes = {n: tuple(p.shape) for n, p in self.sha.state_dict().items()}
        problems = check_encodings(sha_encodings, sha_shapes,
                                   required=required_sha_encodings(mha_encodings, self.name_map))
        save_encodings(sha_encodings, self.out_dir / "parameters_sha.encodings")

        aimet_file = export_encodings(quantize(graph_of(copy.deepcopy(self.sha)).module, dummy), dummy,
                                      self.out_dir / "parameters_sha_aimet.encodings")
        # Per-channel weight encodings depend only on each channel's weights, so AIMET's own SHA calibration
        # must give the same ones: the same names, scales to float tolerance, grids within one step.
        differences = compare_encodings(sha_encodings, load_encodings(aimet_file), sections=("param_encodings",),
                                        source="converted vs AIMET's SHA calibration")
        converted = {e["name"]: e for e in sha_encodings["param_encodings"]}
        direct = {e["name"]: e for e in load_encodings(aimet_file)["param_encodings"]}
        worst = max((abs(a - b) / abs(b) for k in direct if k in converted
                     for a, b in zip(converted[k]["scale"], direct[k]["scale"])), default=float("inf"))
        return {
            "passed": not problems and not differences,
            **report.as_dict(),
            "conversion_seconds": seconds,
            "problems": problems,
            "differences_from_aimet_sha": differences,
            "max_scale_relative_difference": worst,
            "tolerance": SCALE_RTOL,
        }

    def adaround(self) -> dict[str, Any]:
        """A short AdaRound (W4, per-channel) of the tiny SHA PASD UNet with the activation cache on disk: its
        reconstruction error against nearest rounding, and the memory it took."""
        from .quant.adaround import AdaroundConfig, adaround
        from .quant.calibration import model_calls, seeded_samples

        unet, controlnet = build_pasd("tiny", seed=self.seed)
        convert_to_sha(unet)
        samples = seeded_samples(unet, ADAROUND_SAMPLES, latent=(8, 8), seed=self.seed)
        config = AdaroundConfig(iterations=ADAROUND_ITERATIONS, cache_budget=0, seed=self.seed)
        result = adaround(unet, model_calls(unet, samples, partner=controlnet), config, progress=False)
        totals = result.summary()
        return {
            # AdaRound minimises the reconstruction error from the nearest-rounding start: summed over layers it
            # must end below it, or the optimisation is broken
            "passed": totals["mse_after_total"] < totals["mse_nearest_total"],
            "layers": totals["layers"],
            "samples": totals["samples"],
            "iterations_per_layer": ADAROUND_ITERATIONS,
            "mse_nearest_total": totals["mse_nearest_total"],
            "mse_adaround_total": totals["mse_after_total"],
            "reconstruction_gain": totals["mse_nearest_total"] / totals["mse_after_total"],
            "median_layer_gain": totals["median_gain_over_nearest"],
            "layers_improved": totals["layers_improved"],
            "peak_rss_bytes": totals["peak_rss_bytes"],
            "cache_bytes_on_disk_max": max(r.cache_bytes_on_disk for r in result.layers),
        }

    def export(self) -> dict[str, Any]:
        """The tiny SHA PASD ControlNet and UNet exported for the HTP with both exact rewrites: float ONNX, aimet-onnx
        W8A16 encodings and QDQ, context binary; each step's agreement with the one before it."""
        from .export.pipeline import export_files

        unet, controlnet = build_pasd("tiny", seed=self.seed)
        for model in (unet, controlnet):
            convert_to_sha(model)
        numbers: dict[str, Any] = {"passed": True}
        for name, model, partner in (("controlnet", controlnet, None), ("unet", unet, controlnet)):
            report = export_files(model, self.out_dir / f"export_{name}", partner=partner,
                                  samples=EXPORT_SAMPLES, latent=(8, 8), seed=self.seed, rewrites=EXPORT_REWRITES,
                                  localize_divergence=True, log=logger.info)
            stages = report["stages"]
            htp = stages["htp"]
            numbers["passed"] = numbers["passed"] and report["passed"]
            numbers[f"{name}_float_relative_error"] = stages["float_export"]["relative_error"]
            numbers[f"{name}_sim_vs_qdq_sqnr_db"] = stages["encodings_and_qdq"]["sim_vs_qdq_sqnr_db"]
            numbers[f"{name}_fp32_vs_qdq_sqnr_db"] = stages["encodings_and_qdq"]["fp32_vs_qdq_sqnr_db"]
            numbers[f"{name}_htp"] = htp["htp"]["status"]
            if htp["htp"]["status"] == "passed":
                numbers[f"{name}_cpu_vs_htp_sqnr_db"] = htp["cpu_vs_htp_sqnr_db"]
                numbers[f"{name}_fp32_vs_htp_sqnr_db"] = htp["fp32_vs_htp_sqnr_db"]
                numbers[f"{name}_htp_compile_seconds"] = htp["htp"]["compile_seconds"]
                numbers[f"{name}_context_binary_bytes"] = htp["context_binary_bytes"]
            if "divergence" in htp:  # reported as found, never hidden
                numbers[f"{name}_divergence"] = htp["divergence"]
        return numbers

    def undo(self) -> dict[str, Any]:
        restored = copy.deepcopy(self.sha)
        convert_to_mha(restored)
        original, back = self.mha.state_dict(), restored.state_dict()
        same_params = list(original) == list(back) and all(torch.equal(original[k], back[k]) for k in original)
        numbers = relative_error(_forward(self.mha, self.inputs), _forward(restored, self.inputs))
        return {"passed": same_params and numbers["max_abs_error"] == 0.0, "parameters_identical": same_params, **numbers}


def run_demo(out_dir: str | Path, *, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run every stage on the tiny seeded UNet; write ``out_dir/report.json`` and return the report.

    A stage that raises is recorded as failed with its error, and the stages after it still run where they can.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    demo = _Demo(out_dir, seed)
    stages: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("sha_rewrite", demo.sha_rewrite),
        ("equivalence_fp32", demo.equivalence_fp32),
        ("equivalence_fp64", demo.equivalence_fp64),
        ("checkpoint", demo.checkpoint),
        ("encodings", demo.encodings),
        ("undo", demo.undo),
        ("pasd", demo.pasd),
        ("adaround", demo.adaround),
        ("export", demo.export),
    ]
    results = []
    for name, stage in tqdm(stages, desc="pasd-verify demo", unit="stage", disable=not progress):
        start = time.perf_counter()
        with library_warnings(name, logger) as caught:
            try:
                numbers = stage()
                status = "passed" if numbers.pop("passed") else "failed"
            except Exception as e:  # a failing stage is reported, not fatal: the report says what broke
                numbers = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                status = "failed"
        results.append({"name": name, "status": status, "seconds_total": time.perf_counter() - start, **numbers,
                        "library_warnings": len(caught)})
    report = {
        "tool": "pasd-verify",
        "version": __version__,
        "model": "tiny UNet2DConditionModel (embedded preset), seed %d" % seed,
        "torch": torch.__version__,
        "passed": all(s["status"] == "passed" for s in results),
        "seconds": time.perf_counter() - started,
        "library_warnings_suppressed": sum(stage["library_warnings"] for stage in results),
        "stages": results,
    }
    write_json(out_dir / "report.json", report)
    return report
