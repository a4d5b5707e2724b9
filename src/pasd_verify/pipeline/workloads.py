"""The pipeline workload the benchmarks run in child processes (:func:`pasd_verify.memory.peak_rss_of`): ``pasd-verify
pipeline`` on the tiny networks with every network on one backend, the pipeline's own exports included."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .command import PipelineCheckConfig, pipeline_files


def pipeline_run(backend: str, steps: int = 1, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """The check of the tiny pipeline (scikit-image's astronaut at ``size`` x ``size``, ``steps`` steps) with all
    five networks on ``backend``; its time split into exports and the check's runs, and its figures."""
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC)
    config = PipelineCheckConfig(prompt="a portrait of an astronaut", steps=steps, seed=seed, process_size=size,
                                 backends=(("all", backend),))
    with tempfile.TemporaryDirectory(prefix="pasd-verify-pipeline-bench-") as out:
        report = pipeline_files(Path(out) / "out", config, preset="tiny", photo=(photo, "skimage.data.astronaut"))
    return {"passed": report["passed"], "seconds": report["seconds"], "exports_seconds": report["exports_seconds"],
            "picture": report["picture"], "graph_sessions": {k: {"calls": v["calls"], "seconds": v["seconds"]}
                                                             for k, v in report["graph_sessions"].items()}}
