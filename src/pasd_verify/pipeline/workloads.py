"""The pipeline workloads run in child processes (:func:`pasd_verify.memory.peak_rss_of`): ``pasd-verify pipeline``
on the tiny networks with every network on one backend, the pipeline's own exports included (the bench tier); and
the SD1.5-size teacher-forced check split into jobs, one child each, so that each job's time and peak RSS are its
own and each job reads its inputs from files (the fullsize tier)."""

from __future__ import annotations

import gc
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .command import PipelineCheckConfig, pipeline_files
from ..export.workloads import report_figures
from ..kinds import get_kind
from .networks import KIND_OF, NETWORKS


def _astronaut(size: int):
    """scikit-image's astronaut (the pipeline's default photo) at ``size`` x ``size``."""
    from PIL import Image

    from .command import load_photo

    return load_photo(None)[0].resize((size, size), Image.BICUBIC)


def pipeline_run(backend: str, steps: int = 1, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """The check of the tiny pipeline (scikit-image's astronaut at ``size`` x ``size``, ``steps`` steps) with all
    five networks on ``backend``; its time split into exports and the check's runs, and its figures."""
    photo = _astronaut(size)
    config = PipelineCheckConfig(prompt="a portrait of an astronaut", steps=steps, seed=seed, process_size=size,
                                 backends=(("all", backend),))
    with tempfile.TemporaryDirectory(prefix="pasd-verify-pipeline-bench-") as out:
        report = pipeline_files(Path(out) / "out", config, preset="tiny", photo=(photo, "skimage.data.astronaut"))
    return {"passed": report["passed"], "seconds": report["seconds"], "exports_seconds": report["exports_seconds"],
            "picture": report["picture"], "graph_sessions": {k: {"calls": v["calls"], "seconds": v["seconds"]}
                                                             for k, v in report["graph_sessions"].items()}}


# --- the SD1.5-size teacher-forced check, one job per child process (the fullsize tier) ---------------------------

FULLSIZE_PROMPT = "a portrait of an astronaut"
STEP_NETWORKS = ("controlnet", "unet")
OTHER_NETWORKS = ("text_encoder", "vae_encoder", "vae_decoder")


def fullsize_jobs(steps: int = 20, forced_steps: tuple[int, ...] = (0, -1)) -> list[str]:
    """The jobs of the SD1.5-size check, in the order they must run: the fp32 run (which writes each step's job
    file), each network's export calibrated on it, each of the text encoder and VAE halves on the HTP fed fp32's
    inputs, and each of ``forced_steps`` (the first and the last by default) through the ControlNet, then the UNet,
    on the HTP with both guidance halves."""
    chosen = sorted({s % steps for s in forced_steps})
    return (["reference"] + [f"export:{n}" for n in NETWORKS] + [f"forced:{n}" for n in OTHER_NETWORKS]
            + [f"forced:{n}:{s}" for s in chosen for n in STEP_NETWORKS])


def _fullsize_run(preset: str, size: int, steps: int, seed: int):
    """The components, photo, noise and settings every job of one check shares (seeded: each child rebuilds the
    same ones)."""
    from .check import RunSettings
    from .networks import preset_components
    from .pasd import StartNoise, pasd_prompt, preprocess, to_tensor

    components = preset_components(preset, seed=seed)
    photo = preprocess(_astronaut(size), process_size=size)
    image = to_tensor(photo)
    shape = (1, components.unet.config.in_channels, size // 8, size // 8)
    noise = StartNoise.draw("photo", shape, torch.Generator().manual_seed(seed))
    return components, image, noise, RunSettings(prompt=pasd_prompt(FULLSIZE_PROMPT), steps=steps)


# the fp32 run's tensors the later jobs read (the exports' calibration, the text encoder and VAE's inputs and answers)
_TRACE_LISTS = ("model_inputs", "noise_uncond", "noise_cond", "latents_out")
_TRACE_TENSORS = ("embeddings", "encoded_latent", "start_latent")


def _save_reference(reference, path: Path) -> None:
    import numpy as np

    from ..io import atomic_path

    trace = reference.trace
    arrays = {"picture": reference.picture, "latents": reference.latents, "timesteps": torch.tensor(trace.timesteps),
              **{f"noise/{k}": v for k, v in reference.noise.tensors().items()},
              **{k: getattr(trace, k) for k in _TRACE_TENSORS},
              **{f"{k}/{i}": t for k in _TRACE_LISTS for i, t in enumerate(getattr(trace, k))}}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: v.numpy() for k, v in arrays.items()})


def _load_reference(path: Path):
    import numpy as np

    from .pasd import PASDOutput, StartNoise, Trace

    with np.load(path) as f:
        arrays = {k: torch.from_numpy(f[k]) for k in f.files}
    steps = len(arrays["timesteps"])
    trace = Trace(timesteps=[int(t) for t in arrays["timesteps"]], **{k: arrays[k] for k in _TRACE_TENSORS},
                  **{k: [arrays[f"{k}/{i}"] for i in range(steps)] for k in _TRACE_LISTS})
    noise = StartNoise(**{k.removeprefix("noise/"): v for k, v in arrays.items() if k.startswith("noise/")})
    return PASDOutput(picture=arrays["picture"], latents=arrays["latents"], noise=noise, trace=trace)


def fullsize_job(job: str, folder: str, preset: str = "sd15", size: int = 128, steps: int = 20,
                 seed: int = 0) -> dict[str, Any]:
    """Run one job of :func:`fullsize_jobs` in this process on the files of ``folder`` (each job reads only what the
    jobs before it wrote there: the fp32 run's tensors, the step files, the exports); return its figures and each
    graph session's calls, seconds and HTP child peak RSS."""
    import time

    from .check import build_pipeline, run, save_step_jobs, teacher_forced, teacher_forced_step
    from .exports import export_networks
    from .networks import GraphRunner

    if job not in fullsize_jobs(steps, forced_steps=tuple(range(steps))):
        raise ValueError(f"unknown job {job!r}: expected one of {fullsize_jobs(steps)} (or forced:controlnet:<step>, "
                         f"forced:unet:<step> of any step below {steps})")
    action, _, rest = job.partition(":")
    network, _, step = rest.partition(":")
    root = Path(folder)
    components, image, noise, settings = _fullsize_run(preset, size, steps, seed)
    figures: dict[str, Any] = {"job": job}
    if action == "reference":
        started = time.perf_counter()
        reference = run(build_pipeline(components, dict.fromkeys(NETWORKS, "fp32")), image, noise, settings)
        figures["fp32_run_seconds"] = time.perf_counter() - started
        save_step_jobs(reference, image, settings, root / "steps")
        _save_reference(reference, root / "reference.npz")
        return figures
    # a step job reads its step file alone; the others the fp32 run
    reference = None if step else _load_reference(root / "reference.npz")
    if action == "export":
        # only the network and the partner it is calibrated on (the registry's) stay in memory
        partner = get_kind(KIND_OF[network]).partner
        keep = {"vae" if n.startswith("vae") else n
                for n in (network, *(n for n, kind_name in KIND_OF.items() if kind_name == partner))}
        components = replace(components, **{n: None for n in ("text_encoder", "vae", "controlnet", "unet")
                                            if n not in keep})
        gc.collect()
        report = export_networks([network], components, reference, image,
                                 (settings.negative_prompt, settings.prompt), root / "exports", seed=seed,
                                 release_models=preset != "tiny")[network]
        return {**figures, **report_figures(report)}
    runners: dict[str, GraphRunner] = {}
    try:
        pipe = build_pipeline(components, {**dict.fromkeys(NETWORKS, "fp32"), network: "htp"},
                              export_dir=root / "exports", runners=runners)
        if step:
            figures.update(teacher_forced_step(root / "steps" / f"step_{int(step):02d}.npz", pipe))
        else:
            figures.update(teacher_forced(network, pipe, reference, image, settings, jobs=[]))
        figures["graph_sessions"] = {key: r.figures() for key, r in runners.items()}
    finally:
        for r in runners.values():
            r.close()
    return figures
