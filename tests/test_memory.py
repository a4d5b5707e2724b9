"""The memory gate: a memory benchmark fails when its held memory growth exceeds the committed baseline by >10%."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pasd_verify.errors import PasdVerifyError
from pasd_verify.memory import NOISE_FLOOR_BYTES, load_baseline, peak_rss_of, regression, save_baseline

MIB = 2**20
ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"


def test_growth_within_ten_percent_of_the_baseline_passes():
    baseline = {"bench": 1000 * MIB}
    assert regression("bench", 1000 * MIB, baseline) is None
    assert regression("bench", 1099 * MIB, baseline) is None
    assert regression("bench", 500 * MIB, baseline) is None  # an improvement is never a failure


def test_growth_over_ten_percent_fails_naming_the_benchmark_and_the_amount():
    why = regression("bench[x]", 1150 * MIB, {"bench[x]": 1000 * MIB})
    assert why is not None and "bench[x]" in why and "+15.0%" in why and "1000.0 MiB" in why


def test_differences_below_the_noise_floor_pass_whatever_the_ratio():
    small = {"bench": 4 * MIB}
    assert regression("bench", 4 * MIB + NOISE_FLOOR_BYTES, small) is None
    assert regression("bench", 5 * MIB + NOISE_FLOOR_BYTES, small) is not None


def test_a_benchmark_without_a_baseline_entry_fails():
    assert "no baseline entry" in regression("new_bench", 1, {"other": 1})


def test_baseline_round_trips_and_keeps_entries_not_measured(tmp_path):
    path = tmp_path / "baseline.json"
    save_baseline(path, {"a": 1, "b": 2})
    save_baseline(path, {"b": 3})
    assert load_baseline(path) == {"a": 1, "b": 3}


@pytest.mark.parametrize("body", ["{", '{"held_growth_bytes": {"a": -1}}', '{"other": 1}'])
def test_malformed_baseline_is_an_error_naming_the_file(tmp_path, body):
    path = tmp_path / "baseline.json"
    path.write_text(body)
    with pytest.raises(PasdVerifyError, match="baseline.json"):
        load_baseline(path)


BENCHMARK = """
import os

class Benchmark:  # stands in for pytest-benchmark's fixture, of which the gate uses extra_info only
    extra_info = {}

def test_bench_memory(peak_memory):
    growth = int(os.environ["GROWTH_BYTES"])
    peak_memory(Benchmark(), {"growth_bytes": growth + 2**20, "file_growth_bytes": 2**20, "held_growth_bytes": growth})
"""


def test_gate_fails_an_injected_regression_and_passes_the_baseline(pytester, monkeypatch):
    pytester.makeconftest(ROOT_CONFTEST.read_text())
    pytester.makepyfile(test_bench_memory=BENCHMARK)
    baseline = pytester.path / "baseline.json"
    monkeypatch.setenv("GROWTH_BYTES", str(200 * MIB))

    # refreshing on purpose writes the measured figure
    pytester.runpytest("--memory-baseline", str(baseline), "--memory-baseline-update").assert_outcomes(passed=1)
    assert json.loads(baseline.read_text())["held_growth_bytes"] == {"test_bench_memory": 200 * MIB}

    pytester.runpytest("--memory-gate", "--memory-baseline", str(baseline)).assert_outcomes(passed=1)

    monkeypatch.setenv("GROWTH_BYTES", str(250 * MIB))  # +25%: an injected regression
    result = pytester.runpytest("--memory-gate", "--memory-baseline", str(baseline))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*memory regression: test_bench_memory: held memory growth 250.0 MiB is +25.0%*RSS growth 251.0 MiB*"])

    # without the gate the same run records the figure and passes
    pytester.runpytest("--memory-baseline", str(baseline)).assert_outcomes(passed=1)


CHILD_WORK = '''
import mmap
import numpy as np

KEPT = []

def hold_and_map(hold_mib, path, keep_mapped):
    held = np.ones(hold_mib * 2**20, dtype=np.uint8)  # anonymous memory the code holds, every page written
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    total = sum(mapped[i] for i in range(0, len(mapped), 4096))  # every page of the file faulted in
    if keep_mapped:
        KEPT.append(mapped)  # as a shared library stays mapped
    else:
        mapped.close()
    return int(held[-1]) + total
'''


@pytest.fixture
def child_work(tmp_path, monkeypatch):
    (tmp_path / "child_work.py").write_text(CHILD_WORK)
    mapped = tmp_path / "mapped.bin"
    mapped.write_bytes(b"\0" * (32 * MIB))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    return str(mapped)


def test_child_separates_memory_it_holds_from_file_pages_it_maps(child_work):
    """The gated figure counts the anonymous memory the work holds and leaves out the file pages it keeps mapped
    (as a shared library stays mapped), whose residency the page cache decides: 48 MiB held, 32 MiB mapped."""
    run = peak_rss_of("child_work:hold_and_map", 48, child_work, True)
    assert run["result"] == 1
    # a few MiB either way: the pages of the code that runs are file pages too, and the allocator's own
    assert 31 * MIB <= run["file_growth_bytes"] <= 36 * MIB, run
    assert 44 * MIB <= run["held_growth_bytes"] <= 56 * MIB, run
    assert run["growth_bytes"] == run["held_growth_bytes"] + run["file_growth_bytes"]


def test_file_pages_unmapped_before_the_end_count_as_held(child_work):
    """RssFile is read at the end, so a mapping dropped before then is counted as held: the figure errs towards
    failing the gate, never towards hiding memory."""
    run = peak_rss_of("child_work:hold_and_map", 48, child_work, False)
    assert run["file_growth_bytes"] < MIB, run
    assert run["held_growth_bytes"] >= 48 * MIB + 31 * MIB, run
