"""The main job on embedded default models: rewrite to SHA, prove it equivalent, rewrite the checkpoint, and
run the tiny PASD pair on a real photo.

Each stage is a function of explicit inputs that measures numbers and passes or fails on a tolerance; what a
stage makes for later ones (the SHA model, its name map) exists only when that stage passed. A stage whose inputs
are missing because the stage making them failed is reported ``skipped`` with the reason, never run on stand-ins.
:func:`run_demo` collects the results into the report that ``pasd-verify demo`` prints and writes to
``report.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from diffusers.models.attention_processor import Attention
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import convert_checkpoint_file
from .checkpoint_files import load_state_dict_file, save_state_dict_file
from .errors import PasdVerifyError
from .io import raise_if_interrupted, refuse_overwriting_inputs, staged_outputs, write_json
from .logs import library_warnings
from .name_map import NameMap
from .models import pasd_forward
from .pipeline.networks import KIND_OF
from .kinds import graph_of, preset_model
from .presets import build_pasd, build_unet, unet_inputs
from .ranges import check_control_image, latent_size, prepare_control_image
from .sha import SHAAttention, convert_to_mha, convert_to_sha

logger = logging.getLogger(__name__)

# max |SHA - MHA| over max |MHA|: fp32 summation order differs between the paths; fp64 should be exact to ulps.
FP32_TOLERANCE = 1e-5
FP64_TOLERANCE = 1e-12
# A short AdaRound: enough iterations for the optimisation to show, few enough for a demo. It rounds three of the
# tiny UNet's five blocks, each holding SHA attention heads, up_blocks.0 PASD's pixel attention too: the highest-
# resolution up block (up_blocks.1) alone took three quarters of the whole model's time (its layers are the ones
# whose inputs need the most replaying), for the same law.
ADAROUND_SAMPLES, ADAROUND_ITERATIONS = 4, 50
ADAROUND_BLOCKS = ("down_blocks.0", "mid_block", "up_blocks.0")
PIPELINE_SIZE = 48  # pixels a side: the emulated HTP takes minutes per VAE call at PASD's 768, 7 s at 64
PIPELINE_STEPS = 2


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


# --- the stages: numbers, pass or fail, and what they make for later stages -----------------------------------

def sha_rewrite(mha: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of the MHA UNet rewritten to SHA: every attention converted, none left MHA."""
    sha = copy.deepcopy(mha)
    start = time.perf_counter()
    name_map = convert_to_sha(sha)
    seconds = time.perf_counter() - start
    converted = sum(isinstance(m, SHAAttention) for m in sha.modules())
    left = sum(isinstance(m, Attention) for m in sha.modules())
    numbers = {"passed": converted > 0 and left == 0, "attention_modules_converted": converted,
               "attention_modules_left_mha": left, "parameters_split": len(name_map), "seconds": seconds}
    return numbers, {"sha": sha, "name_map": name_map}


def equivalence_fp32(mha: nn.Module, sha: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    numbers = relative_error(_forward(mha, inputs), _forward(sha, inputs))
    return {"passed": numbers["relative_error"] <= FP32_TOLERANCE, **numbers, "tolerance": FP32_TOLERANCE}


def equivalence_fp64(mha: nn.Module, sha: nn.Module, seed: int) -> dict[str, Any]:
    inputs = unet_inputs(mha, seed=seed, dtype=torch.float64)
    numbers = relative_error(_forward(copy.deepcopy(mha).double(), inputs), _forward(copy.deepcopy(sha).double(), inputs))
    return {"passed": numbers["relative_error"] <= FP64_TOLERANCE, **numbers, "tolerance": FP64_TOLERANCE}


def checkpoint(mha: nn.Module, sha: nn.Module, name_map: NameMap, inputs: dict[str, torch.Tensor],
               out_dir: Path) -> dict[str, Any]:
    """The MHA checkpoint rewritten to SHA on disk, loaded strictly into a zeroed SHA model, and merged back."""
    mha_file = out_dir / "state_dict_mha.safetensors"
    sha_file = out_dir / "state_dict_sha.safetensors"
    back_file = out_dir / "state_dict_mha_roundtrip.safetensors"
    save_state_dict_file(mha.state_dict(), mha_file)
    counts = convert_checkpoint_file(mha_file, sha_file, name_map, to="sha")

    reloaded = copy.deepcopy(sha)
    for p in reloaded.parameters():  # so that only the file can make the outputs right
        nn.init.zeros_(p)
    reloaded.load_state_dict(load_state_dict_file(sha_file), strict=True)
    numbers = relative_error(_forward(mha, inputs), _forward(reloaded, inputs))

    convert_checkpoint_file(sha_file, back_file, name_map, to="mha")
    original, back = load_state_dict_file(mha_file), load_state_dict_file(back_file)
    identical = original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    back_file.unlink()
    return {"passed": identical and numbers["relative_error"] <= FP32_TOLERANCE, **counts, "loads_strict": True,
            "roundtrip_bit_identical": identical, **numbers, "mha_bytes": mha_file.stat().st_size,
            "sha_bytes": sha_file.stat().st_size}


def encodings(mha: nn.Module, sha: nn.Module, name_map: NameMap, seed: int, out_dir: Path) -> dict[str, Any]:
    """AIMET calibrates the MHA model; its encodings are converted, validated, and compared with the encodings
    AIMET computes on the SHA model directly (per-channel weights must agree)."""
    from .encodings import load_encodings, mha_to_sha, save_encodings
    from .encodings_check import SCALE_RTOL, check_encodings, compare_encodings, required_sha_encodings
    from .quant import export_encodings, quantize

    dummy = tuple(unet_inputs(mha, batch=1, seed=seed).values())
    mha_file = export_encodings(quantize(graph_of(copy.deepcopy(mha)).module, dummy), dummy,
                                out_dir / "parameters_mha.encodings")
    mha_encodings = load_encodings(mha_file)
    start = time.perf_counter()
    sha_encodings, report = mha_to_sha(mha_encodings, name_map, source=str(mha_file))
    seconds = time.perf_counter() - start
    sha_shapes = {n: tuple(p.shape) for n, p in sha.state_dict().items()}
    problems = check_encodings(sha_encodings, sha_shapes, required=required_sha_encodings(mha_encodings, name_map))
    save_encodings(sha_encodings, out_dir / "parameters_sha.encodings")

    aimet_file = export_encodings(quantize(graph_of(copy.deepcopy(sha)).module, dummy), dummy,
                                  out_dir / "parameters_sha_aimet.encodings")
    # Per-channel weight encodings depend only on each channel's weights, so AIMET's own SHA calibration
    # must give the same ones: the same names, scales to float tolerance, grids within one step.
    differences = compare_encodings(sha_encodings, load_encodings(aimet_file), sections=("param_encodings",),
                                    source="converted vs AIMET's SHA calibration")
    converted = {e["name"]: e for e in sha_encodings["param_encodings"]}
    direct = {e["name"]: e for e in load_encodings(aimet_file)["param_encodings"]}
    worst = max((abs(a - b) / abs(b) for k in direct if k in converted
                 for a, b in zip(converted[k]["scale"], direct[k]["scale"])), default=float("inf"))
    return {"passed": not problems and not differences, **report.as_dict(), "conversion_seconds": seconds,
            "problems": problems, "differences_from_aimet_sha": differences, "max_scale_relative_difference": worst,
            "tolerance": SCALE_RTOL}


def undo(mha: nn.Module, sha: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    restored = copy.deepcopy(sha)
    convert_to_mha(restored)
    original, back = mha.state_dict(), restored.state_dict()
    same_params = list(original) == list(back) and all(torch.equal(original[k], back[k]) for k in original)
    numbers = relative_error(_forward(mha, inputs), _forward(restored, inputs))
    return {"passed": same_params and numbers["max_abs_error"] == 0.0, "parameters_identical": same_params, **numbers}


def pasd(seed: int) -> dict[str, Any]:
    """The tiny PASD UNet + ControlNet on a real photo, MHA against SHA."""
    from skimage import data as skdata  # bundled photos, no download

    control = prepare_control_image(skdata.astronaut())  # 512x512 -> 768x768, PASD's minimum
    check_control_image(control)
    unet, controlnet = build_pasd("tiny", seed=seed)
    inputs = unet_inputs(unet, batch=1, latent=latent_size(*control.shape[-2:]), seed=seed)
    inputs["controlnet_cond"] = control
    sha_unet, sha_controlnet = copy.deepcopy(unet), copy.deepcopy(controlnet)
    converted = len(convert_to_sha(sha_unet)) + len(convert_to_sha(sha_controlnet))
    with torch.no_grad():
        reference, rgbs = pasd_forward(unet, controlnet, **inputs)
        candidate, _ = pasd_forward(sha_unet, sha_controlnet, **inputs)
    numbers = relative_error(reference, candidate)
    pixel_attentions = sum(len(block.pixel_attentions) for block in unet.up_blocks)
    # nothing converted would make the comparison vacuous: the same model twice
    return {"passed": converted > 0 and numbers["relative_error"] <= FP32_TOLERANCE,
            "photo": "skimage.data.astronaut", "control_image": list(control.shape),
            "latent": list(inputs["sample"].shape), "rgb_outputs": [list(r.shape) for r in rgbs],
            "pixel_attentions": pixel_attentions, "parameters_split": converted, **numbers,
            "tolerance": FP32_TOLERANCE}


def adaround(seed: int, out_dir: Path) -> dict[str, Any]:
    """``pasd-verify adaround`` on the tiny SHA PASD UNet: a short W4 per-channel run with the activation cache on
    disk, its reconstruction error against nearest rounding and the memory it took."""
    from .quant.adaround import AdaroundConfig
    from .quant.workflow import adaround_files

    loaded = preset_model("tiny", "pasd-unet", seed=seed, form="sha")
    config = AdaroundConfig(iterations=ADAROUND_ITERATIONS, cache_budget=0, seed=seed, only=ADAROUND_BLOCKS)
    report = adaround_files(loaded.model, out_dir / "adaround", config, partner=loaded.partner,
                            samples=ADAROUND_SAMPLES, latent=(8, 8), source=loaded.source, progress=False)
    totals = report["totals"]
    return {
        # AdaRound minimises the reconstruction error from the nearest-rounding start: summed over layers it
        # must end below it, or the optimisation is broken
        "passed": totals["mse_after_total"] < totals["mse_nearest_total"],
        "layers": totals["layers"], "blocks": list(ADAROUND_BLOCKS), "samples": totals["samples"],
        "iterations_per_layer": ADAROUND_ITERATIONS,
        "mse_nearest_total": totals["mse_nearest_total"], "mse_adaround_total": totals["mse_after_total"],
        "reconstruction_gain": totals["mse_nearest_total"] / totals["mse_after_total"],
        "median_layer_gain": totals["median_gain_over_nearest"], "layers_improved": totals["layers_improved"],
        "peak_rss_bytes": totals["peak_rss_bytes"],
        "cache_bytes_on_disk_max": max(layer["cache_bytes_on_disk"] for layer in report["layers"]),
    }


def export(out_dir: Path) -> dict[str, Any]:
    """The five tiny SHA networks of a PASD app (PASD ControlNet and UNet, CLIP text encoder, VAE encoder and decoder)
    as the pipeline stage exported them, through ``pasd-verify export``'s own steps with the default rewrites and
    calibrated on its fp32 run: float ONNX, aimet-onnx W8A16 encodings and QDQ, context binary; each step's agreement
    with the one before it, read from each export's ``report.json``. (The demo exported them a second time here, on
    seeded samples, for a third of its time and the same laws.)"""
    numbers: dict[str, Any] = {"passed": True}
    for name in KIND_OF:
        path = out_dir / "pipeline" / "exports" / name / "report.json"
        if not path.is_file():
            raise PasdVerifyError(f"{path}: the pipeline stage wrote no export of the {name}")
        report = json.loads(path.read_text())
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


def pipeline(seed: int, out_dir: Path) -> dict[str, Any]:
    """``pasd-verify pipeline`` on the tiny networks: PASD's whole super-resolution of a real photo (scikit-image's
    astronaut at 48 x 48: the emulated HTP's time grows with the pixels) for a few steps with every network on the
    HTP (exported by the pipeline itself, calibrated on the fp32 run), judged against the fp32 run."""
    from skimage import data as skdata

    from .export.htp import htp_available
    from .pipeline.command import PipelineCheckConfig, pipeline_files

    backend = "htp" if htp_available() is None else "qdq"  # where the HTP backend cannot load, its QDQ graph
    photo = Image.fromarray(skdata.astronaut()).resize((PIPELINE_SIZE, PIPELINE_SIZE), Image.BICUBIC)
    config = PipelineCheckConfig(prompt="a portrait of an astronaut", steps=PIPELINE_STEPS, seed=seed,
                                 process_size=PIPELINE_SIZE, backends=(("all", backend),))
    report = pipeline_files(out_dir / "pipeline", config, preset="tiny",
                            photo=(photo, f"skimage.data.astronaut at {PIPELINE_SIZE} x {PIPELINE_SIZE}"))
    loop = report["closed_loop"]
    return {"passed": report["passed"], "backend": backend, "steps": PIPELINE_STEPS,
            "picture_psnr_db": report["picture"]["psnr_db"] if report["picture"] else None,
            "picture_ssim": report["picture"]["ssim"] if report["picture"] else None,
            "guidance_std_ratio_min": min((s["guidance_std_ratio"] for s in loop), default=None),
            "guidance_sqnr_db_min": min((s["guidance_sqnr_db"] for s in loop), default=None),
            "final_latent_sqnr_db": loop[-1]["latent_sqnr_db"] if loop else None,
            **{f"{n}_alone_psnr_db": f["picture_alone"]["psnr_db"] for n, f in report["networks"].items()
               if f["picture_alone"]},
            "culprit": report["culprit"], "comparison": "pipeline/comparison.png"}


@dataclass(frozen=True)
class Stage:
    """A demo stage: ``run`` is called with the named ``needs`` (from the demo's inputs or earlier stages' products);
    a stage that ``makes`` products returns ``(numbers, products)``, and they exist only if it passed."""

    name: str
    run: Callable[..., Any]
    needs: tuple[str, ...]
    makes: tuple[str, ...] = ()


STAGES = (
    Stage("sha_rewrite", sha_rewrite, ("mha",), makes=("sha", "name_map")),
    Stage("equivalence_fp32", equivalence_fp32, ("mha", "sha", "inputs")),
    Stage("equivalence_fp64", equivalence_fp64, ("mha", "sha", "seed")),
    Stage("checkpoint", checkpoint, ("mha", "sha", "name_map", "inputs", "out_dir")),
    Stage("encodings", encodings, ("mha", "sha", "name_map", "seed", "out_dir")),
    Stage("undo", undo, ("mha", "sha", "inputs")),
    Stage("pasd", pasd, ("seed",)),
    Stage("adaround", adaround, ("seed", "out_dir")),
    Stage("pipeline", pipeline, ("seed", "out_dir")),
    Stage("export", export, ("out_dir",)),
)


def run_demo(out_dir: str | Path, *, seed: int = 0, progress: bool = True,
             stages: Sequence[Stage] = STAGES) -> dict[str, Any]:
    """Run ``stages`` (every stage by default) on the tiny seeded UNet; write ``out_dir/report.json`` and return
    the report.

    A stage that raises is recorded as failed with its error; a stage that needs what a failed stage would have made
    is recorded as skipped, naming it; the others still run.
    """
    # all or none, as every command: an interrupted demo leaves no half of a run in the folder
    refuse_overwriting_inputs(out_dir, OUTPUTS, [])
    with staged_outputs(out_dir, OUTPUTS) as staging:
        return _run_stages(staging, seed, progress, stages)


# Every name the stages write into the output folder: a rerun into the same folder replaces them as one set.
OUTPUTS = ("state_dict_mha.safetensors", "state_dict_sha.safetensors", "state_dict_mha_roundtrip.safetensors",
           "parameters_mha.encodings", "parameters_sha.encodings", "parameters_sha_aimet.encodings", "adaround",
           "pipeline", "report.json")


def _run_stages(out_dir: Path, seed: int, progress: bool, stages: Sequence[Stage]) -> dict[str, Any]:
    started = time.perf_counter()
    mha = build_unet("tiny", seed=seed)
    available: dict[str, Any] = {"mha": mha, "inputs": unet_inputs(mha, seed=seed), "seed": seed, "out_dir": out_dir}
    made_by = {product: stage.name for stage in stages for product in stage.makes}
    results = []
    for stage in tqdm(stages, desc="pasd-verify demo", unit="stage", disable=not progress):
        start = time.perf_counter()
        missing = [need for need in stage.needs if need not in available]
        caught: list = []
        if missing:
            failed = sorted({made_by.get(need, "the demo's set-up") for need in missing})
            numbers = {"reason": f"needs {', '.join(missing)} from {', '.join(failed)}, which did not pass"}
            status = "skipped"
        else:
            with library_warnings(stage.name, logger) as caught:
                try:
                    out = stage.run(**{need: available[need] for need in stage.needs})
                    numbers, products = out if stage.makes else (out, {})
                    status = "passed" if numbers.pop("passed") else "failed"
                    if status == "passed":
                        available.update(products)
                except Exception as e:  # a failing stage is reported, not fatal: the report says what broke
                    numbers = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                    status = "failed"
        raise_if_interrupted()  # a library may have turned the signal into the error this stage reported
        results.append({"name": stage.name, "status": status, "seconds_total": time.perf_counter() - start,
                        **numbers, "library_warnings": len(caught)})
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
