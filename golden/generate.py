"""Produce golden/: real AIMET encodings of the tiny UNet, in MHA and SHA form, from seeded weights and inputs.

    python golden/generate.py [OUT_DIR]      (default: this folder)

For each form (mha, sha), weight config (per_channel, per_tensor) and format (0.6.1, 1.0.0) it writes
``unet_tiny_{form}_{weights}_{version}.encodings``, plus ``unet_tiny_name_map.json``. tests/test_golden.py runs
this script again and compares.
"""

from __future__ import annotations

import copy
import json
import sys
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


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent):
        print(path)
