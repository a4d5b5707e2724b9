"""Shared test set-up: hypothesis profiles and seeding.

HYPOTHESIS_PROFILE selects a profile: ``ci`` (the default; bounded so the default tier stays within minutes on
2 cores), ``dev`` (fast, for editing), ``thorough`` (at least 500 examples per property, no deadline) or ``mutation``
(derandomized, 20 examples; the mutation gate sets it).
"""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from pasd_verify.port.plugin import PROFILES

pytest_plugins = ("pytester",)

# Tests measure numbers, not threads; two threads match CI's two cores and keep timings comparable. Under
# pytest-xdist the cores are shared among the workers instead (two workers of one thread each on CI's two cores).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", str(max(1, 2 // _WORKERS)))))

# The profiles are the plugin's (pasd-ci, ...: users run their own tests on them); here also under their short names.
for name, values in PROFILES.items():
    settings.register_profile(name, **values)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# --- the memory gate: peak RSS growth of every memory benchmark against a committed baseline -----------------

MEMORY_BASELINE = os.path.join(os.path.dirname(__file__), "tests", "memory_baseline.json")


def pytest_addoption(parser):
    group = parser.getgroup("memory gate")
    group.addoption("--memory-gate", action="store_true",
                    help="fail a memory benchmark whose held memory growth exceeds tests/memory_baseline.json by >10%")
    group.addoption("--memory-baseline", default=MEMORY_BASELINE, help="the baseline file (default: %(default)s)")
    group.addoption("--memory-baseline-update", action="store_true",
                    help="write this run's held memory growths into the baseline file (on purpose only)")
    parser.addoption("--adaround-full-sweep", action="store_true",
                     help="AdaRound benchmarks: every implementation at N = 4, 8, 16, 32 on both targets "
                          "(hours), not CI's subset")
    parser.addoption("--pipeline-photo", type=int, default=128,
                     help="the fullsize tier's SD1.5-size pipeline: the photo's side in pixels (a multiple of 8; "
                          "default %(default)s). PASD works at 768, hours per step on the emulated HTP")
    parser.addoption("--pipeline-jobs", metavar="DIR",
                     help="the fullsize tier's SD1.5-size pipeline: keep its jobs' files (step jobs, exports) in DIR, "
                          "so that a later run can redo any job with -k (default: a temporary folder)")


class MemoryRecorder:
    """What the memory benchmarks measured this session, checked against the baseline as each is recorded."""

    def __init__(self, config):
        from pasd_verify.memory import load_baseline

        self.gate = config.getoption("--memory-gate")
        self.update = config.getoption("--memory-baseline-update")
        self.path = config.getoption("--memory-baseline")
        self.baseline = load_baseline(self.path) if self.gate else {}
        self.measured: dict[str, int] = {}

    def record(self, request, benchmark, run: dict) -> None:
        """Record one benchmark's child run (:func:`pasd_verify.memory.peak_rss_of`): its held growth, the figure
        gated, and the RSS growth and file pages it came from, also into pytest-benchmark's ``extra_info``; under
        ``--memory-gate`` fail the test, naming the benchmark and by how much, when it regressed."""
        import pytest

        from pasd_verify.memory import regression

        name = request.node.name
        held = int(run["held_growth_bytes"])
        benchmark.extra_info.update(peak_rss_growth_bytes=int(run["growth_bytes"]), held_growth_bytes=held,
                                    file_growth_bytes=int(run["file_growth_bytes"]))
        self.measured[name] = held
        if self.gate and not self.update:
            why = regression(name, held, self.baseline)
            if why:
                pytest.fail(f"memory regression: {why} (RSS growth {run['growth_bytes'] / 2**20:.1f} MiB, of which "
                            f"{run['file_growth_bytes'] / 2**20:.1f} MiB file pages)", pytrace=False)


def pytest_configure(config):
    config._memory_recorder = MemoryRecorder(config)


def pytest_sessionfinish(session):
    recorder = getattr(session.config, "_memory_recorder", None)
    if recorder and recorder.update and recorder.measured:
        from pasd_verify.memory import save_baseline

        save_baseline(recorder.path, recorder.measured)


@pytest.fixture
def peak_memory(request):
    """``peak_memory(benchmark, run)`` records a memory benchmark's child run and applies the gate."""
    recorder = request.config._memory_recorder
    return lambda benchmark, run: recorder.record(request, benchmark, run)


# --- the tiny UNet the golden encodings were made from (golden/generate.py) ------------------------------------

@pytest.fixture(scope="module")
def name_map():
    """The golden MHA -> SHA name map of the tiny UNet, as a plain dict (as a user's name_map.json loads)."""
    import json

    return json.loads((Path(__file__).parent / "golden" / "unet_tiny_name_map.json").read_text())


@pytest.fixture(scope="module")
def sha_shapes():
    """Every parameter shape of the tiny UNet after the SHA rewrite: what check_encodings validates against."""
    from pasd_verify.presets import build_unet
    from pasd_verify.sha import convert_to_sha

    model = build_unet("tiny")
    convert_to_sha(model)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}
