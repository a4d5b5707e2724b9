"""``pasd-verify adaround`` on files: load, check, AdaRound, and write every output or none.

Outputs in ``out_dir``: ``adarounded.safetensors`` (the model with its rounded weights folded in, SHA names by
default), ``param_encodings.encodings`` (AIMET format 1.0.0, or 0.6.1; optionally both), ``report.json`` (per layer
and totals) and ``adaround.png`` (memory and loss per layer). Everything is checked before the long work starts,
the outputs are staged in a hidden folder and moved into place only when all of them exist.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from .. import __version__
from ..checkpoint_files import save_state_dict_file
from ..encodings import SUPPORTED_VERSIONS, convert_version, save_encodings
from ..errors import PasdVerifyError
from ..io import refuse_overwriting_inputs, staged_outputs, write_json
from .adaround import AdaroundConfig, AdaroundResult, adaround
from .calibration import calibration_samples, model_calls

def param_encodings_file(result: AdaroundResult, version: str = "1.0.0", prefix: str = "") -> dict[str, Any]:
    """The AdaRounded layers' parameter encodings as an AIMET encodings file of ``version``."""
    encodings = {"version": "0.6.1", "activation_encodings": {}, "param_encodings": result.param_encodings(prefix),
                 "excluded_layers": [], "quantizer_args": {}}
    return convert_version(encodings, version)


def plot_report(layers: list[dict[str, Any]], path: Path) -> None:
    """Peak memory and reconstruction error per layer, as ``path`` (PNG)."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no global backend switched

    x = range(len(layers))
    fig = Figure(figsize=(10, 6))
    mem, loss = fig.subplots(2, 1, sharex=True)
    mem.plot(x, [r["peak_rss_bytes"] / 2**20 for r in layers], label="peak RSS so far")
    mem.plot(x, [r["cache_bytes_in_memory"] / 2**20 for r in layers], label="activation cache in memory")
    mem.plot(x, [r["cache_bytes_on_disk"] / 2**20 for r in layers], label="activation cache on disk")
    mem.set_ylabel("MiB")
    mem.legend(loc="upper left")
    loss.semilogy(x, [max(r["mse_nearest"], 1e-30) for r in layers], ".", label="nearest rounding")
    loss.semilogy(x, [max(r["mse_after"], 1e-30) for r in layers], ".", label="AdaRound")
    loss.set_ylabel("reconstruction MSE")
    loss.set_xlabel("layer (forward order)")
    loss.legend(loc="upper left")
    fig.suptitle(f"AdaRound: {len(layers)} layers")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def adaround_files(model: nn.Module, out_dir: str | os.PathLike, config: AdaroundConfig, *,
                   partner: nn.Module | None = None, calibration: str | os.PathLike | None = None,
                   samples: int = 8, latent: tuple[int, int] | None = None, encodings_version: str = "1.0.0",
                   both_versions: bool = False, source: dict[str, Any] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """AdaRound ``model`` (in place) on calibration samples and write the outputs into ``out_dir``, all or none.

    ``calibration`` is a folder of samples (:mod:`pasd_verify.quant.calibration`); without it, ``samples``
    seeded ones at ``latent`` (default: the config's sample size). A kind with a partner (the PASD UNet) needs it.
    Returns the report that is also written as ``report.json``.
    """
    if encodings_version not in SUPPORTED_VERSIONS:
        raise PasdVerifyError(f"encodings version {encodings_version!r} is not one of {SUPPORTED_VERSIONS}")
    out_dir = Path(out_dir)
    data = calibration_samples(model, folder=calibration, count=samples, latent=latent, seed=config.seed,
                               partner=partner)
    calls = model_calls(model, data, partner=partner, device=config.device)

    started = time.perf_counter()
    result = adaround(model, calls, config, progress=progress)
    layers = [r.as_dict() for r in result.layers]
    report = {
        "tool": "pasd-verify", "version": __version__, "command": "adaround", "source": source or {},
        "config": asdict(config), "calibration": str(calibration) if calibration else f"{len(data)} seeded samples",
        "samples": len(data), "sample_shapes": {k: list(v.shape) for k, v in data[0].items()},
        "totals": {**result.summary(), "seconds_total": time.perf_counter() - started}, "layers": layers,
    }
    other = [v for v in SUPPORTED_VERSIONS if v != encodings_version]
    with staged_outputs(out_dir, OUTPUT_NAMES) as staging:
        save_state_dict_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                             staging / "adarounded.safetensors")
        save_encodings(param_encodings_file(result, encodings_version), staging / "param_encodings.encodings")
        if both_versions:
            save_encodings(param_encodings_file(result, other[0]), staging / f"param_encodings.{other[0]}.encodings")
        plot_report(layers, staging / "adaround.png")
        report["outputs"] = sorted(p.name for p in staging.iterdir()) + ["report.json"]
        write_json(staging / "report.json", report)
    return report


OUTPUT_NAMES = ("adarounded.safetensors", "param_encodings.encodings", "param_encodings.0.6.1.encodings",
                "param_encodings.1.0.0.encodings", "report.json", "adaround.png")


def check_output_folder(out_dir: str | os.PathLike, inputs: list[str | os.PathLike | None]) -> None:
    """Refuse an output folder where an output would replace one of the inputs."""
    refuse_overwriting_inputs(out_dir, OUTPUT_NAMES, inputs)

