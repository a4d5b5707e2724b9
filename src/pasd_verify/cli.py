"""The ``pasd-verify`` command line: thin wrappers that print tables and set the exit status."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .errors import PasdVerifyError

# The classes --model-class accepts, spelled here so that --help needs no torch import (a test checks they match
# pasd_verify.loading.MODEL_CLASSES).
MODEL_CLASS_NAMES = ("UNet2DConditionModel", "ControlNetModel", "PASDUNet2DConditionModel", "PASDControlNetModel")

# Numbers worth a column in the stage table, in the order shown.
_SHOWN = ("relative_error", "max_abs_error", "max_scale_relative_difference", "tolerance",
          "attention_modules_converted", "parameters_split", "tensors_out", "param_encodings_split",
          "activation_encodings_copied", "roundtrip_bit_identical", "parameters_identical")


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def stage_table(stages: list[dict[str, Any]]) -> str:
    """A plain-text table: one row per stage, its status, time and key numbers."""
    rows = [("stage", "status", "seconds", "numbers")]
    for stage in stages:
        numbers = ", ".join(f"{k}={_format(stage[k])}" for k in _SHOWN if k in stage)
        if "error" in stage:
            numbers = stage["error"].splitlines()[0]
        rows.append((stage["name"], stage["status"].upper(), f"{stage['seconds_total']:.2f}", numbers))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows
    )


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # torch and diffusers load here, not for --help

    report = run_demo(args.out, seed=args.seed)
    print(stage_table(report["stages"]))
    print(f"\n{'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.1f} s; report: {args.out}/report.json")
    if report["library_warnings_suppressed"] and not args.verbose:
        print(f"({report['library_warnings_suppressed']} warnings from torch, diffusers and AIMET went to the log; "
              "pasd-verify demo --verbose shows them)")
    return 0 if report["passed"] else 1


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_files

    summary = convert_files(args.model_config, args.state_dict, args.out, encodings=args.encodings,
                            encodings_version=args.encodings_version, model_class=args.model_class)
    outputs = summary.pop("outputs")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key.ljust(width)}  {value}")
    for path in outputs.values():
        print(f"wrote {path}")
    return 0


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
                         help="diffusers config.json (or its folder) of a UNet2DConditionModel, ControlNetModel or "
                              "the PASD models")
    convert.add_argument("--state-dict", required=True, help="MHA checkpoint, .safetensors or .pth")
    convert.add_argument("--model-class", choices=MODEL_CLASS_NAMES,
                         help="the model class, overriding what the config's _class_name and the checkpoint's keys say "
                              "(PASD's folders name the stock classes; their weights identify them)")
    convert.add_argument("--encodings", help="AIMET encodings of the MHA model (format 0.6.1 or 1.0.0)")
    convert.add_argument("--encodings-version", choices=["0.6.1", "1.0.0"],
                         help="write the SHA encodings in this format (default: the input's)")
    convert.add_argument("--out", required=True, help="output folder (created; inputs are never overwritten)")
    convert.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        from .quant import set_aimet_log_level

        set_aimet_log_level(logging.INFO)
    try:
        return args.func(args)
    except PasdVerifyError as e:
        print(f"pasd-verify: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
