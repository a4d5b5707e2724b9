"""The tiny pipeline's time and memory per backend (``-m bench``): ``pasd-verify pipeline`` with all five networks
on fp32, sha, qdq or htp (the last two exporting their graphs first), one step at 64 x 64, each in a fresh child
whose peak RSS growth goes through the memory gate. pytest-benchmark's table shows each backend's time against the
fastest; nothing asserts a time. What is asserted is that each run passes its own check."""

from __future__ import annotations

import pytest

from pasd_verify.export.htp import htp_available
from pasd_verify.memory import peak_rss_of

pytestmark = pytest.mark.bench

BACKENDS = ["fp32", "sha", "qdq", pytest.param("htp", marks=pytest.mark.skipif(htp_available() is not None,
                                                                                reason=str(htp_available())))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_pipeline(benchmark, peak_memory, backend):
    benchmark.group = "pipeline-tiny-64px-1step"
    run = benchmark.pedantic(peak_rss_of, args=("pasd_verify.pipeline.workloads:pipeline_run", backend), rounds=1)
    result = run["result"]
    peak_memory(benchmark, run)
    benchmark.extra_info.update(result)
    print(f"\npipeline, all networks on {backend}: {run['seconds']:.1f} s in the child ({result['exports_seconds']:.1f} s "
          f"of exports), held growth {run['held_growth_bytes'] / 2**20:.0f} MiB; picture PSNR "
          f"{result['picture']['psnr_db']:.1f} dB; sessions {result['graph_sessions']}")
    assert result["passed"], result
