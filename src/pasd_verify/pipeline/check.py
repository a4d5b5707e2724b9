"""The pipeline check: PASD's whole super-resolution with chosen networks on chosen backends, judged against the
fp32 run on the same photo, prompt and noise by what users see and what breaks it.

- the picture: PSNR and SSIM against the fp32 picture (scikit-image's metrics);
- the trajectory, closed loop: each step's latent against fp32's (SQNR);
- teacher-forced: each network alone on its backend, fed the fp32 run's own inputs (each denoising step's latent,
  the fp32 embeddings, the fp32 final latent), so a network's own error is told apart from error that grows along
  the trajectory; each denoising step is a job with its inputs on disk (``steps/step_NN.npz``);
- the guidance signal: the (conditional - unconditional) noise prediction against fp32's (SQNR, and the ratio of
  standard deviations: quantization that erases it leaves a picture that ignores the prompt, ai-hub-apps #155);
- attribution: the picture with one network at a time on its backend and the rest on fp32.

The check fails when the picture, the closed-loop guidance signal or any network's own (teacher-forced) figure
crosses its threshold; the report then names the first network and step whose teacher-forced figure crosses one
(networks in the order a run calls them, steps in order).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..export.agreement import sqnr_db
from .networks import NETWORKS, Components, GraphRunner, pipeline_components
from .verdicts import Thresholds, _np, closed_loop, closed_loop_checks, network_faults, picture_figures, step_figures
from .pasd import (CONDITIONING_SCALE, GUIDANCE, NEGATIVE_PROMPT, STEPS, PASDOutput, PASDPipeline, StartNoise,
                   Trace)


@dataclass(frozen=True)
class RunSettings:
    """One PASD run's settings (PASD's defaults)."""

    prompt: str
    negative_prompt: str = NEGATIVE_PROMPT
    steps: int = STEPS
    guidance: float = GUIDANCE
    conditioning_scale: float = CONDITIONING_SCALE


def build_pipeline(components: Components, backends: dict[str, str], *, export_dir: str | Path | None = None,
                   runners: dict[str, GraphRunner] | None = None, label: str | None = None) -> PASDPipeline:
    """A pipeline of ``components`` with each network on its backend and UniPC built from the components' scheduler
    config, as PASD builds it."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_config(components.scheduler_config)
    pipe = PASDPipeline(tokenizer=components.tokenizer, scheduler=scheduler,
                        **pipeline_components(backends, components, export_dir=export_dir, runners=runners))
    # with a label, diffusers' own progress bar over the steps (on stderr), gone when the run ends
    pipe.set_progress_bar_config(disable=label is None, desc=label, leave=False)
    return pipe


def run(pipe: PASDPipeline, image: torch.Tensor, noise: StartNoise, settings: RunSettings,
        on_step: Callable[[int, int], Any] | None = None) -> PASDOutput:
    return pipe(settings.prompt, image, negative_prompt=settings.negative_prompt, num_inference_steps=settings.steps,
                guidance_scale=settings.guidance, conditioning_scale=settings.conditioning_scale, noise=noise,
                on_step=on_step)


# --- teacher forcing: each network alone, on the fp32 run's inputs -------------------------------------------

def save_step_jobs(reference: PASDOutput, image: torch.Tensor, settings: RunSettings, folder: Path) -> list[Path]:
    """One file per denoising step with everything a teacher-forced step needs (and fp32's answer): the unit of
    work a later run can spread over machines."""
    folder.mkdir(parents=True, exist_ok=True)
    trace, paths = reference.trace, []
    for i, t in enumerate(trace.timesteps):
        path = folder / f"step_{i:02d}.npz"
        np.savez(path, step=i, timestep=t, model_input=_np(trace.model_inputs[i]), embeddings=_np(trace.embeddings),
                 image=_np(image), conditioning_scale=settings.conditioning_scale,
                 fp32_noise_uncond=_np(trace.noise_uncond[i]), fp32_noise_cond=_np(trace.noise_cond[i]))
        paths.append(path)
    return paths


def teacher_forced_step(job: Path, pipe: PASDPipeline) -> dict[str, float]:
    """Run one step job through ``pipe``'s ControlNet and UNet (one of them on a backend, the other fp32) and
    compare with fp32's noise predictions stored in the job."""
    with np.load(job) as f:
        arrays = {k: torch.from_numpy(np.asarray(f[k])) for k in f.files}
    t = arrays["timestep"].long()
    with torch.no_grad():
        uncond, cond = pipe.predict_noise(arrays["model_input"], t, arrays["embeddings"], arrays["image"],
                                          float(arrays["conditioning_scale"]))
    reference = Trace(timesteps=[int(t)], noise_uncond=[arrays["fp32_noise_uncond"]],
                      noise_cond=[arrays["fp32_noise_cond"]])
    candidate = Trace(timesteps=[int(t)], noise_uncond=[uncond], noise_cond=[cond])
    return {**step_figures(reference, candidate, 0), "step": int(arrays["step"])}


def teacher_forced(network: str, pipe: PASDPipeline, reference: PASDOutput, image: torch.Tensor,
                   settings: RunSettings, jobs: list[Path]) -> dict[str, Any]:
    """``network`` alone on its backend (``pipe`` holds it, the rest fp32), fed fp32's inputs."""
    with torch.no_grad():
        if network == "text_encoder":
            embeddings = pipe.encode_prompt(settings.prompt, settings.negative_prompt)
            return {"embeddings_sqnr_db": sqnr_db(_np(reference.trace.embeddings), _np(embeddings))}
        if network == "vae_encoder":
            if reference.noise.posterior is None:
                return {"unused": "a pure-noise start does not encode the photo"}
            encoded = pipe.encode_photo(image, reference.noise.posterior)
            start = pipe.prepare_latents(image, reference.noise, settings.steps)
            return {"encoded_latent_sqnr_db": sqnr_db(_np(reference.trace.encoded_latent), _np(encoded)),
                    "start_latent_sqnr_db": sqnr_db(_np(reference.trace.start_latent), _np(start))}
        if network == "vae_decoder":
            decoded = pipe.vae.decode(reference.latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            return picture_figures(reference.picture, (decoded / 2 + 0.5).clamp(0, 1))
    from tqdm.auto import tqdm

    bar = tqdm(jobs, desc=f"{network} teacher-forced", unit="step", leave=False,
               disable=pipe._progress_bar_config.get("disable", True))
    return {"steps": [teacher_forced_step(job, pipe) for job in bar]}


# --- handing the culprit to the export's localization -----------------------------------------------------------

def localize_culprit(culprit: dict[str, Any], pipe: PASDPipeline, runner: GraphRunner, reference: PASDOutput,
                     image: torch.Tensor, settings: RunSettings, jobs: list[Path], folder: Path) -> dict[str, Any]:
    """The culprit network's graph inputs at its first faulty step (captured from its teacher-forced call on fp32's
    inputs), run through its QDQ graph on the CPU and on the HTP: when they disagree the HTP miscomputes the graph,
    and the export's block and op localization (:func:`pasd_verify.export.localize.localize`) finds where, with a
    reproducer in ``folder/divergences``; when they agree the error is the quantization's own."""
    from ..export.agreement import HTP_SQNR_DB, htp_agrees, worst
    from ..export.htp import run_on_htp
    from ..export.localize import localize
    from ..export.onnx_io import run_onnx

    network, step = culprit["network"], culprit["step"]
    runner.captured = []
    try:
        if step is None:
            teacher_forced(network, pipe, reference, image, settings, [])
        else:
            teacher_forced_step(jobs[step], pipe)
    finally:
        captured, runner.captured = runner.captured, None
    feeds = captured[0]  # the first call: the unconditional half, or the one input a text or VAE call has
    graph = runner.path.parent / "model.qdq.onnx"
    cpu = run_onnx(graph, feeds)
    htp = run_on_htp(graph, feeds)
    found: dict[str, Any] = {"network": network, "step": step, "htp": htp.status}
    if htp.status != "passed":
        found["error"] = htp.error
    else:
        per_output = {name: sqnr_db(cpu[name], htp.outputs[name]) for name in cpu}
        found["cpu_vs_htp_sqnr_db"] = per_output
        if htp_agrees(per_output[worst(per_output)], HTP_SQNR_DB):
            found["verdict"] = ("the QDQ graph gives the same on the CPU: the error is the quantization's, not the "
                                "HTP's")
            return found
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{network}_inputs.npz", **feeds)
    per_output = found.get("cpu_vs_htp_sqnr_db")
    divergence = localize(graph, feeds, folder, output=worst(per_output) if per_output else runner.outputs[0],
                          threshold_db=HTP_SQNR_DB)
    found["verdict"] = "the HTP miscomputes the graph"
    found["divergence"] = divergence.as_dict() if divergence else None
    found["inputs"] = f"{network}_inputs.npz"
    return found


# --- the whole check ------------------------------------------------------------------------------------------

@dataclass
class CheckResult:
    report: dict[str, Any]
    reference: PASDOutput
    candidate: PASDOutput | None
    attribution: dict[str, PASDOutput] = field(default_factory=dict)


def _attempt(work: Callable[[], Any]) -> tuple[Any, str | None]:
    """``work()``, or the reason a graph backend could not run it (an HTP child's death is a result, not a crash of
    the check)."""
    from ..export.htp import HtpSessionError
    from .networks import BackendError

    try:
        return work(), None
    except (HtpSessionError, BackendError) as e:
        return None, str(e)


def check_pipeline(components: Components, image: torch.Tensor, noise: StartNoise, settings: RunSettings,
                   backends: dict[str, str], *, thresholds: Thresholds = Thresholds(),
                   export_dir: str | Path | None = None, jobs_dir: Path, localize_dir: Path | None = None,
                   progress: Callable[[str], Any] | None = None) -> CheckResult:
    """The fp32 run, the run with ``backends``, each chosen network alone (attribution and teacher forcing), every
    figure against ``thresholds``. ``export_dir`` holds one export folder per network on a graph backend. With
    ``localize_dir``, a culprit on the HTP is handed to the export's localization (:func:`localize_culprit`)."""
    say = progress or (lambda message: None)

    def label(run_name: str) -> str | None:
        return run_name if progress else None

    chosen = [n for n in NETWORKS if backends[n] != "fp32"]
    runners: dict[str, GraphRunner] = {}
    try:
        say("fp32 reference run")
        reference = run(build_pipeline(components, dict.fromkeys(NETWORKS, "fp32"), label=label("fp32")), image,
                        noise, settings)
        jobs = save_step_jobs(reference, image, settings, jobs_dir)
        say(f"candidate run ({', '.join(f'{n}={backends[n]}' for n in chosen) or 'all fp32'})")
        candidate, candidate_error = _attempt(lambda: run(
            build_pipeline(components, backends, export_dir=export_dir, runners=runners, label=label("candidate")),
            image, noise, settings))
        attribution, networks = {}, {}
        for network in chosen:
            alone = {**dict.fromkeys(NETWORKS, "fp32"), network: backends[network]}
            say(f"{network} alone on {backends[network]}: teacher-forced")
            pipe, error = _attempt(lambda: build_pipeline(components, alone, export_dir=export_dir, runners=runners,
                                                          label=label(f"{network} alone")))
            forced, error = (None, error) if error else _attempt(
                lambda: teacher_forced(network, pipe, reference, image, settings, jobs))
            whole = candidate
            if len(chosen) > 1 and not error:
                say(f"{network} alone on {backends[network]}: whole run")
                whole, error = _attempt(lambda: run(pipe, image, noise, settings))
                if whole is not None:
                    attribution[network] = whole
            networks[network] = {
                "backend": backends[network], "error": error, "teacher_forced": forced or {},
                "picture_alone": picture_figures(reference.picture, whole.picture) if whole is not None else None,
                "faults": (network_faults(network, forced, thresholds) if forced else
                           [{"network": network, "step": None, "figure": "error", "value": error, "threshold": None}])}
        faults = [f for n in chosen for f in networks[n]["faults"]]
        localized = None
        if faults and localize_dir is not None and backends[faults[0]["network"]] == "htp" \
                and networks[faults[0]["network"]]["error"] is None:
            culprit = faults[0]
            say(f"{culprit['network']}: handing its step-{culprit['step']} inputs to the export's localization")
            alone = {**dict.fromkeys(NETWORKS, "fp32"), culprit["network"]: "htp"}
            pipe = build_pipeline(components, alone, export_dir=export_dir, runners=runners)
            runner = runners[f"{culprit['network']}=htp"]
            localized, error = _attempt(lambda: localize_culprit(culprit, pipe, runner, reference, image, settings,
                                                                 jobs, localize_dir))
            localized = localized or {"network": culprit["network"], "error": error}
        elif faults and backends[faults[0]["network"]] == "qdq":
            # The export's localization finds where the HTP departs from the CPU on one QDQ graph; a QDQ graph run on
            # the CPU has no second device to depart from, so its error is the quantization's own
            localized = {"network": faults[0]["network"], "step": faults[0]["step"],
                         "verdict": "not localized: the network runs its QDQ graph on the CPU, so the error is the "
                                    "quantization's own (the export's localization compares the HTP with the CPU)"}
        sessions = {key: runner.figures() for key, runner in runners.items()}
    finally:
        for runner in runners.values():
            runner.close()
    if candidate is not None:
        picture, steps = picture_figures(reference.picture, candidate.picture), closed_loop(reference, candidate)
        checks = closed_loop_checks(picture, steps, thresholds)
    else:
        picture, steps, checks = None, [], {"candidate_ran": False}
    # a network whose own error crosses its threshold fails the check even where this photo's picture hides it
    checks["networks_teacher_forced"] = not faults
    report = {
        "passed": all(checks.values()),
        "checks": checks,
        "backends": backends,
        "thresholds": asdict(thresholds),
        "candidate_error": candidate_error,
        "picture": picture,
        "closed_loop": steps,
        "networks": networks,
        # the first network (in call order) and step whose own, teacher-forced error crosses a threshold; None when
        # the check fails with every network within its thresholds (error grown along the trajectory)
        "culprit": faults[0] if faults else None,
        "teacher_forced_faults": faults,
        "graph_sessions": sessions,
        "localized": localized,
    }
    return CheckResult(report, reference, candidate, attribution)
