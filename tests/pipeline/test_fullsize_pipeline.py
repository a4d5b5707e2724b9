"""SD1.5 size, the pipeline (``-m fullsize``): PASD's teacher-forced check with the SD1.5-size networks (seeded
weights) on the HTP, split into jobs as a run over many machines would split it (``pasd_verify.pipeline.workloads``):
the fp32 run of PASD's 20 steps (it writes each step's job file), each network's export calibrated on that run as
the pipeline calibrates it (float ONNX, aimet-onnx W8A16, QDQ graph, HTP compile and the export's own HTP check),
the text encoder and each VAE half on the HTP fed fp32's inputs, and two steps, the first and the last, through the
ControlNet, then the UNet, on the HTP with both guidance halves, each read from its job file alone.

Each job is a fresh child process (:func:`pasd_verify.memory.peak_rss_of`): its time and peak RSS growth are its
own (the HTP graph runs in a grandchild, whose peak is given apart), and its growth goes through the memory gate like
every memory benchmark. What is asserted is what the pipeline check itself decides: every export runs on the HTP,
and no network's teacher-forced figures cross the thresholds of :class:`~pasd_verify.pipeline.verdicts.Thresholds`
(the figures the report of ``pasd-verify pipeline`` holds them to). An export's own verdict on the pipeline's photo
is printed, not asserted, as the pipeline reports it: the pipeline judges a network by what it does to the run. On
the astronaut at 128 x 128 the VAE encoder's HTP output is 25.1 dB from the CPU's on the same graph, under the
export's 30 dB, while its encoded latent is 38.6 dB from fp32's (README: Export, at SD1.5 size; the seeded
exports of ``tests/test_fullsize.py`` hold each network to the export's own thresholds).

The photo is scikit-image's astronaut at ``--pipeline-photo`` pixels square (default 128, a 16 x 16 latent): the
emulated HTP's time grows with the pixels (README: the whole pipeline on the HTP, at SD1.5 size), and at PASD's
768 the two steps alone are hours of this machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pasd_verify.export.htp import htp_available
from pasd_verify.memory import peak_rss_of
from pasd_verify.pipeline.verdicts import Thresholds, network_faults
from pasd_verify.pipeline.workloads import fullsize_jobs

pytestmark = [pytest.mark.fullsize,
              pytest.mark.skipif(htp_available() is not None, reason=str(htp_available()))]

STEPS = 20  # PASD's
GIB = 2**30


@pytest.fixture(scope="module")
def job_folder(request, tmp_path_factory):
    """The files the jobs hand on to each other (the fp32 run, the step jobs, the exports): ``--pipeline-jobs`` or a
    temporary folder."""
    kept = request.config.getoption("--pipeline-jobs")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        return Path(kept)
    return tmp_path_factory.mktemp("pipeline-sd15")


@pytest.mark.parametrize("job", fullsize_jobs(STEPS))
def test_sd15_size_pipeline_job(benchmark, peak_memory, job_folder, request, job):
    size = request.config.getoption("--pipeline-photo")
    benchmark.group = "pipeline-sd15"
    run = benchmark.pedantic(peak_rss_of, args=("pasd_verify.pipeline.workloads:fullsize_job", job, str(job_folder),
                                                "sd15", size, STEPS, 0), rounds=1)
    result = run["result"]
    peak_memory(benchmark, run)
    benchmark.extra_info.update(result)
    sessions = "; ".join(f"{key}: {s['calls']} calls in {s['seconds']:.0f} s, HTP child "
                         f"{(s.get('peak_rss_bytes') or 0) / GIB:.1f} GiB"
                         for key, s in result.get("graph_sessions", {}).items())
    verdict = f"; export {'passed' if result['passed'] else 'did NOT pass'} its own checks" if "passed" in result else ""
    print(f"\nSD1.5-size pipeline at {size} x {size}, {job}: {run['seconds']:.0f} s{verdict} "
          f"(fp32 run {result.get('fp32_run_seconds', 0):.0f} s), peak RSS growth {run['growth_bytes'] / GIB:.1f} "
          f"GiB; {sessions}; {result}")
    action, _, rest = job.partition(":")
    network, _, step = rest.partition(":")
    if action == "export":
        assert result["htp_status"] == "passed", f"the HTP did not run the SD1.5-size {network}: {result}"
    elif action == "forced":
        faults = network_faults(network, {"steps": [result]} if step else result, Thresholds())
        assert not faults, f"{network} on the HTP, teacher-forced: {faults}"
