"""AdaRound memory and time (``-m bench``): aimet-torch's own ``apply_adaround`` cached and uncached against ours,
with the activation cache in memory and on disk, at N = 4, 8, 16, 32 calibration samples.

Each run is a fresh child process (peak RSS growth over its import baseline; ``tracemalloc`` cannot see torch),
with the same model, seeded data and iteration count for every implementation. pytest-benchmark records the
times (one group per target and N, so its table shows each implementation relative to the fastest); the memory
figures go to ``extra_info`` and through the memory gate. CI runs the subset the contracts need (``CI_CASES``);
``--adaround-full-sweep`` runs every implementation at every N. The memory contract of issue 8 is asserted at the end
from figures measured in this same run: ours at N = 32 takes at most a quarter of AIMET cached, and ours with the
cache on disk is flat in N.
"""

from __future__ import annotations

import pytest

from pasd_verify.memory import peak_rss_of
from pasd_verify.quant.workloads import IMPLEMENTATIONS

pytestmark = pytest.mark.bench

SAMPLES = (4, 8, 16, 32)
# Iterations per layer, the same for every implementation: enough to include the optimisation in the time, few
# enough for CI (one SD1.5 feed-forward iteration on 32 samples is about 0.3 TFLOP).
ITERATIONS = 4
# CI runs the cases the SD1.5 layer's memory contract compares and the gate tracks, no more: every implementation
# on that layer at the ends of the sweep (N = 4 and 32), and ours (cache in memory and on disk) on the tiny SHA PASD
# UNet at N = 4. AIMET spends about 1.4 s per layer of that UNet whatever the iterations (a forward of the whole
# model per layer and sample): each of its runs there takes 5 minutes, which CI's 90 do not hold beside the other
# tiers, so its comparison with ours on the tiny UNet is `--adaround-full-sweep`'s, which runs every implementation
# at every N on both targets (the tiny UNet's N = 8, 16, 32 take 15, 22 and 34 minutes alone on 2 cores; their
# figures are not in the memory gate's baseline).
CI_CASES = [("sd15_ff_layer", impl, n) for impl in IMPLEMENTATIONS for n in (SAMPLES[0], SAMPLES[-1])]
CI_CASES += [("tiny_pasd_unet", impl, SAMPLES[0]) for impl in ("ours", "ours_disk")]
MIB = 2**20

measured: dict[tuple[str, str, int], dict] = {}


def pytest_generate_tests(metafunc):
    if "adaround_case" in metafunc.fixturenames:
        cases = CI_CASES
        if metafunc.config.getoption("--adaround-full-sweep"):
            cases = [(target, impl, n) for target in ("sd15_ff_layer", "tiny_pasd_unet")
                     for impl in IMPLEMENTATIONS for n in SAMPLES]
        metafunc.parametrize("adaround_case", cases, ids=[f"{t}-{i}-N{n}" for t, i, n in cases])


def test_bench_adaround_peak_memory(benchmark, peak_memory, adaround_case):
    target, implementation, samples = adaround_case
    benchmark.group = f"adaround-{target}-N{samples:02d}"
    run = benchmark.pedantic(peak_rss_of, args=("pasd_verify.quant.workloads:adaround_run", target, implementation,
                                                samples, ITERATIONS), rounds=1)
    peak_memory(benchmark, run)
    benchmark.extra_info.update(iterations=ITERATIONS, **run["result"])
    measured[adaround_case] = {"growth": run["held_growth_bytes"], **run["result"]}
    print(f"\n{target} {implementation} N={samples}: held growth {run['held_growth_bytes'] / MIB:.0f} MiB (RSS growth "
          f"{run['growth_bytes'] / MIB:.0f}, file pages {run['file_growth_bytes'] / MIB:.0f}), "
          f"{run['result']['seconds_per_layer']:.3f} s/layer over {run['result']['layers']} layers")
    assert run["result"]["layers"] > 0


def _table(target: str) -> dict[tuple[str, int], dict]:
    runs = {key[1:]: value for key, value in measured.items() if key[0] == target}
    counts = sorted({n for _, n in runs})
    lines = [f"{target}: held memory growth MiB (s/layer)"] + [
        f"  N={n:2d}  " + "  ".join(f"{impl} {runs[impl, n]['growth'] / MIB:6.0f} ({runs[impl, n]['seconds_per_layer']:.3f})"
                                    for impl in IMPLEMENTATIONS if (impl, n) in runs) for n in counts]
    print("\n" + "\n".join(lines))
    return runs


def test_adaround_memory_contract_on_the_sd15_layer():
    """Ours at N = 32 takes at most a quarter of AIMET cached's memory; with the cache on disk it is flat in N:
    from N = 4 to 32 it may grow by the calibration samples themselves (the layer's inputs, held by the caller),
    never by the cache."""
    from pasd_verify.memory import NOISE_FLOOR_BYTES
    from pasd_verify.quant.workloads import FF_IN, FF_TOKENS

    runs = _table("sd15_ff_layer")
    if not {("ours", 32), ("aimet_cached", 32), ("ours_disk", 4), ("ours_disk", 32)} <= runs.keys():
        pytest.skip("needs the sd15_ff_layer runs of test_bench_adaround_peak_memory at N = 4 and 32 in the session")
    ratio = runs["ours", 32]["growth"] / runs["aimet_cached", 32]["growth"]
    print(f"ours / AIMET cached at N = 32: {ratio:.3f}")
    assert ratio <= 0.25, f"ours takes {ratio:.2f}x AIMET cached's memory at N = 32"
    disk = [runs["ours_disk", n]["growth"] for n in SAMPLES if ("ours_disk", n) in runs]
    samples_added = (SAMPLES[-1] - SAMPLES[0]) * FF_TOKENS * FF_IN * 4
    assert max(disk) - disk[0] <= samples_added + NOISE_FLOOR_BYTES, disk


def test_adaround_tiny_pasd_unet_table():
    """The tiny UNet's activations are small next to the model and the runtime: its figures are reported (and
    gated by the baseline), and ours must not take more than AIMET cached at any N measured."""
    runs = _table("tiny_pasd_unet")
    counts = sorted({n for _, n in runs if all((impl, n) in runs for impl in ("ours", "aimet_cached"))})
    if not counts:
        pytest.skip("needs the tiny_pasd_unet runs of test_bench_adaround_peak_memory with AIMET's in the same "
                    "session (--adaround-full-sweep)")
    for n in counts:
        assert runs["ours", n]["growth"] <= runs["aimet_cached", n]["growth"], n
