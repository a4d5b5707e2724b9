"""SD1.5 size, end to end (``-m fullsize``): the whole ``pasd-verify export`` pipeline on the SD1.5-size PASD UNet
and PASD ControlNet (seeded random weights, 64x64 latent, one calibration sample, W8A16 per-channel, both exact
rewrites): float export, AIMET calibration, encodings and QDQ graph, HTP compile and the emulated HTP run.

Not in CI: the emulated HTP run of one SD1.5-size UNet alone takes longer than CI's whole budget allows beside the
other tiers (README: Full size, with the measured durations). Each export is a fresh child process
(:func:`pasd_verify.export.workloads.export_run`) whose peak RSS growth goes through the memory gate like every
memory benchmark; each stage's time, the HTP child's own peak (compile and run happen in a grandchild) and every
step's agreement go to ``extra_info`` and are printed. What is asserted is what the figures mean: the export passes
its own checks, each at the threshold the report states.
"""

from __future__ import annotations

import pytest

from pasd_verify.export.htp import htp_available
from pasd_verify.export.pipeline import FLOAT_TOLERANCE, HTP_SQNR_DB, QDQ_SQNR_DB
from pasd_verify.memory import peak_rss_of

pytestmark = [pytest.mark.fullsize,
              pytest.mark.skipif(htp_available() is not None, reason=str(htp_available()))]

CASES = [("pasd_unet", "sha"), ("pasd_controlnet", "sha"), ("pasd_controlnet", "mha")]
GIB = 2**30


@pytest.mark.parametrize("target,form", CASES, ids=[f"{t}-{f}" for t, f in CASES])
def test_sd15_size_export_passes_every_step(benchmark, peak_memory, target, form):
    benchmark.group = f"export-sd15-{target}"
    run = benchmark.pedantic(peak_rss_of, args=("pasd_verify.export.workloads:export_run", target, form, None, 1,
                                                [64, 64], 0, "sd15"), rounds=1)
    result = run["result"]
    peak_memory(benchmark, run["growth_bytes"])
    benchmark.extra_info.update(result)
    stages = "; ".join(f"{name} {s['seconds']:.0f} s, peak {s['peak_rss_bytes'] / GIB:.1f} GiB"
                       for name, s in result["stages"].items())
    print(f"\nSD1.5-size {target} {form}: {run['seconds']:.0f} s, peak RSS growth {run['growth_bytes'] / GIB:.1f} GiB "
          f"(HTP child {(result['htp_child_peak_rss_bytes'] or 0) / GIB:.1f} GiB); {stages}; HTP {result['htp_status']}, "
          f"compile {result['htp_compile_seconds']} s, run {result['htp_run_seconds']} s, "
          f"binary {(result['context_binary_bytes'] or 0) / GIB:.2f} GiB; float rel. error "
          f"{result['float_relative_error']:.2e}, sim vs QDQ {result['sim_vs_qdq_sqnr_db']:.1f} dB, CPU vs HTP "
          f"{result['cpu_vs_htp_sqnr_db']} dB, fp32 vs HTP {result['fp32_vs_htp_sqnr_db']} dB")
    assert result["htp_status"] == "passed", f"the HTP did not run the SD1.5-size {target}: {result}"
    assert result["float_relative_error"] <= FLOAT_TOLERANCE
    assert result["sim_vs_qdq_sqnr_db"] >= QDQ_SQNR_DB
    assert result["cpu_vs_htp_sqnr_db"] >= HTP_SQNR_DB
    assert result["passed"], f"the export of the SD1.5-size {target} did not pass its own checks: {result}"
