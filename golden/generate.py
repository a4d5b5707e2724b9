"""Produce golden/ from seeded weights and inputs: real AIMET encodings of the tiny UNet in MHA and SHA form, and the
tiny PASD pipeline's pictures with every network on the HTP (the README shows them).

    python golden/generate.py [OUT_DIR] [--only encodings|pipeline]      (default: this folder, both)

Encodings: for each form (mha, sha), weight config (per_channel, per_tensor) and format (0.6.1, 1.0.0),
``unet_tiny_{form}_{weights}_{version}.encodings``, plus ``unet_tiny_name_map.json``.
Pipeline: the demo's pipeline stage (PASD's super-resolution of scikit-image's astronaut at 48 x 48, 2 steps, the five
tiny networks exported and compiled for the HTP by the pipeline itself): ``pipeline_tiny_comparison.png``,
``pipeline_tiny_steps.png``, the fp32 and HTP pictures, and ``pipeline_tiny_numbers.json`` (the demo's figures).
tests/test_golden.py runs this script again and compares by what the files mean.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch

from pasd_verify import convert_to_sha
from pasd_verify.kinds import graph_of
from pasd_verify.presets import build_unet, unet_inputs
from pasd_verify.quant import QUANTSIM_CONFIGS, export_encodings, quantize

FORMS = ("mha", "sha")
VERSIONS = ("0.6.1", "1.0.0")
SEED = 0


def golden_name(form: str, weights: str, version: str) -> str:
    return f"unet_tiny_{form}_{weights}_{version}.encodings"


# The pipeline's outputs the golden folder keeps, under the names it keeps them by
PIPELINE_FILES = {"comparison.png": "pipeline_tiny_comparison.png", "steps.png": "pipeline_tiny_steps.png",
                  "picture_fp32.png": "pipeline_tiny_fp32.png", "picture_candidate.png": "pipeline_tiny_htp.png"}
PIPELINE_NUMBERS = "pipeline_tiny_numbers.json"


def generate(out_dir: Path) -> list[Path]:
    torch.manual_seed(SEED)
    mha = build_unet("tiny", seed=SEED)
    sha = copy.deepcopy(mha)
    name_map = convert_to_sha(sha)
    inputs = unet_inputs(mha, batch=1, seed=SEED)
    dummy = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    written = []
    for form, model in (("mha", mha), ("sha", sha)):
        for weights in QUANTSIM_CONFIGS:
            sim = quantize(graph_of(copy.deepcopy(model)).module, dummy, weights=weights)
            for version in VERSIONS:
                written.append(export_encodings(sim, dummy, out_dir / golden_name(form, weights, version),
                                                version=version))
    map_path = out_dir / "unet_tiny_name_map.json"
    map_path.write_text(json.dumps(name_map, indent=2) + "\n")
    return [*written, map_path]


def generate_pipeline(out_dir: Path) -> list[Path]:
    """The demo's pipeline stage with every network on the HTP; refuses to run where the HTP backend cannot load
    (the demo would fall back to the QDQ graphs, and the pictures would not be the HTP's)."""
    from pasd_verify import demo
    from pasd_verify.export.htp import htp_available

    if (why := htp_available()) is not None:
        raise SystemExit(f"golden/generate.py: the pipeline's golden pictures are the HTP's, and {why}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        numbers = demo.pipeline(SEED, Path(tmp))
        written = []
        for name, golden in PIPELINE_FILES.items():
            written.append(Path(shutil.copyfile(Path(tmp) / "pipeline" / name, out_dir / golden)))
    numbers.pop("comparison")  # the demo's path to its own copy
    numbers_path = out_dir / PIPELINE_NUMBERS
    numbers_path.write_text(json.dumps(numbers, indent=2) + "\n")
    return [*written, numbers_path]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path(__file__).parent)
    parser.add_argument("--only", choices=("encodings", "pipeline"))
    args = parser.parse_args(argv)
    for part, make in (("encodings", generate), ("pipeline", generate_pipeline)):
        if args.only in (None, part):
            for path in make(args.out_dir):
                print(path)


if __name__ == "__main__":
    main()
