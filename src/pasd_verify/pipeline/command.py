"""``pasd-verify pipeline``: the photo, the components (a preset, or an SD1.5 folder and a PASD folder), the noise,
then :func:`~.check.check_pipeline`; the pictures, ``comparison.png``, ``steps.png``, the noise used, the step jobs
and ``report.json`` written all together or not at all."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..io import refuse_overwriting_inputs, staged_outputs, write_json
from .check import RunSettings, Thresholds, build_pipeline, check_pipeline, run
from .networks import NETWORKS, Components, preset_components
from .pasd import (PROCESS_SIZE, PipelineInputError, StartNoise, pasd_prompt, preprocess, save_picture, to_pil,
                   to_tensor, wavelet_color_fix)

OUTPUTS = ("picture_fp32.png", "picture_candidate.png", "comparison.png", "steps.png", "noise.npz", "report.json",
           "steps", "exports", "localized", *(f"picture_{n}_alone.png" for n in NETWORKS),
           "pasd_fp32.png", "pasd_candidate.png", *(f"pasd_{n}_alone.png" for n in NETWORKS))
DEFAULT_PHOTO = "astronaut"  # skimage.data's


@dataclass(frozen=True)
class PipelineCheckConfig:
    """Every option of ``pasd-verify pipeline`` but where the models and the photo come from."""

    prompt: str = ""
    steps: int = 20
    guidance: float = 9.0
    conditioning_scale: float = 1.0
    upscale: int = 1
    process_size: int = PROCESS_SIZE
    start: str = "photo"
    seed: int = 0
    noise: str | None = None
    backends: tuple[tuple[str, str], ...] = ()
    export_dir: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self):
        if self.steps < 1:
            raise PipelineInputError(f"--steps must be at least 1, got {self.steps}")
        if self.upscale < 1:
            raise PipelineInputError(f"--upscale must be a whole factor of at least 1, got {self.upscale}")
        if self.process_size < 8 or self.process_size % 8:
            raise PipelineInputError(f"--process-size must be a positive multiple of 8, got {self.process_size}")
        for name in ("guidance", "conditioning_scale"):
            if not np.isfinite(getattr(self, name)):
                raise PipelineInputError(f"--{name.replace('_', '-')} must be a finite number")


def load_photo(path: str | os.PathLike | None):
    """The photo at ``path`` (any format PIL reads), or scikit-image's bundled astronaut."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        from skimage import data

        return Image.fromarray(getattr(data, DEFAULT_PHOTO)()), f"skimage.data.{DEFAULT_PHOTO}"
    try:
        with Image.open(path) as photo:
            photo.load()
            return photo.convert("RGB"), str(path)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise PipelineInputError(f"{path}: not a readable image: {e}") from None


def load_components(sd_dir: str | os.PathLike, pasd_dir: str | os.PathLike) -> Components:
    """An SD1.5 folder in diffusers' layout (``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``) and a PASD
    folder (``unet/``, ``controlnet/``), each model loaded strictly from its local weights."""
    from transformers import CLIPTokenizer

    from ..kinds.loading import load_model

    sd, pasd = Path(sd_dir), Path(pasd_dir)
    for folder, parts in ((sd, ("text_encoder", "tokenizer", "vae", "scheduler")), (pasd, ("unet", "controlnet"))):
        missing = [p for p in parts if not (folder / p).is_dir()]
        if missing:
            raise PipelineInputError(f"{folder}: no {', '.join(f'{p}/' for p in missing)} folder")
    scheduler_file = sd / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(scheduler_file.read_text())
    except (OSError, ValueError) as e:
        raise PipelineInputError(f"{scheduler_file}: not a readable scheduler config: {e}") from None
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(sd / "tokenizer"), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise PipelineInputError(f"{sd / 'tokenizer'}: not a CLIP tokenizer folder: {e}") from None
    return Components(load_model(sd / "text_encoder"), tokenizer, load_model(sd / "vae"), load_model(pasd / "unet"),
                      load_model(pasd / "controlnet"), scheduler_config)


# --- the figures ----------------------------------------------------------------------------------------------

def _comparison_figure(photo, pictures: dict[str, torch.Tensor], reference: torch.Tensor, path: Path) -> None:
    """The photo, the fp32 picture, each other picture, and each one's difference from fp32 magnified 10x."""
    from matplotlib.figure import Figure

    others = [(name, p) for name, p in pictures.items() if name != "fp32"]
    figure = Figure(figsize=(3 * (2 + len(others)), 6.4), layout="constrained")
    axes = figure.subplots(2, 2 + len(others), squeeze=False)
    top = [("photo (working size)", np.asarray(photo)), ("fp32", to_pil(reference))]
    top += [(name, to_pil(p)) for name, p in others]
    for ax, (title, image) in zip(axes[0], top):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
    for j, (name, p) in enumerate(others, start=2):
        difference = (p - reference).abs()[0].mean(0).numpy()
        axes[1][j].imshow(np.clip(difference * 10, 0, 1), cmap="magma", vmin=0, vmax=1)
        axes[1][j].set_title(f"|{name} - fp32| x 10", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    figure.savefig(path, format="png", dpi=80)


def _steps_figure(report: dict[str, Any], path: Path) -> None:
    """Per step: the latent's SQNR (closed loop) and each network's teacher-forced noise SQNR; the guidance signal's
    SQNR and spread ratio, closed loop and teacher-forced."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    left, middle, right = figure.subplots(1, 3)
    loop = report["closed_loop"]
    steps = [s["step"] for s in loop]
    left.plot(steps, [s["latent_sqnr_db"] for s in loop], "k-o", label="latent, closed loop")
    middle.plot(steps, [s["guidance_sqnr_db"] for s in loop], "k-o", label="closed loop")
    right.plot(steps, [s["guidance_std_ratio"] for s in loop], "k-o", label="closed loop")
    for name, figures in report["networks"].items():
        forced = figures["teacher_forced"].get("steps")
        if forced:
            x = [s["step"] for s in forced]
            left.plot(x, [s["noise_sqnr_db"] for s in forced], "--", label=f"{name} noise, teacher-forced")
            middle.plot(x, [s["guidance_sqnr_db"] for s in forced], "--", label=f"{name}, teacher-forced")
            right.plot(x, [s["guidance_std_ratio"] for s in forced], "--", label=f"{name}, teacher-forced")
    thresholds = report["thresholds"]
    left.axhline(thresholds["network_sqnr_db"], color="r", lw=0.8)
    middle.axhline(thresholds["guidance_sqnr_db"], color="r", lw=0.8)
    for bound in thresholds["guidance_std_ratio"]:
        right.axhline(bound, color="r", lw=0.8)
    for ax, title in ((left, "SQNR against fp32 (dB)"), (middle, "guidance (cond - uncond) SQNR (dB)"),
                      (right, "guidance std / fp32's")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    figure.savefig(path, format="png", dpi=80)


def _save_as_pasd(picture: torch.Tensor, photo, size: tuple[int, int], path: Path) -> None:
    """The picture as PASD's ``test_pasd.py`` saves it: colour-fixed with the photo (wavelet), at ``size``."""
    from PIL import Image

    from ..io import atomic_path

    fixed = wavelet_color_fix(to_pil(picture), photo)
    if fixed.size != size:
        fixed = fixed.resize(size, Image.BICUBIC)
    with atomic_path(path) as tmp:
        fixed.save(tmp, format="PNG")


# --- the command ----------------------------------------------------------------------------------------------

def pipeline_files(out_dir: str | os.PathLike, config: PipelineCheckConfig, *, preset: str | None = None,
                   sd_dir: str | None = None, pasd_dir: str | None = None, image: str | None = None,
                   photo: tuple[Any, str] | None = None,
                   progress: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Check PASD's pipeline with ``config.backends`` against fp32 and write everything into ``out_dir``; returns
    the report (also ``report.json``). The photo is the file ``image``, or ``photo`` (a PIL image and where it came
    from), or scikit-image's astronaut."""
    say = progress or (lambda message: None)
    if (preset is None) == (sd_dir is None or pasd_dir is None) or (preset is not None and (sd_dir or pasd_dir)):
        raise PipelineInputError("give either --preset or both --sd-dir and --pasd-dir")
    refuse_overwriting_inputs(out_dir, OUTPUTS, [image, config.noise, sd_dir, pasd_dir, config.export_dir])
    from .networks import check_exports, parse_backends

    backends = parse_backends([f"{n}={b}" for n, b in config.backends])
    photo, photo_source = photo or load_photo(image)
    # test_pasd.py resizes its picture back to the upscaled photo's size when it had resized the photo up to
    # process_size (its resize_flag); otherwise it saves the working size
    upscaled = (photo.width * config.upscale, photo.height * config.upscale)
    photo = preprocess(photo, upscale=config.upscale, process_size=config.process_size)
    saved_size = upscaled if min(upscaled) < config.process_size else photo.size
    tensor = to_tensor(photo)
    say(f"photo {photo_source} at working size {photo.width} x {photo.height}")
    components = preset_components(preset) if preset else load_components(sd_dir, pasd_dir)
    shape = (1, components.unet.config.in_channels, photo.height // 8, photo.width // 8)
    check_exports(backends, config.export_dir, shape[2:], shape[1])
    noise = (StartNoise.load(config.noise, shape) if config.noise else
             StartNoise.draw(config.start, shape, torch.Generator().manual_seed(config.seed)))
    if config.noise and noise.start != config.start:
        say(f"the noise file holds a {noise.start!r} start: used as given")
    settings = RunSettings(prompt=pasd_prompt(config.prompt), steps=config.steps, guidance=config.guidance,
                           conditioning_scale=config.conditioning_scale)
    started = time.perf_counter()
    with staged_outputs(out_dir, OUTPUTS) as staging:
        export_dir = Path(config.export_dir) if config.export_dir else None
        exports, exports_seconds = {}, 0.0
        graph_networks = [n for n in NETWORKS if backends[n] in ("qdq", "htp")]
        if graph_networks and export_dir is None:
            from .exports import export_networks

            say("fp32 run for calibration")
            reference = run(build_pipeline(components, dict.fromkeys(NETWORKS, "fp32")), tensor, noise, settings)
            export_dir = staging / "exports"
            exports_started = time.perf_counter()
            reports = export_networks(graph_networks, components, reference, tensor,
                                      (settings.negative_prompt, settings.prompt), export_dir, seed=config.seed,
                                      progress=say)
            exports = {n: {"passed": r["passed"], "folder": f"exports/{n}"} for n, r in reports.items()}
            exports_seconds = time.perf_counter() - exports_started
        result = check_pipeline(components, tensor, noise, settings, backends, thresholds=config.thresholds,
                                export_dir=export_dir, jobs_dir=staging / "steps",
                                localize_dir=staging / "localized", progress=say)
        for figures in result.report["graph_sessions"].values():  # where the graph will be once the outputs land
            graph = Path(figures["graph"])
            if graph.is_relative_to(staging):
                figures["graph"] = str(Path(out_dir) / graph.relative_to(staging))
        report = {"tool": "pasd-verify", "version": __version__, "command": "pipeline",
                  "source": {"preset": preset, "sd_dir": sd_dir, "pasd_dir": pasd_dir, "photo": photo_source,
                             "export_dir": config.export_dir},
                  "config": {**asdict(config), "thresholds": None},
                  "working_size": [photo.width, photo.height], "start": noise.start, "exports": exports,
                  "exports_seconds": exports_seconds,
                  **result.report, "seconds": time.perf_counter() - started}
        pictures = {"fp32": result.reference.picture}
        if result.candidate is not None:
            pictures["candidate"] = result.candidate.picture
        pictures.update({f"{n}_alone": r.picture for n, r in result.attribution.items()})
        for name, picture in pictures.items():
            save_picture(picture, staging / f"picture_{name}.png")
            _save_as_pasd(picture, photo, saved_size, staging / f"pasd_{name}.png")
        noise.save(staging / "noise.npz")
        _comparison_figure(photo, pictures, result.reference.picture, staging / "comparison.png")
        _steps_figure(result.report, staging / "steps.png")
        report["outputs"] = sorted(p.name for p in staging.iterdir()) + ["report.json"]
        write_json(staging / "report.json", report)
    return report
