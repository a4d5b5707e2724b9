"""The child that compiles and runs a QDQ graph on Qualcomm's HTP backend (:func:`pasd_verify.export.htp.run_on_htp`
starts it, and reports a crash as a result). A script run by path, importing nothing of pasd_verify: its start costs
onnxruntime's import alone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np


def _peak_rss_bytes() -> int:
    """VmHWM, as pasd_verify.memory reads it (that module imports the package, which this script must not)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent ends (prctl PR_SET_PDEATHSIG): a pasd-verify killed outright
    must not leave a compile running as an orphan that writes into its removed folders. Where prctl is missing the
    parent's own cleanup (it kills the child on SIGINT and SIGTERM) is all there is."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(1)


def open_session(graph: str, soc_model: str, context_path: str = "", profile_path: str = ""):
    """An onnxruntime session of ``graph`` on the HTP backend alone (no CPU fallback): a QDQ graph is compiled
    (and its context model written at ``context_path`` when given); a context model is loaded as it is."""
    import onnxruntime as ort
    import onnxruntime_qnn

    ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_path:
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_file_path", context_path)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    provider = {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), "soc_model": soc_model}
    if profile_path:
        provider.update(profiling_level="detailed", profiling_file_path=profile_path)
    options.add_provider_for_devices(devices, provider)
    return ort.InferenceSession(graph, options)


def main(graph: str, feeds_path: str, out: str, soc_model: str, context_path: str, profile_path: str) -> None:
    """Compile ``graph`` for the HTP (the context model at ``context_path`` when given), run the feeds in
    ``feeds_path``; write ``outputs.npz`` and ``times.json`` (compile and run seconds, peak RSS) into ``out``."""
    times = {}
    started = time.perf_counter()
    session = open_session(graph, soc_model, context_path, profile_path)
    times["compile_seconds"] = time.perf_counter() - started
    Path(out, "times.json").write_text(json.dumps(times))  # a crash while running still tells the compile time
    with np.load(feeds_path) as f:
        wanted = {i.name for i in session.get_inputs()}
        feeds = {k: f[k] for k in f.files if k in wanted}
    names = [o.name for o in session.get_outputs()]
    started = time.perf_counter()
    outputs = session.run(names, feeds)
    times["run_seconds"] = time.perf_counter() - started
    times["peak_rss_bytes"] = _peak_rss_bytes()
    np.savez(Path(out, "outputs.npz"), **dict(zip(names, outputs)))
    Path(out, "times.json").write_text(json.dumps(times))


def serve(graph: str, soc_model: str) -> None:
    """Keep ``graph``'s HTP session for many calls (a pipeline's steps): one JSON line on stdout with the graph's
    inputs and outputs once it is loaded, then for each stdin line "FEEDS OUT" the outputs of FEEDS in OUT and one
    JSON line (the run's seconds, or the error). Ends at the end of stdin."""
    # the protocol keeps the real stdout; what onnxruntime and QNN print goes to stderr instead
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    started = time.perf_counter()
    session = open_session(graph, soc_model)
    header = {"inputs": [[i.name, i.shape] for i in session.get_inputs()],
              "outputs": [o.name for o in session.get_outputs()], "load_seconds": time.perf_counter() - started}
    print(json.dumps(header), file=channel, flush=True)
    names = header["outputs"]
    for line in sys.stdin:
        feeds_path, out = line.split()
        started = time.perf_counter()
        try:
            with np.load(feeds_path) as f:
                outputs = session.run(names, {k: f[k] for k in f.files})
            np.savez(out, **dict(zip(names, outputs)))
            reply = {"run_seconds": time.perf_counter() - started, "peak_rss_bytes": _peak_rss_bytes()}
        except Exception as e:  # onnxruntime's errors: reported to the parent, the session stays
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), file=channel, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        die_with_parent(int(sys.argv[4]))
        serve(sys.argv[2], sys.argv[3])
    else:
        die_with_parent(int(sys.argv[7]))
        main(*sys.argv[1:7])
