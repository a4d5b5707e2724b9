"""``pasd-verify export``: float ONNX -> AIMET encodings and QDQ graph -> HTP context binary, each step checked.

Every step is compared with the one before it on a held-out seeded input (torch fp32 vs float ONNX, AIMET sim vs QDQ
graph, QDQ graph on the CPU vs on the HTP; :mod:`pasd_verify.export.agreement` says when each agrees), and every
threshold is in the report. Checked besides: ``onnx.checker``, every encoding name in the graph and in its section,
no non-weight constant over 1 MB, and every node on the HTP (the session refuses CPU fallback). fp32 vs QDQ and fp32
vs HTP are reported as the quantization error the user ships, without a threshold. When the HTP disagrees, the
first bad diffusers block and the first bad op in it are localized and a reproducer written to ``divergences/``;
the outputs are still written (they are the evidence) and the report's ``passed`` is false.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from .. import __version__
from ..encodings import save_encodings
from ..errors import PasdVerifyError
from ..io import atomic_path, refuse_overwriting_inputs, staged_outputs, write_json
from ..kinds import ExportGraph, Sample, graph_of
from ..memory import peak_rss_bytes, trim_heap
from ..quant.calibration import calibration_samples, seeded_samples
from .frozen import adarounded_entries, frozen_changes, onnx_param_encodings
from .htp import DEFAULT_SOC_MODEL, run_on_htp
from .localize import localize
from .agreement import (FLOAT_TOLERANCE, HTP_SQNR_DB, QDQ_SQNR_DB, float_agrees, htp_agrees, qdq_agrees,
                        relative_error, sqnr_db, worst)
from .onnx_io import EXTERNAL_DATA_BYTES, export_float, large_constants, parameter_bytes, run_onnx
from .quantize import WEIGHT_GRANULARITY, check_encoding_names, export_quantized, quantization_sim, sim_outputs
from .rewrites import ONNX_REWRITES, REWRITES, apply_onnx_rewrites, apply_rewrites, unshare_initializers

logger = logging.getLogger(__name__)

# aimet-onnx takes these bit widths for weights and activations (16-bit weights and 4- or 8-bit activations have no
# HTP path worth proving here: Qualcomm's recipe is W8A16).
PARAM_BWS, ACT_BWS = (4, 8, 16), (8, 16)
OUTPUTS = ("model.onnx", "model.data", "model.encodings", "model.qdq.onnx", "model.qdq.data", "model_ctx.onnx",
           "model_ctx_qnn.bin", "report.json", "divergences")


def check_output_folder(out_dir: str | os.PathLike, inputs: list[str | os.PathLike | None]) -> None:
    """Refuse an output folder where an output would replace one of the inputs."""
    refuse_overwriting_inputs(out_dir, OUTPUTS, inputs)


def _numpy(feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in feeds.items()}


def save_check_outputs(path: str | os.PathLike, inputs: dict[str, np.ndarray], fp32: dict[str, np.ndarray],
                       qdq_cpu: dict[str, np.ndarray], htp: dict[str, np.ndarray] | None) -> None:
    """Write the check input and its outputs to ``path`` (``.npz``, atomically), keyed ``input/<name>``,
    ``fp32/<name>`` (torch, rewrites applied), ``qdq_cpu/<name>`` and, when the HTP ran, ``htp/<name>``."""
    steps = {"input": inputs, "fp32": fp32, "qdq_cpu": qdq_cpu, "htp": htp or {}}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **{f"{step}/{name}": array for step, arrays in steps.items() for name, array in arrays.items()})


class ExportError(PasdVerifyError):
    """An export option is out of range, or an export input does not fit the model."""


@dataclass(frozen=True)
class ExportConfig:
    """Every option of ``pasd-verify export``, one field per flag, checked when made (as
    :class:`pasd_verify.quant.adaround.AdaroundConfig` is for AdaRound).

    ``calibration`` is a folder of samples (:mod:`pasd_verify.quant.calibration`); without it, ``samples`` seeded
    ones at ``latent`` (default: the config's sample size). ``rewrites`` (:mod:`pasd_verify.export.rewrites`; all
    of them by default: each is exact or bounded, changes nothing in a graph without its pattern, and answers a
    graph the HTP is known to miscompute or quantization to ruin) are applied to the model in place before export;
    the float stage reports what each changed and how far the rewritten model is from the original. ``localize`` searches the first op the HTP gets wrong when it disagrees. ``param_encodings`` (what
    ``pasd-verify adaround`` wrote beside the rounded weights the model holds) freezes those layers' grids
    (:mod:`pasd_verify.export.frozen`). ``release_model`` frees the torch weights of the model and its partner
    (moved to the meta device) once the float graph is written: every later stage works from the ONNX files, and at
    SD1.5 size calibration needs that memory; the models are unusable afterwards. ``check_outputs`` names an
    ``.npz`` file that receives the held-out check input and what each step computed from it
    (:func:`save_check_outputs`): two exports of one model, MHA and SHA say, then compare output for output.
    """

    calibration: str | None = None
    samples: int = 4
    latent: tuple[int, int] | None = None
    weights: str = "per_channel"
    param_bw: int = 8
    act_bw: int = 16
    soc_model: str = DEFAULT_SOC_MODEL
    htp_threshold_db: float = HTP_SQNR_DB
    localize: bool = True
    rewrites: tuple[str, ...] = REWRITES
    param_encodings: str | None = None
    seed: int = 0
    release_model: bool = False
    check_outputs: str | None = None

    def __post_init__(self):
        # sequences as given on a command line or in code become tuples: the config is frozen all the way down
        object.__setattr__(self, "rewrites", tuple(self.rewrites))
        if self.latent is not None:
            object.__setattr__(self, "latent", tuple(self.latent))
        for name in ("calibration", "param_encodings", "check_outputs"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        if self.calibration is None and self.samples < 1:
            raise ExportError(f"samples must be at least 1, got {self.samples}")
        if self.latent is not None and (len(self.latent) != 2 or min(self.latent) < 1):
            raise ExportError(f"latent must be two positive sizes (H W), got {self.latent}")
        if self.weights not in WEIGHT_GRANULARITY:
            raise ExportError(f"weights must be one of {WEIGHT_GRANULARITY}, got {self.weights!r}")
        if self.param_bw not in PARAM_BWS:
            raise ExportError(f"param_bw must be one of {PARAM_BWS}, got {self.param_bw}")
        if self.act_bw not in ACT_BWS:
            raise ExportError(f"act_bw must be one of {ACT_BWS}, got {self.act_bw}")
        if not (self.soc_model.isascii() and self.soc_model.isdigit() and int(self.soc_model) > 0):
            raise ExportError(f"soc_model must be a positive QNN SoC model number (e.g. {DEFAULT_SOC_MODEL}), "
                              f"got {self.soc_model!r}")
        if not math.isfinite(self.htp_threshold_db):
            raise ExportError(f"htp_threshold_db must be a finite number of dB, got {self.htp_threshold_db}")
        unknown = [r for r in self.rewrites if r not in REWRITES]
        if unknown:
            raise ExportError(f"rewrites: {unknown[0]!r} is not one of {sorted(REWRITES)}")


# --- the stages: each takes what it needs and returns what the next needs, with its numbers ------------------

@dataclass
class StageResult:
    """A stage's numbers for the report and, for a stage that is judged, whether they pass (None: it could not be
    judged here, e.g. no HTP backend on this machine)."""

    numbers: dict[str, Any]
    passed: bool | None = None
    seconds: float = 0.0
    judged: bool = True

    def as_dict(self) -> dict[str, Any]:
        """The report's entry; the peak RSS is the process's so far, read when the stage is recorded."""
        verdict = {"passed": self.passed} if self.judged else {}
        return {"seconds": self.seconds, "peak_rss_bytes": peak_rss_bytes(), **self.numbers, **verdict}


@dataclass
class FloatExport:
    path: Path
    reference: dict[str, np.ndarray]  # torch fp32 (rewrites applied) on the check input
    result: StageResult


@dataclass
class Quantized:
    paths: dict[str, Path]
    qdq_out: dict[str, np.ndarray]  # the QDQ graph on onnxruntime's CPU, on the check input
    result: StageResult


@dataclass
class OnHtp:
    result: StageResult
    outputs: dict[str, np.ndarray] | None = field(default=None, repr=False)


def float_export(graph: ExportGraph, check_feeds: dict[str, torch.Tensor], check_arrays: dict[str, np.ndarray],
                 folder: Path, config: ExportConfig, *, large: bool) -> FloatExport:
    """Apply the rewrites, write ``model.onnx`` into ``folder`` and compare onnxruntime with torch on the check input
    (``check_feeds``, and the same as ``check_arrays`` for onnxruntime)."""
    started = time.perf_counter()
    reference = _numpy(graph(check_feeds))
    rewritten: dict[str, Any] = {}
    if config.rewrites:
        original = reference
        rewritten["rewrites"] = apply_rewrites(graph.module, config.rewrites)
        reference = _numpy(graph(check_feeds))
        rewritten["rewrite_relative_error"] = max(relative_error(original[k], reference[k]) for k in original)
    float_path = export_float(graph, check_feeds, folder / "model.onnx", large=large)
    # the graph alone: neither step below changes a weight, so model.data stays as written (saving the weights
    # again would append a second copy of them to it, 4.4 GB at SD1.5 size)
    float_model = onnx.load(str(float_path), load_external_data=False)
    if set(config.rewrites) & set(ONNX_REWRITES):
        rewritten["rewrites"].update(apply_onnx_rewrites(float_model, config.rewrites, base_dir=float_path.parent))
    rewritten["shared_initializers_duplicated"] = unshare_initializers(float_model)
    onnx.save_model(float_model, str(float_path))
    del float_model
    onnx_out = run_onnx(float_path, check_arrays)
    errors = {k: relative_error(reference[k], onnx_out[k]) for k in graph.output_names}
    result = StageResult({"relative_error": max(errors.values()), "per_output": errors, **rewritten},
                         passed=float_agrees([*errors.values(), rewritten.get("rewrite_relative_error", 0.0)]),
                         seconds=time.perf_counter() - started)
    return FloatExport(float_path, reference, result)


def calibrate(float_path: Path, calibration_feeds: list[dict[str, np.ndarray]], config: ExportConfig, workdir: Path,
              frozen_path: Path | None = None) -> tuple[Any, StageResult]:
    """aimet-onnx's W{param_bw}A{act_bw} simulation of the float graph, calibrated on ``calibration_feeds``."""
    started = time.perf_counter()
    workdir.mkdir()
    sim = quantization_sim(float_path, calibration_feeds, param_bw=config.param_bw, act_bw=config.act_bw,
                           weights=config.weights, workdir=workdir, frozen_param_encodings=frozen_path)
    return sim, StageResult({"samples": len(calibration_feeds)}, seconds=time.perf_counter() - started, judged=False)


def encodings_and_qdq(sim, folder: Path, graph: ExportGraph, check_arrays: dict[str, np.ndarray],
                      reference: dict[str, np.ndarray], *, large: bool, frozen: dict | None = None) -> Quantized:
    """``model.encodings`` and ``model.qdq.onnx`` from the sim; the QDQ graph on the CPU against the sim, every
    encoding against the graph, and (with AdaRounded grids) every frozen grid kept. ``sim`` is consumed."""
    started = time.perf_counter()
    sim_out = sim_outputs(sim, check_arrays, graph.output_names)
    paths = export_quantized(sim, folder, large=large)
    # aimet-onnx's sim lives in reference cycles: without the collection trim_heap starts with, its graph and
    # weights (8.8 GB at SD1.5 size) stay until the end of the command, beside the QDQ CPU run and the HTP child
    del sim
    trim_heap()
    qdq_out = run_onnx(paths["qdq"], check_arrays)
    encodings = json.loads(paths["encodings"].read_text())
    graph_model = onnx.load(str(paths["model"]), load_external_data=False)
    onnx.checker.check_model(str(paths["model"]))
    onnx.checker.check_model(str(paths["qdq"]))
    parameters = {e["name"] for e in encodings["param_encodings"]}
    sim_qdq = {k: sqnr_db(sim_out[k], qdq_out[k]) for k in graph.output_names}
    problems = check_encoding_names(encodings, graph_model) + [
        f"constant {name!r} of {size} bytes is not a weight" for name, size in large_constants(graph_model, parameters)]
    if frozen is not None:
        problems += frozen_changes(frozen, encodings)
    numbers = {"sim_vs_qdq_sqnr_db": min(sim_qdq.values()),
               "fp32_vs_qdq_sqnr_db": min(sqnr_db(reference[k], qdq_out[k]) for k in graph.output_names),
               "param_encodings": len(encodings["param_encodings"]),
               "activation_encodings": len(encodings["activation_encodings"]),
               "qdq_nodes": len(onnx.load(str(paths["qdq"]), load_external_data=False).graph.node),
               "problems": problems}
    result = StageResult(numbers, passed=qdq_agrees(min(sim_qdq.values())) and not problems,
                         seconds=time.perf_counter() - started)
    return Quantized(paths, qdq_out, result)


def on_htp(qdq_path: Path, check_arrays: dict[str, np.ndarray], quantized: Quantized,
           reference: dict[str, np.ndarray], output_names: list[str], folder: Path, config: ExportConfig) -> OnHtp:
    """Compile the QDQ graph for the HTP (context binary into ``folder``), run it on the check input in a child, and
    compare with the CPU; on a disagreement, localize its first bad op when ``config.localize``."""
    started = time.perf_counter()
    htp = run_on_htp(qdq_path, check_arrays, soc_model=config.soc_model, context_path=folder / "model_ctx.onnx",
                     profile=True)
    numbers: dict[str, Any] = {"htp": htp.as_dict()}
    passed: bool | None = None if htp.status == "skipped" else False
    if htp.status == "passed":
        cpu_htp = {k: sqnr_db(quantized.qdq_out[k], htp.outputs[k]) for k in output_names}
        numbers.update(cpu_vs_htp_sqnr_db=min(cpu_htp.values()), per_output=cpu_htp,
                       fp32_vs_htp_sqnr_db=min(sqnr_db(reference[k], htp.outputs[k]) for k in output_names),
                       all_nodes_on_htp=True, context_binary_bytes=(folder / "model_ctx_qnn.bin").stat().st_size)
        passed = htp_agrees(numbers["cpu_vs_htp_sqnr_db"], config.htp_threshold_db)
    if passed is False and config.localize:
        numbers["divergence"] = localize_divergence(qdq_path, check_arrays, numbers, output_names, folder, config,
                                                    (htp.compile_seconds or 0.0) + (htp.run_seconds or 0.0))
    return OnHtp(StageResult(numbers, passed, time.perf_counter() - started),
                 htp.outputs if htp.status == "passed" else None)


def localize_divergence(qdq_path: Path, check_arrays: dict[str, np.ndarray], numbers: dict[str, Any],
                        output_names: list[str], folder: Path, config: ExportConfig,
                        whole_seconds: float) -> dict[str, Any] | str:
    """The first diffusers block and op the HTP gets wrong, on the worst output; reproducer in ``folder``."""
    per_output = numbers.get("per_output")
    output = worst(per_output) if per_output else output_names[0]
    # a prefix compiles and runs in less time than the whole graph; a probe far beyond that has hung
    found = localize(qdq_path, check_arrays, folder, output=output, threshold_db=config.htp_threshold_db,
                     soc_model=config.soc_model, timeout=max(60.0, 5 * whole_seconds), log=logger.info)
    return found.as_dict() if found else (
        f"the prefix ending at {output} agrees alone; the disagreement needs the rest of the graph")


def export_files(model: nn.Module, out_dir: str | os.PathLike, config: ExportConfig = ExportConfig(), *,
                 partner: nn.Module | None = None, source: dict[str, Any] | None = None,
                 samples: list[Sample] | None = None) -> dict[str, Any]:
    """Export ``model`` (any kind of :mod:`pasd_verify.kinds`, in the form it is in; a kind with a partner needs it)
    into ``out_dir``, every stage checked against the one before it; all outputs or none. Returns the report that is
    also written as ``report.json``. ``samples`` calibrates on samples a caller computed itself (the pipeline's own
    run: :mod:`pasd_verify.pipeline.exports`) instead of ``config``'s; they are not range-checked as a user's
    folder is (a random-weight model's latents have any spread)."""
    # checked before anything is exported: a wrong file fails in seconds, not after the float export
    adarounded = (adarounded_entries(config.param_encodings, model) if config.param_encodings is not None else None)
    data = samples or calibration_samples(model, folder=config.calibration, count=config.samples,
                                          latent=config.latent, seed=config.seed, partner=partner)
    graph = graph_of(model)
    shape = graph.kind.sample_size(data[0])  # the latent size the samples are at; None for the text encoder
    # the check input is held out from calibration: agreement on data the encodings were not fitted to
    check = seeded_samples(model, 1, latent=shape, seed=config.seed + 7919)[0]
    check_feeds = graph.feeds(check, partner)
    check_arrays = _numpy(check_feeds)  # what every onnxruntime and HTP run of the check input takes
    calibration_feeds = [_numpy(graph.feeds(s, partner)) for s in data]
    large = parameter_bytes(model) > EXTERNAL_DATA_BYTES
    report: dict[str, Any] = {
        "tool": "pasd-verify", "version": __version__, "command": "export", "source": source or {},
        "graph": {"kind": graph.kind.name, "inputs": graph.input_names, "outputs": graph.output_names,
                  **graph.kind.report_notes(shape)},
        "config": {**asdict(config), "rewrites": list(config.rewrites),
                   "calibration": (f"{len(data)} samples given by the caller" if samples else
                                   config.calibration or f"{len(data)} seeded samples")},
        "thresholds": {"float_relative_error": FLOAT_TOLERANCE, "sim_vs_qdq_sqnr_db": QDQ_SQNR_DB,
                       "cpu_vs_htp_sqnr_db": config.htp_threshold_db},
    }
    stages: dict[str, dict[str, Any]] = {}

    def record(name: str, result: StageResult) -> None:
        stages[name] = result.as_dict()
        logger.info("%s: %s", name, ", ".join(f"{k}={v}" for k, v in stages[name].items()
                                              if not isinstance(v, (dict, list))))

    with staged_outputs(out_dir, OUTPUTS) as staging:
        floated = float_export(graph, check_feeds, check_arrays, staging, config, large=large)
        record("float_export", floated.result)
        frozen, frozen_path = None, None
        if adarounded is not None:  # found by content in the graph, so before the weights are released
            frozen = onnx_param_encodings(adarounded, model, floated.path, str(config.param_encodings))
            frozen_path = staging / "adarounded_param.encodings"
            save_encodings(frozen, frozen_path)
        if config.release_model:
            for torch_model in (model, partner):
                if torch_model is not None:
                    torch_model.to("meta")
            trim_heap()
        sim, calibrated = calibrate(floated.path, calibration_feeds, config, staging / "aimet", frozen_path)
        if frozen is not None:
            calibrated.numbers.update(adarounded_parameters=len(adarounded),
                                      frozen_param_encodings=len(frozen["param_encodings"]))
        record("calibration", calibrated)
        quantized = encodings_and_qdq(sim, staging, graph, check_arrays, floated.reference, large=large,
                                      frozen=frozen)
        del sim
        record("encodings_and_qdq", quantized.result)
        htp = on_htp(quantized.paths["qdq"], check_arrays, quantized, floated.reference, graph.output_names,
                     staging, config)
        record("htp", htp.result)
        if config.check_outputs is not None:
            save_check_outputs(config.check_outputs, check_arrays, floated.reference, quantized.qdq_out, htp.outputs)
        verdicts = [s["passed"] for s in stages.values() if "passed" in s]
        report["stages"] = stages
        report["passed"] = all(v is not False for v in verdicts)
        report["htp_skipped"] = any(v is None for v in verdicts)
        report["outputs"] = sorted(name for name in OUTPUTS if (staging / name).exists()) + ["report.json"]
        write_json(staging / "report.json", report)
    return report
