"""The ``pasd-verify`` command line: thin wrappers that print tables and set the exit status."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
import unicodedata
from pathlib import Path
from typing import Any, NoReturn

from .errors import PasdVerifyError
from .io import Interrupted, stop_requested
from .port import ARTIFACTS
from .signals import begin_work, interrupted_line, signals_as_interrupts

# The classes --model-class accepts, spelled here so that --help needs no torch import (a test checks they match
# pasd_verify.kinds.loading.MODEL_CLASSES).
MODEL_CLASS_NAMES = ("UNet2DConditionModel", "ControlNetModel", "PASDUNet2DConditionModel", "PASDControlNetModel",
                     "AutoencoderKL", "CLIPTextModel")

# The export rewrites --no-rewrite names, spelled here for the same reason (a test checks they match
# pasd_verify.export.rewrites.REWRITES).
REWRITE_NAMES = ("silu-as-division", "layernorm-identity-mul", "mask-floor")


class _KindNames:
    """The registry's kind names (pasd_verify.kinds.KINDS) as argparse choices, read when argparse first needs them
    (checking a --kind, or the adaround/export help): the registry imports every model class, which building the
    parser, ``demo`` and ``convert`` do not need."""

    def _names(self) -> tuple[str, ...]:
        from .kinds import KINDS

        return tuple(KINDS)

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


KIND_NAMES = _KindNames()
DEFAULT_KIND = "pasd-unet"

# Numbers worth a column in the stage table, in the order shown.
_SHOWN = ("relative_error", "max_abs_error", "max_scale_relative_difference", "tolerance",
          "attention_modules_converted", "parameters_split", "tensors_out", "param_encodings_split",
          "activation_encodings_copied", "roundtrip_bit_identical", "parameters_identical", "reconstruction_gain",
          "median_layer_gain", "layers_improved", "peak_rss_bytes", "controlnet_cpu_vs_htp_sqnr_db",
          "unet_cpu_vs_htp_sqnr_db", "unet_fp32_vs_htp_sqnr_db", "backend", "picture_psnr_db", "picture_ssim",
          "guidance_std_ratio_min", "final_latent_sqnr_db", "culprit")


def _format(value: Any, key: str = "") -> str:
    if key.endswith("_bytes"):
        return f"{value / 2**30:.2f}GiB"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def stage_table(stages: list[dict[str, Any]]) -> str:
    """A plain-text table: one row per stage, its status, time and key numbers."""
    rows = [("stage", "status", "seconds", "numbers")]
    for stage in stages:
        numbers = ", ".join(f"{k}={_format(stage[k], k)}" for k in _SHOWN if k in stage)
        if "error" in stage:
            numbers = stage["error"].splitlines()[0]
        elif "reason" in stage:
            numbers = stage["reason"]
        rows.append((stage["name"], stage["status"].upper(), f"{stage['seconds_total']:.2f}", numbers))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows
    )


# What the commands import lazily, loaded before the work (see signals.begin_work): diffusers' model classes pull in its
# schedulers and scipy; export's stages import onnx and aimet-onnx when they start.
_MODELS = ("diffusers:UNet2DConditionModel", "diffusers:ControlNetModel", "scipy.stats")
_EXPORT = ("onnx", "onnxruntime", "aimet_onnx.quantsim")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # torch and diffusers load here, not for --help

    begin_work(*_MODELS, *_EXPORT)

    report = run_demo(args.out, seed=args.seed)
    print(stage_table(report["stages"]))
    print(f"\n{'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.1f} s; report: {args.out}/report.json")
    if report["library_warnings_suppressed"] and not args.verbose:
        print(f"({report['library_warnings_suppressed']} warnings from torch, diffusers and AIMET went to the log; "
              "pasd-verify demo --verbose shows them)")
    return 0 if report["passed"] else 1


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_files

    begin_work(*_MODELS)

    summary = convert_files(args.model_config, args.state_dict, args.out, encodings=args.encodings,
                            encodings_version=args.encodings_version, model_class=args.model_class)
    outputs = summary.pop("outputs")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key.ljust(width)}  {value}")
    for path in outputs.values():
        print(f"wrote {path}")
    return 0


def _parse_bytes(text: str) -> int:
    """``8GiB``, ``512MiB``, ``1.5e9`` or a plain byte count."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    try:
        return int(float(lowered))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count (e.g. 8GiB, 512MiB, 1e9)") from None


def _decibels(text: str) -> float:
    """A threshold in dB: a finite number (named by its flag where it is refused, not by the check's field name)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of dB")
    return value


def _similarity(text: str) -> float:
    """An SSIM threshold: in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an SSIM in (0, 1]")
    return value


def _preset_latent(args: argparse.Namespace) -> None:
    """A preset's latent size where none is given: a ControlNet's config has no sample_size; the preset's UNet has."""
    if args.preset is not None and args.latent is None:
        from .presets import UNET_PRESETS

        if args.preset in UNET_PRESETS:
            args.latent = [UNET_PRESETS[args.preset]["sample_size"]] * 2


@contextlib.contextmanager
def _stage_lines(name: str):
    """Each stage's line on the terminal as it ends (the library logs it at INFO), unless logging shows it already."""
    progress = logging.getLogger(name)
    if progress.isEnabledFor(logging.INFO):
        yield
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = progress.level, progress.propagate
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    try:
        yield
    finally:
        progress.removeHandler(handler)
        progress.setLevel(level)
        progress.propagate = propagate


def _model_from_args(args: argparse.Namespace, outputs_check):
    """The model in ``--form``, its partner when its kind needs one, and where they came from
    (:class:`pasd_verify.kinds.LoadedModel`)."""
    from .kinds import load_model_form, preset_model

    if (args.preset is None) == (args.model_config is None):
        raise PasdVerifyError("give either --preset or --model-config with --state-dict")
    if args.model_config is not None and args.state_dict is None:
        raise PasdVerifyError("--model-config needs --state-dict")
    outputs_check(args.out, [args.state_dict, args.model_config, args.calibration,
                             getattr(args, "param_encodings", None)])
    if args.preset is not None:
        return preset_model(args.preset, args.kind or DEFAULT_KIND, seed=args.seed, form=args.form)
    return load_model_form(args.model_config, args.state_dict, form=args.form, model_class=args.model_class,
                           partner=args.controlnet, kind=args.kind)


def _adaround(args: argparse.Namespace) -> int:
    from .quant.adaround import AdaroundConfig
    from .quant.workflow import adaround_files, check_output_folder

    begin_work(*_MODELS, "aimet_torch.meta.connectedgraph_utils", "matplotlib.figure")

    config = AdaroundConfig(param_bw=args.param_bw, iterations=args.iterations, weights=args.weights,
                            cache_dtype=args.cache_dtype, cache_budget=args.cache_budget, device=args.device,
                            seed=args.seed, only=tuple(args.only or ()))
    _preset_latent(args)
    loaded = _model_from_args(args, check_output_folder)
    model = loaded.model
    report = adaround_files(model, args.out, config, partner=loaded.partner, calibration=args.calibration,
                            samples=args.samples, latent=tuple(args.latent) if args.latent else None,
                            encodings_version=args.encodings_version, both_versions=args.both_versions,
                            source=loaded.source)
    totals = report["totals"]
    print(f"AdaRounded {totals['layers']} layers of {type(model).__name__} ({args.form.upper()}) on "
          f"{report['samples']} samples in {totals['seconds_total']:.1f} s")
    print(f"reconstruction MSE, summed over layers: nearest rounding {totals['mse_nearest_total']:.4g}, "
          f"AdaRound {totals['mse_after_total']:.4g} ({totals['layers_improved']} of {totals['layers']} layers better)")
    print(f"peak RSS {totals['peak_rss_bytes'] / 2**30:.2f} GiB")
    for name in report["outputs"]:
        print(f"wrote {Path(args.out) / name}")
    return 0


def _rewrites(args: argparse.Namespace) -> tuple[str, ...]:
    """Every rewrite but those turned off; one turned both on and off is a contradiction, not a choice."""
    from .export.rewrites import REWRITES

    both = sorted(set(args.rewrite or ()) & set(args.no_rewrite or ()))
    if both:
        raise PasdVerifyError(f"--rewrite {both[0]} and --no-rewrite {both[0]} contradict each other")
    return tuple(r for r in REWRITES if r not in (args.no_rewrite or ()))


def _export(args: argparse.Namespace) -> int:
    from .export.pipeline import ExportConfig, check_output_folder, export_files
    from .logs import library_warnings

    begin_work(*_MODELS, *_EXPORT)

    _preset_latent(args)
    # one field per flag; release_model: the command needs the memory, and no caller uses the model afterwards
    config = ExportConfig(calibration=args.calibration, samples=args.samples, latent=args.latent,
                          weights=args.weights, param_bw=args.param_bw, act_bw=args.act_bw, soc_model=args.soc_model,
                          htp_threshold_db=args.htp_threshold_db, localize=not args.no_localize,
                          rewrites=_rewrites(args), param_encodings=args.param_encodings, seed=args.seed,
                          release_model=True)
    loaded = _model_from_args(args, check_output_folder)
    with _stage_lines("pasd_verify.export"), library_warnings("export", logging.getLogger("pasd_verify.export")) as caught:
        report = export_files(loaded.model, args.out, config, partner=loaded.partner, source=loaded.source)
    if caught and not args.verbose:
        print(f"({len(caught)} warnings from torch, diffusers and AIMET went to the log; -v shows them)")
    htp = report["stages"]["htp"]
    if htp["htp"]["status"] == "skipped":
        print(f"HTP steps SKIPPED: {htp['htp']['error']}")
    elif "divergence" in htp:
        found = htp["divergence"]
        where = found if isinstance(found, str) else (
            (f"first in block {found['block']} (alone on its inputs), " if found["block"] else
             "every block agrees alone; across blocks, ") +
            f"first at {found['module']} ({' -> '.join(found['op_pattern'])}), reproducer {found['reproducer']}")
        print(f"the HTP disagrees with the CPU: {where}")
    for name in report["outputs"]:
        print(f"wrote {Path(args.out) / name}")
    print("export PASSED" if report["passed"] and not report["htp_skipped"] else
          "export passed except the skipped HTP steps" if report["passed"] else "export did NOT pass: see report.json")
    return 0 if report["passed"] else 1


def _check(args: argparse.Namespace) -> int:
    from .port.command import check_files
    from .port.artifacts import PortArtifacts
    from .port.report import table

    begin_work(*_MODELS, "onnx")
    artifacts = PortArtifacts.of(**{name: getattr(args, name) for name in ARTIFACTS})
    if not artifacts.given() - {"kind"}:
        raise PasdVerifyError("no artifact given: name at least one of --model, --sha, --mha-encodings, "
                              "--sha-encodings, --onnx, --qdq")
    with _stage_lines("pasd_verify.port"):
        results, report = check_files(args.out, artifacts, laws=args.law, seed=args.seed,
                                      progress=lambda law: _say(f"checking {law}"))
    print(table(results))
    verdict = report["verdict"]
    print(f"{verdict['passed']} law(s) passed, {verdict['failed']} failed, {verdict['unchecked']} not checked; "
          f"wrote report.json and junit.xml into {args.out}")
    return 0 if verdict["failed"] == 0 else 1


def _pipeline(args: argparse.Namespace) -> int:
    from .pipeline.verdicts import Thresholds
    from .pipeline.command import PipelineCheckConfig, pipeline_files
    from .pipeline.networks import parse_backends

    begin_work(*_MODELS, *_EXPORT, "transformers:CLIPTokenizer", "matplotlib.figure")
    backends = parse_backends(args.backend)
    config = PipelineCheckConfig(
        prompt=args.prompt, steps=args.steps, guidance=args.guidance, conditioning_scale=args.conditioning_scale,
        upscale=args.upscale, process_size=args.process_size, start=args.start, seed=args.seed, noise=args.noise,
        backends=tuple(backends.items()), export_dir=args.export_dir,
        thresholds=Thresholds(picture_psnr_db=args.psnr_db, picture_ssim=args.ssim))
    with _stage_lines("pasd_verify.pipeline"):
        report = pipeline_files(args.out, config, preset=args.preset, sd_dir=args.sd_dir, pasd_dir=args.pasd_dir,
                                image=args.image, progress=_say)
    picture = report["picture"]
    if picture is None:
        print(f"the run with these backends did not complete: {report['candidate_error']}")
    else:
        print(f"picture against fp32: PSNR {picture['psnr_db']:.1f} dB (>= {args.psnr_db:g}), SSIM "
              f"{picture['ssim']:.3f} (>= {args.ssim:g})")
        worst = min(report["closed_loop"], key=lambda s: s["guidance_std_ratio"])
        print(f"guidance signal: std ratio at least {worst['guidance_std_ratio']:.3f} (step {worst['step']}), "
              f"latent SQNR after the last step {report['closed_loop'][-1]['latent_sqnr_db']:.1f} dB")
    for name, figures in report["networks"].items():
        alone = figures["picture_alone"]
        shown = (f"picture PSNR {alone['psnr_db']:.1f} dB, SSIM {alone['ssim']:.3f}" if alone else
                 f"did not run: {figures['error']}")
        print(f"  {name} alone on {figures['backend']}: {shown}, {len(figures['faults'])} teacher-forced figure(s) "
              "past a threshold")
    culprit = report["culprit"]
    if culprit:
        where = f" at step {culprit['step']}" if culprit["step"] is not None else ""
        value = f"{culprit['value']:.3g}" if isinstance(culprit["value"], float) else culprit["value"]
        print(f"first fault: {culprit['network']}{where}: {culprit['figure']} {value} (threshold "
              f"{culprit['threshold']})")
    print(f"wrote {len(report['outputs'])} outputs into {args.out}")
    print("pipeline PASSED" if report["passed"] else "pipeline did NOT pass: see report.json")
    return 0 if report["passed"] else 1


def _say(message: str) -> None:
    print(f"... {message}", flush=True)


def _add_model_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    where = parser.add_argument_group("the model: a local checkpoint, or an embedded preset")
    where.add_argument("--model-config", help="diffusers config.json (or its folder); PASD folders are recognised")
    where.add_argument("--state-dict", help="checkpoint, MHA or SHA, .safetensors or .pth")
    where.add_argument("--model-class", choices=MODEL_CLASS_NAMES, help="override the model class")
    where.add_argument("--controlnet", help="PASD UNet only: the ControlNet folder whose residuals it is calibrated on")
    where.add_argument("--preset", choices=["tiny", "sd15"], help="an embedded seeded model instead of files")
    where.add_argument("--kind", choices=KIND_NAMES,
                       help=f"which network: with --preset, which to build (default {DEFAULT_KIND}); with "
                            "--model-config, which half of a VAE folder (vae-encoder or vae-decoder), else a check "
                            "of what the folder holds")
    where.add_argument("--form", choices=["sha", "mha"], default="sha",
                       help=f"{verb} the SHA rewrite (default; names follow the SHA name map) or the MHA model")
    data = parser.add_argument_group("calibration")
    data.add_argument("--calibration", help="folder of .safetensors samples (see pasd_verify.quant.calibration)")
    data.add_argument("--samples", type=int, default=8, help="seeded samples when no --calibration (default 8)")
    data.add_argument("--latent", type=int, nargs=2, metavar=("H", "W"), help="latent size of seeded samples")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pasd-verify",
        description="Rewrite SD1.5/PASD attention to single-head form for QNN and prove the numbers unchanged.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics and library warnings to stderr")
    # accepted after the subcommand too (pasd-verify demo -v); SUPPRESS keeps it from resetting the global flag
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log diagnostics and library warnings to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[verbose], help="run every stage on an embedded tiny seeded model and report")
    demo.add_argument("--out", default="pasd-verify-demo", help="folder for report.json and the checkpoints")
    demo.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    demo.set_defaults(func=_demo)
    convert = sub.add_parser(
        "convert", parents=[verbose], help="rewrite an MHA checkpoint (and AIMET encodings) to SHA for a local diffusers config",
    )
    convert.add_argument("--model-config", required=True,
                         help="diffusers config.json (or its folder) of a UNet2DConditionModel, ControlNetModel, "
                              "AutoencoderKL (SD1.5's vae/) or the PASD models")
    convert.add_argument("--state-dict", required=True, help="MHA checkpoint, .safetensors or .pth")
    convert.add_argument("--model-class", choices=MODEL_CLASS_NAMES,
                         help="the model class, overriding what the config's _class_name and the checkpoint's keys say "
                              "(PASD's folders name the stock classes; their weights identify them)")
    convert.add_argument("--encodings", help="AIMET encodings of the MHA model (format 0.6.1 or 1.0.0)")
    convert.add_argument("--encodings-version", choices=["0.6.1", "1.0.0"],
                         help="write the SHA encodings in this format (default: the input's)")
    convert.add_argument("--out", required=True, help="output folder (created; inputs are never overwritten)")
    convert.set_defaults(func=_convert)

    ada = sub.add_parser("adaround", parents=[verbose],
                         help="AdaRound a (SHA) UNet or ControlNet with bounded memory; write AIMET parameter encodings")
    _add_model_arguments(ada, "AdaRound")
    opt = ada.add_argument_group("optimisation")
    opt.add_argument("--param-bw", type=int, default=4, help="weight bitwidth (default 4)")
    opt.add_argument("--iterations", type=int, help="per layer (default AIMET's: 10000, 15000 below 8 bits)")
    opt.add_argument("--weights", choices=["per_channel", "per_tensor"], default="per_channel")
    opt.add_argument("--cache-budget", type=_parse_bytes,
                     help="bytes of activation cache in memory (e.g. 4GiB); the rest goes to files")
    opt.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32")
    opt.add_argument("--device", default="cpu", help="cpu or cuda (the cache stays on the host)")
    opt.add_argument("--only", nargs="+", metavar="MODULE",
                     help="AdaRound only the layers under these module names (e.g. up_blocks.3 mid_block)")
    opt.add_argument("--seed", type=int, default=0)
    ada.add_argument("--encodings-version", choices=["1.0.0", "0.6.1"], default="1.0.0")
    ada.add_argument("--both-versions", action="store_true", help="also write the other encodings format")
    ada.add_argument("--out", required=True, help="output folder")
    ada.set_defaults(func=_adaround)

    exp = sub.add_parser("export", parents=[verbose],
                         help="quantize with aimet-onnx, export ONNX + encodings + QDQ, compile for the HTP, check each step")
    _add_model_arguments(exp, "export")
    q = exp.add_argument_group("quantization and the HTP")
    q.add_argument("--weights", choices=["per_channel", "per_tensor"], default="per_channel")
    q.add_argument("--param-bw", type=int, default=8, help="weight bitwidth (default 8)")
    q.add_argument("--act-bw", type=int, default=16, help="activation bitwidth (default 16)")
    q.add_argument("--soc-model", default="57", help="QNN soc_model to compile for (default 57)")
    q.add_argument("--htp-threshold-db", type=float, default=30.0,
                   help="least SQNR of the HTP against the CPU on the same QDQ graph (default 30)")
    q.add_argument("--no-localize", action="store_true", help="on a disagreement, do not search for its first op")
    q.add_argument("--no-rewrite", action="append", choices=REWRITE_NAMES, metavar="NAME",
                   help="turn off one of the rewrites every export applies (repeatable): silu-as-division (the HTP's "
                        "GroupNorm -> SiLU -> Conv divergence), layernorm-identity-mul (its LayerNorm -> per-channel "
                        "MatMul one at 16 tokens), mask-floor (the text encoder's -3.4e38 causal mask, which 16-bit "
                        "quantization cannot hold); see README")
    q.add_argument("--rewrite", action="append", choices=REWRITE_NAMES, metavar="NAME",
                   help="a rewrite by name: every one is on by default; kept for scripts that name them")
    q.add_argument("--param-encodings", metavar="ENCODINGS",
                   help="AdaRounded parameter encodings (pasd-verify adaround's param_encodings.encodings): their "
                        "layers keep these grids instead of being recalibrated; --state-dict must be the "
                        "adarounded.safetensors written with them")
    q.add_argument("--seed", type=int, default=0)
    exp.add_argument("--out", required=True, help="output folder")
    exp.set_defaults(func=_export)

    chk = sub.add_parser("check", parents=[verbose],
                         help="check the laws of an MHA -> SHA port made by any tool, on whatever of its files you have")
    arts = chk.add_argument_group("the port's files (any subset: each law needs some; the report says which)")
    for name, help in ARTIFACTS.items():
        arts.add_argument(f"--{name.replace('_', '-')}", help=help,
                          **({"choices": KIND_NAMES, "metavar": "KIND"} if name == "kind" else {}))
    chk.add_argument("--law", action="append", metavar="LAW", help="check only this law (repeatable)")
    chk.add_argument("--seed", type=int, default=0, help="seed of the inputs the models are compared on")
    chk.add_argument("--out", required=True, help="output folder: report.json and junit.xml")
    chk.set_defaults(func=_check)

    pipe = sub.add_parser("pipeline", parents=[verbose],
                          help="run PASD's whole super-resolution with networks on chosen backends, judged against fp32")
    models = pipe.add_argument_group("the models: an embedded preset, or local folders")
    models.add_argument("--preset", choices=["tiny", "sd15"], help="seeded networks of this size")
    models.add_argument("--sd-dir", help="SD1.5 folder (text_encoder/, tokenizer/, vae/, scheduler/)")
    models.add_argument("--pasd-dir", help="PASD folder (unet/, controlnet/)")
    run = pipe.add_argument_group("the run (PASD's defaults)")
    run.add_argument("--image", help="the photo (default: scikit-image's astronaut)")
    run.add_argument("--prompt", default="", help="the user's prompt; PASD's added prompt is appended")
    run.add_argument("--steps", type=int, default=20)
    run.add_argument("--guidance", type=float, default=9.0)
    run.add_argument("--conditioning-scale", type=float, default=1.0)
    run.add_argument("--upscale", type=int, default=1)
    run.add_argument("--process-size", type=int, default=768,
                     help="PASD's least short side: smaller photos are resized up to it (default 768)")
    run.add_argument("--start", choices=["photo", "noise"], default="photo",
                     help="the VAE-encoded photo with noise added (PASD's default) or pure noise")
    run.add_argument("--noise", help="the run's noise (.npz, as written beside the outputs) instead of --seed's")
    run.add_argument("--seed", type=int, default=0)
    where = pipe.add_argument_group("backends and judgement")
    where.add_argument("--backend", action="append", metavar="NET=BACKEND",
                       help="text_encoder, vae_encoder, controlnet, unet, vae_decoder or all = fp32, sha, qdq or htp "
                            "(repeatable; default fp32)")
    where.add_argument("--export-dir", help="one `pasd-verify export` folder per network (DIR/unet, ...); without it "
                                            "the pipeline exports the networks itself, calibrated on the fp32 run")
    where.add_argument("--psnr-db", type=_decibels, default=20.0, help="least PSNR of the picture against fp32")
    where.add_argument("--ssim", type=_similarity, default=0.8, help="least SSIM of the picture against fp32")
    pipe.add_argument("--out", required=True, help="output folder")
    pipe.set_defaults(func=_pipeline)
    return parser


def printable(text: str) -> str:
    """``text`` with control and format characters escaped (a NUL, a right-to-left override, a zero-width space in
    a key of a user's file), so that an error shows what the file holds instead of rearranging the terminal."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
                   else c.encode("unicode_escape").decode("ascii") for c in text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with signals_as_interrupts():
            try:
                code = args.func(args)
            except Exception as e:
                if stop_requested() is None:
                    raise
                # what a signal a library swallowed turned into: report the stop, not its symptom
                raise Interrupted(stop_requested()) from e
            if stop_requested() is not None:  # a library swallowed the signal's exception; the stop stands
                raise Interrupted(stop_requested())
            return code
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(interrupted_line(signum), file=sys.stderr)
        return 128 + signum
    except PasdVerifyError as e:
        print(printable(f"pasd-verify: error: {e}"), file=sys.stderr)
        return 2
    except OSError as e:  # the disk, not the inputs: full, read-only, a permission; named by its path
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "writing the outputs"
        print(printable(f"pasd-verify: error: {where}: {e.strerror or e}"), file=sys.stderr)
        return 2


def console_main() -> NoReturn:
    """The ``pasd-verify`` command: :func:`main`, then the exit that a late signal cannot turn into a silent 143."""
    from .signals import exit_after_verdict

    exit_after_verdict(main())


if __name__ == "__main__":
    console_main()
