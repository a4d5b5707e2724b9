"""Peak resident memory of a piece of work, measured in a fresh child process.

``tracemalloc`` does not see torch's allocations, and a process that already ran other work has a high-water
mark that says nothing about the next step. So the work runs in a child: it imports what it needs, resets its
high-water mark (``/proc/self/clear_refs``), runs, and reports ``VmHWM`` minus the RSS it started from.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from typing import Any

from .errors import PasdVerifyError


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise PasdVerifyError(f"/proc/self/status has no {field}; peak RSS is measured on Linux only")


def peak_rss_of(target: str, *args: Any, timeout: float | None = None) -> dict[str, float]:
    """Run ``module:function(*args)`` (JSON-able args) in a child; return its memory and time.

    Returns ``{"baseline_bytes", "peak_bytes", "growth_bytes", "seconds", "result"}``: RSS after imports, the
    high-water mark during the call, their difference, the call's wall time and its (JSON-able) return value.
    """
    proc = subprocess.run(
        [sys.executable, "-m", __name__, target, json.dumps(args)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        raise PasdVerifyError(f"child process running {target} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(target: str, args_json: str) -> None:
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    args = json.loads(args_json)
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    result = func(*args)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(json.dumps({
        "baseline_bytes": baseline * 1024, "peak_bytes": peak * 1024, "growth_bytes": (peak - baseline) * 1024,
        "seconds": seconds, "result": result,
    }))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
