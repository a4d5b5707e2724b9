"""``pasd-verify pipeline``: the photo, the components (a preset, or an SD1.5 folder and a PASD folder), the noise,
then :func:`~.check.check_pipeline`; the pictures, ``comparison.png``, ``steps.png``, the noise used, the step jobs
and ``report.json`` written all together or not at all."""

from __future__ import annotations

import json
import os
import stat
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..errors import PasdVerifyError
from ..io import refuse_overwriting_inputs, staged_outputs, write_json
from .check import RunSettings, Thresholds, build_pipeline, check_pipeline, run
from .networks import NETWORKS, Components, preset_components
from .pasd import (PROCESS_SIZE, PipelineInputError, StartNoise, pasd_prompt, preprocess, save_picture, to_pil,
                   to_tensor, wavelet_color_fix, working_size)

OUTPUTS = ("picture_fp32.png", "picture_candidate.png", "comparison.png", "steps.png", "noise.npz", "report.json",
           "steps", "exports", "localized", *(f"picture_{n}_alone.png" for n in NETWORKS),
           "pasd_fp32.png", "pasd_candidate.png", *(f"pasd_{n}_alone.png" for n in NETWORKS))
DEFAULT_PHOTO = "astronaut"  # skimage.data's
# The largest working size (pixels) a run takes: PASD denoises at 768 on the short side, its demos upscale to about
# 1-2 megapixels, and the UNet's first attention holds (pixels / 64)^2 scores per head, 17 GB at 2048 x 2048 in SD1.5
MAX_WORKING_PIXELS = 2048 * 2048
# torch.Generator().manual_seed takes 64 bits; numpy's and Python's consumers of the seed take a signed 64-bit one
MAX_SEED = 2**63 - 1
# UniPC's own (scheduling_unipc_multistep.py); a config with another one fails only at the first step
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


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
        if self.process_size**2 > MAX_WORKING_PIXELS:
            raise PipelineInputError(f"--process-size {self.process_size} makes a working size of at least "
                                     f"{self.process_size}^2 pixels; a run takes at most {MAX_WORKING_PIXELS} "
                                     f"({int(MAX_WORKING_PIXELS**0.5)}^2)")
        if self.upscale**2 > MAX_WORKING_PIXELS:
            raise PipelineInputError(f"--upscale {self.upscale} makes a working size beyond the {MAX_WORKING_PIXELS} "
                                     "pixels a run takes, whatever the photo")
        if not 0 <= self.seed <= MAX_SEED:
            raise PipelineInputError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {self.seed}")
        try:
            self.prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that were not UTF-8 on the command line arrive as lone surrogates
            raise PipelineInputError(f"--prompt: not valid UTF-8 text (at character {e.start}: "
                                     f"{self.prompt[e.start:e.end].encode('utf-8', 'surrogateescape')!r}); give "
                                     "the prompt as UTF-8") from None
        for name in ("guidance", "conditioning_scale"):
            if not np.isfinite(getattr(self, name)):
                raise PipelineInputError(f"--{name.replace('_', '-')} must be a finite number")


def _regular_file(path: str | os.PathLike, what: str) -> None:
    """Refuse, before opening it, an input that is not a regular file: a FIFO with no writer blocks ``open`` for
    ever, a device reads without end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise PipelineInputError(f"{path}: not a readable {what}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "not a regular file")
        raise PipelineInputError(f"{path}: not a readable {what}: it is {kind}, not a regular file")


def _as_rgb(photo, path: str | os.PathLike):
    """``photo`` as 8-bit RGB without losing its range: PIL's own ``convert("RGB")`` clips 16-bit greyscale to 255
    (a white picture) and truncates float images; those are scaled here, and values with no image reading refused."""
    from PIL import Image

    if photo.mode.startswith("I;16") or photo.mode in ("I", "F"):
        values = np.asarray(photo, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            raise PipelineInputError(f"{path}: a {photo.mode} image with {int((~finite).sum())} NaN or Inf "
                                     f"pixel(s) of {values.size}; expected finite values")
        low, high = float(values.min()), float(values.max())
        if photo.mode == "F":
            full = 1.0  # a float image is in [0, 1], the convention of this package's float images
        else:
            full = 65535.0  # a 16-bit greyscale photo (PNG, TIFF); PIL may hold it as 32-bit "I"
        if low < 0 or high > full:
            raise PipelineInputError(f"{path}: a {photo.mode} image with values in [{low:g}, {high:g}]; expected "
                                     f"[0, {full:g}]")
        grey = np.round(values / full * 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return photo.convert("RGB")


def load_photo(path: str | os.PathLike | None, *, upscale: int = 1, process_size: int = PROCESS_SIZE):
    """The photo at ``path`` (any format PIL reads), or scikit-image's bundled astronaut. Its size is read from the
    header and refused, before any pixel is decoded, when its working size would pass :data:`MAX_WORKING_PIXELS`."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        from skimage import data

        return Image.fromarray(getattr(data, DEFAULT_PHOTO)()), f"skimage.data.{DEFAULT_PHOTO}"
    _regular_file(path, "image")
    try:
        with warnings.catch_warnings():
            # the size is judged below against this run's own limit, before decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as photo:
                width, height = photo.size
                work = working_size(width, height, upscale=upscale, process_size=process_size)
                if work[0] * work[1] > MAX_WORKING_PIXELS:
                    raise PipelineInputError(
                        f"{path}: a {width} x {height} photo makes a working size of {work[0]} x {work[1]} "
                        f"(upscale {upscale}, process size {process_size}); a run takes at most {MAX_WORKING_PIXELS} "
                        "pixels: crop or shrink the photo, or lower --upscale")
                photo.load()
                return _as_rgb(photo, path), str(path)
    except Image.DecompressionBombError as e:
        raise PipelineInputError(f"{path}: {e}; a run takes at most {MAX_WORKING_PIXELS} pixels") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise PipelineInputError(f"{path}: not a readable image: {e}") from None


def read_scheduler_config(path: Path, steps: int) -> dict:
    """The SD1.5 folder's scheduler config, checked as PASD's UniPC will use it: a JSON object whose class is a
    diffusers scheduler, whose ``prediction_type`` UniPC knows, and whose ``num_train_timesteps`` leaves room for
    ``steps`` steps (UniPC spaces the steps over the training timesteps)."""
    import diffusers

    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineInputError(f"{path}: not a readable scheduler config: {e}") from None
    if not isinstance(config, dict):
        raise PipelineInputError(f"{path}: not a scheduler config: expected a JSON object, found a "
                                 f"{type(config).__name__}")
    name = config.get("_class_name", "PNDMScheduler")
    if not (isinstance(name, str) and name.endswith("Scheduler") and hasattr(diffusers, name)):
        raise PipelineInputError(f"{path}: _class_name {name!r} is not a diffusers scheduler (SD1.5's is "
                                 "'PNDMScheduler'; PASD builds UniPC from its settings)")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise PipelineInputError(f"{path}: prediction_type {prediction!r} is not one of {PREDICTION_TYPES} "
                                 "(SD1.5's is 'epsilon')")
    trained = config.get("num_train_timesteps", 1000)
    if not isinstance(trained, int) or isinstance(trained, bool) or trained < 1:
        raise PipelineInputError(f"{path}: num_train_timesteps {trained!r} is not a positive whole number (SD1.5's "
                                 "is 1000)")
    check_steps(steps, trained, str(path))
    from diffusers import UniPCMultistepScheduler

    try:
        UniPCMultistepScheduler.from_config(config).set_timesteps(steps)
    except Exception as e:  # diffusers raises what its arithmetic meets: TypeError, NotImplementedError, ...
        raise PipelineInputError(f"{path}: UniPC cannot be built from this config: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0]}") from None
    return config


def check_steps(steps: int, trained: int, source: str) -> None:
    """UniPC spreads the steps over the training timesteps: more steps than those repeat timesteps, and the run's
    tensors grow with the count."""
    if steps > trained:
        raise PipelineInputError(f"--steps {steps}: the scheduler ({source}) was trained on {trained} timesteps; a "
                                 f"run takes at most {trained} steps")


def _load_network(folder: Path, expected: str, hint: str) -> Any:
    """The model in ``folder`` (strictly from its local weights), refused unless the registry calls it ``expected``:
    a UNet where the ControlNet belongs fails mid-run otherwise, naming neither."""
    from ..kinds import kind_of
    from ..kinds.loading import load_model

    try:
        model = load_model(folder)
    except PasdVerifyError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise PipelineInputError(f"{folder}: not a loadable model folder: {type(e).__name__}: {e}") from None
    try:
        found = kind_of(model).name
    except PasdVerifyError:
        found = type(model).__name__
    if found != expected:
        raise PipelineInputError(f"{folder}: holds a {found} ({type(model).__name__}), expected a {expected} "
                                 f"here{hint}")
    return model


def load_components(sd_dir: str | os.PathLike, pasd_dir: str | os.PathLike, *, steps: int = 1) -> Components:
    """An SD1.5 folder in diffusers' layout (``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``) and a PASD
    folder (``unet/``, ``controlnet/``), each model loaded strictly from its local weights, each checked to be the
    network its folder names, the tokenizer's ids within the text encoder's vocabulary and positions."""
    from transformers import CLIPTokenizer

    sd, pasd = Path(sd_dir), Path(pasd_dir)
    for folder, parts in ((sd, ("text_encoder", "tokenizer", "vae", "scheduler")), (pasd, ("unet", "controlnet"))):
        missing = [p for p in parts if not (folder / p).is_dir()]
        if missing:
            raise PipelineInputError(f"{folder}: no {', '.join(f'{p}/' for p in missing)} folder")
    scheduler_config = read_scheduler_config(sd / "scheduler" / "scheduler_config.json", steps)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(sd / "tokenizer"), local_files_only=True)
    except Exception as e:  # the tokenizers library raises a bare Exception ("Error while initializing BPE")
        raise PipelineInputError(f"{sd / 'tokenizer'}: not a CLIP tokenizer folder: {str(e).splitlines()[0]}") from None
    swapped = "; are unet/ and controlnet/ swapped?"
    text_encoder = _load_network(sd / "text_encoder", "text-encoder", "")
    vocab, positions = text_encoder.config.vocab_size, text_encoder.config.max_position_embeddings
    if len(tokenizer) > vocab:
        raise PipelineInputError(f"{sd / 'text_encoder' / 'config.json'}: vocab_size {vocab} is smaller than the "
                                 f"tokenizer's {len(tokenizer)} tokens ({sd / 'tokenizer'}): a tokenizer of another "
                                 "model?")
    if tokenizer.model_max_length > positions:
        raise PipelineInputError(f"{sd / 'text_encoder' / 'config.json'}: max_position_embeddings {positions} is "
                                 f"below the tokenizer's model_max_length {tokenizer.model_max_length}")
    vae = _load_network(sd / "vae", "AutoencoderKL", "")
    return Components(text_encoder, tokenizer, vae, _load_network(pasd / "unet", "pasd-unet", swapped),
                      _load_network(pasd / "controlnet", "pasd-controlnet", swapped), scheduler_config)


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

def refuse_non_finite_reference(reference: Any, config: PipelineCheckConfig) -> None:
    """The fp32 run is the yardstick: when its own latents or picture are not finite, the settings are beyond what
    fp32 holds (a --conditioning-scale of 1e38 overflows the ControlNet's residuals), and every comparison with it
    would blame the backends for the input."""
    trace = reference.trace
    for i, latent in enumerate(trace.latents_out):
        if not torch.isfinite(latent).all():
            raise PipelineInputError(
                f"the fp32 reference run's latent is NaN or Inf after step {i}: --guidance {config.guidance:g} and "
                f"--conditioning-scale {config.conditioning_scale:g} are beyond what float32 holds (PASD's are 9 "
                "and 1)")
    if not torch.isfinite(reference.picture).all() or not torch.isfinite(reference.latents).all():
        raise PipelineInputError("the fp32 reference run's picture is NaN or Inf: the settings are beyond what "
                                 "float32 holds")


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
    refuse_overwriting_inputs(out_dir, OUTPUTS, [image, config.noise, sd_dir, pasd_dir, config.export_dir],
                              command="pipeline")
    from .networks import check_exports, parse_backends

    backends = parse_backends([f"{n}={b}" for n, b in config.backends])
    if photo is not None and photo[0].width * photo[0].height * config.upscale**2 > MAX_WORKING_PIXELS:
        raise PipelineInputError(f"{photo[1]}: {photo[0].width} x {photo[0].height} at upscale {config.upscale} is "
                                 f"beyond the {MAX_WORKING_PIXELS} pixels a run takes")
    photo, photo_source = photo or load_photo(image, upscale=config.upscale, process_size=config.process_size)
    # test_pasd.py resizes its picture back to the upscaled photo's size when it had resized the photo up to
    # process_size (its resize_flag); otherwise it saves the working size
    upscaled = (photo.width * config.upscale, photo.height * config.upscale)
    photo = preprocess(photo, upscale=config.upscale, process_size=config.process_size)
    saved_size = upscaled if min(upscaled) < config.process_size else photo.size
    tensor = to_tensor(photo)
    say(f"photo {photo_source} at working size {photo.width} x {photo.height}")
    if preset:
        components = preset_components(preset)
        check_steps(config.steps, components.scheduler_config["num_train_timesteps"], f"the {preset} preset's")
    else:
        components = load_components(sd_dir, pasd_dir, steps=config.steps)
    shape = (1, components.unet.config.in_channels, photo.height // 8, photo.width // 8)
    check_exports(backends, config.export_dir, shape[2:], shape[1], components=components)
    noise = (StartNoise.load(config.noise, shape) if config.noise else
             StartNoise.draw(config.start, shape, torch.Generator().manual_seed(config.seed)))
    if config.noise and noise.start != config.start:
        say(f"the noise file holds a {noise.start!r} start: used as given")
    settings = RunSettings(prompt=pasd_prompt(config.prompt), steps=config.steps, guidance=config.guidance,
                           conditioning_scale=config.conditioning_scale)
    started = time.perf_counter()
    with staged_outputs(out_dir, OUTPUTS, command="pipeline") as staging:
        export_dir = Path(config.export_dir) if config.export_dir else None
        exports, exports_seconds = {}, 0.0
        graph_networks = [n for n in NETWORKS if backends[n] in ("qdq", "htp")]
        if graph_networks and export_dir is None:
            from .exports import export_networks

            say("fp32 run for calibration")
            reference = run(build_pipeline(components, dict.fromkeys(NETWORKS, "fp32")), tensor, noise, settings)
            refuse_non_finite_reference(reference, config)
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
        refuse_non_finite_reference(result.reference, config)
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
