"""Peak resident memory of a piece of work, measured in a fresh child process.

``tracemalloc`` does not see torch's allocations, and a process that already ran other work has a high-water
mark that says nothing about the next step. So the work runs in a child: it imports what it needs, resets its
high-water mark (``/proc/self/clear_refs``), runs, and reports ``VmHWM`` minus the RSS it started from.

That growth also counts the pages of shared libraries and mapped files the kernel maps in while the work runs
(``RssFile``): how many depends on the page cache (the kernel maps whatever of a large folio or a fault-around
window is already cached), not on the code. Two copies of one environment differed by 8 MiB there on one
machine. So the gated figure is the growth less the file-backed pages mapped during the work: the memory the
code holds. Transparent huge pages are turned off in the child for the same reason: whether the kernel backs an
allocation with 2 MiB pages is the machine's setting.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import PasdVerifyError
from .io import write_json

# glibc serves allocations below a threshold it raises as the program frees (up to 32 MiB) from its heaps and keeps
# freed heap memory resident, so the same work peaked 400 MiB apart from run to run depending on when that
# happened. A fixed threshold makes every tensor-sized block its own mapping, returned at once when freed: the
# peak then measures what the code holds, which is what a regression gate must compare.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 2**10), "MALLOC_TRIM_THRESHOLD_": str(128 * 2**10)}
# The baseline file's table of figures, one per benchmark id.
BASELINE_KEY = "held_growth_bytes"
# A memory benchmark regresses when its held growth exceeds the committed baseline by more than this fraction.
REGRESSION_TOLERANCE = 0.10
# Below this many bytes a difference is not a regression. glibc hands memory out in arenas and the kernel counts
# RSS in pages, so two runs of the same code differ by a few MiB on one machine. Between machines CI measured the
# tiny PASD UNet's AdaRound at 249 MiB of plain RSS growth where this machine measured 184, before the child turned
# transparent huge pages off and left file pages out (the allocator's huge pages alone add 19 MiB here, file pages
# are 48 of the 184). The floor is a margin for whatever of that gap is neither; over 320 MiB the 10% binds.
NOISE_FLOOR_BYTES = 32 * 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise PasdVerifyError(f"/proc/self/status has no {field}; peak RSS is measured on Linux only")


def trim_heap() -> None:
    """Hand freed heap memory back to the kernel (glibc's ``malloc_trim``; nothing elsewhere): after a large model
    is dropped, the next stage then has its memory instead of the allocator keeping it resident."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """This process's peak RSS so far (VmHWM), or 0 where /proc does not tell it (reports only, never gates)."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, PasdVerifyError):
        return 0


def peak_rss_of(target: str, *args: Any, timeout: float | None = None) -> dict[str, float]:
    """Run ``module:function(*args)`` (JSON-able args) in a child; return its memory and time.

    Returns ``{"baseline_bytes", "peak_bytes", "growth_bytes", "file_growth_bytes", "held_growth_bytes",
    "seconds", "result"}``: RSS after imports, the high-water mark during the call, their difference, the
    file-backed pages mapped during the call (RssFile at the end less at the start), the growth less those (what
    the memory gate compares), the call's wall time and its (JSON-able) return value.

    RssFile is read at the end, not at the peak: the held growth falls short of what the code held at the peak by
    the file pages mapped after it, and exceeds it by the file pages dropped before the end (which errs towards
    failing the gate).
    """
    proc = subprocess.run(
        [sys.executable, "-m", __name__, target, json.dumps(args)],
        capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, **ALLOCATOR_ENV},
    )
    if proc.returncode != 0:
        raise PasdVerifyError(f"child process running {target} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _disable_transparent_huge_pages() -> None:
    """``prctl(PR_SET_THP_DISABLE)`` for this process (Linux 3.15+; nothing where it is refused)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)  # 41: PR_SET_THP_DISABLE
    except (OSError, AttributeError):
        pass


def _child(target: str, args_json: str) -> None:
    _disable_transparent_huge_pages()
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    args = json.loads(args_json)
    baseline, baseline_file = _status_kib("VmRSS"), _status_kib("RssFile")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    result = func(*args)
    seconds = time.perf_counter() - start
    peak, file_growth = _status_kib("VmHWM"), max(_status_kib("RssFile") - baseline_file, 0)
    print(json.dumps({
        "baseline_bytes": baseline * 1024, "peak_bytes": peak * 1024, "growth_bytes": (peak - baseline) * 1024,
        "file_growth_bytes": file_growth * 1024, "held_growth_bytes": max(peak - baseline - file_growth, 0) * 1024,
        "seconds": seconds, "result": result,
    }))


def load_baseline(path: str | os.PathLike) -> dict[str, int]:
    """The committed baseline: ``{benchmark id: held memory growth in bytes}`` (empty if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        body = json.loads(path.read_text())
        values = body[BASELINE_KEY]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PasdVerifyError(f"{path}: not a memory baseline (expected {{'{BASELINE_KEY}': {{id: bytes}}}}): "
                              f"{e}") from None
    bad = [k for k, v in values.items() if not isinstance(v, int) or v < 0]
    if bad:
        raise PasdVerifyError(f"{path}: baseline entry {bad[0]!r} is {values[bad[0]]!r}, expected a byte count >= 0")
    return values


def save_baseline(path: str | os.PathLike, measured: dict[str, int]) -> None:
    """Merge ``measured`` into the baseline at ``path`` (entries not measured this run are kept), atomically."""
    values = {**load_baseline(path), **measured}
    write_json(path, {"about": "held memory growth of each memory benchmark (peak RSS growth less the file pages "
                               "mapped meanwhile), bytes; refresh on purpose only (README: Benchmarks)",
                      BASELINE_KEY: dict(sorted(values.items()))})


def regression(name: str, growth: int, baseline: dict[str, int], *,
               tolerance: float = REGRESSION_TOLERANCE, floor: int = NOISE_FLOOR_BYTES) -> str | None:
    """Why ``growth`` bytes (held memory growth) is a regression for benchmark ``name`` against ``baseline``, or
    None if it is not.

    A benchmark missing from the baseline is a failure too: every memory benchmark must be gated.
    """
    if name not in baseline:
        return f"{name}: no baseline entry; refresh the baseline on purpose (README: Benchmarks)"
    allowed = baseline[name] * (1 + tolerance)
    if growth > allowed and growth - baseline[name] > floor:
        excess = growth / max(baseline[name], 1) - 1
        return (f"{name}: held memory growth {growth / 2**20:.1f} MiB is {excess:+.1%} over "
                f"the baseline {baseline[name] / 2**20:.1f} MiB (allowed: +{tolerance:.0%})")
    return None


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
