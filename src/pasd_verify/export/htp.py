"""Compile a QDQ graph for Qualcomm's HTP and run it there (emulated on x86_64), in a child process.

onnxruntime-qnn ships the QNN HTP backend as an onnxruntime plugin execution provider (REFERENCE section 8). The
compile is the same graph prepare + finalize that makes the context binary a phone loads; running it executes the
HTP's fixed-point arithmetic in emulation, which is not phone latency. The backend can kill its process (a
segmentation fault creating or running some graphs), so every compile and run happens in a child whose crash is a
result (which graph, which signal), never the caller's death. ``session.disable_cpu_ep_fallback`` makes a node the
HTP cannot take an error, so a graph that runs here ran wholly on the HTP.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..io import private_folder

# The child is a script run by path: it imports onnxruntime and numpy only and starts in a tenth of a second, where
# ``python -m pasd_verify.export.htp`` spent 6-7 s importing torch and diffusers for the package; localization and
# the benchmarks start dozens of children.
CHILD = Path(__file__).with_name("htp_child.py")
DEFAULT_SOC_MODEL = "57"  # Snapdragon 8 Gen 3 (HTP v75); without a soc_model the first finalize fails (1002)


def htp_available() -> str | None:
    """None when the HTP backend can be used here, else why not (the steps are then reported as skipped)."""
    try:
        importlib.import_module("onnxruntime_qnn")
    except ImportError as e:
        return f"onnxruntime-qnn is not installed on this platform ({e})"
    return None


@dataclass
class HtpResult:
    """What one child did: ``status`` is passed, failed (an error from onnxruntime), crashed (a signal),
    timeout or skipped; outputs are present only when it passed."""

    status: str
    compile_seconds: float | None = None
    run_seconds: float | None = None
    error: str | None = None
    profile: dict | None = None
    peak_rss_bytes: int | None = None  # the child's own high-water mark: compile and run happen there
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("outputs")
        return d


def parse_profile(path: str | os.PathLike) -> dict:
    """The HTP backend's own profile (provider option ``profiling_level: detailed``): graph finalize time, the
    emulated accelerator cycles of one execution, the number of HTP ops, and the cycles of attention's matmuls and
    softmaxes (ops named ``.../attn1/...`` or ``.../attn2/...``). Emulated estimates, not phone latency."""
    finalize_us = cycles = 0
    ops = attention = 0
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            event, value = row["Event Identifier"], int(row["Time"])
            if event == "QNN (finalize) time":
                finalize_us = value
            elif event == "Accelerator (execute) time (cycles)":
                cycles = value
            elif row["Message"] == "NODE":
                ops += 1
                if re.search(r"/attn[12]/", event) and re.search(r"MatMul|Softmax|matmul|softmax", event):
                    attention += value
    return {"finalize_ms": finalize_us / 1000, "execute_cycles": cycles, "htp_ops": ops,
            "attention_matmul_softmax_cycles": attention}


def run_on_htp(graph: str | os.PathLike, feeds: dict[str, np.ndarray], *, soc_model: str = DEFAULT_SOC_MODEL,
               context_path: str | os.PathLike | None = None, timeout: float = 3600.0,
               profile: bool = False) -> HtpResult:
    """Compile ``graph`` for the HTP (writing the context model at ``context_path`` when given) and run ``feeds``;
    with ``profile``, the result carries :func:`parse_profile`'s numbers."""
    missing = htp_available()
    if missing:
        return HtpResult("skipped", error=missing)
    with private_folder("pasd-verify-htp-") as tmp:
        np.savez(tmp / "feeds.npz", **feeds)
        command = [sys.executable, str(CHILD), str(graph), str(tmp / "feeds.npz"), str(tmp),
                   soc_model, str(context_path or ""), str(tmp / "profile.csv") if profile else "", str(os.getpid())]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return HtpResult("timeout", error=f"no result after {timeout:.0f} s")
        times = json.loads((tmp / "times.json").read_text()) if (tmp / "times.json").exists() else {}
        if done.returncode < 0:
            name = signal.Signals(-done.returncode).name
            stage = "running" if "compile_seconds" in times else "compiling"
            return HtpResult("crashed", times.get("compile_seconds"), error=f"{name} while {stage} {Path(graph).name}")
        if done.returncode != 0:
            return HtpResult("failed", times.get("compile_seconds"), error=_last_error(done.stderr))
        profiled = parse_profile(tmp / "profile.csv") if profile and (tmp / "profile.csv").exists() else None
        with np.load(tmp / "outputs.npz") as outputs:
            return HtpResult("passed", times["compile_seconds"], times["run_seconds"], profile=profiled,
                             peak_rss_bytes=times.get("peak_rss_bytes"), outputs={k: outputs[k] for k in outputs.files})


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "[W:onnxruntime" not in line]
    return "\n".join(lines[-3:]) or "the child exited without a message"


class HtpSessionError(RuntimeError):
    """The HTP child of an :class:`HtpSession` failed a call, or died (the signal is in the message)."""


@dataclass
class _Node:
    name: str
    shape: tuple = ()


class HtpSession:
    """One graph kept loaded on the HTP backend in a child process for many calls (a pipeline's steps), with
    onnxruntime's ``InferenceSession`` calls (``get_inputs``, ``get_outputs``, ``run``). A QDQ graph is compiled
    when the child starts; a context model (``model_ctx.onnx``) is loaded as compiled. The child's death, a signal
    from the backend included, raises :class:`HtpSessionError` naming the graph and signal; the caller lives on."""

    def __init__(self, graph: str | os.PathLike, *, soc_model: str = DEFAULT_SOC_MODEL):
        missing = htp_available()
        if missing:
            raise HtpSessionError(missing)
        self.graph = Path(graph)
        self._folder_context = private_folder("pasd-verify-htp-session-")
        self._folder = self._folder_context.__enter__()
        self._stderr = open(self._folder / "stderr.txt", "w+")
        self._child = subprocess.Popen([sys.executable, str(CHILD), "serve", str(graph), soc_model, str(os.getpid())],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.calls = 0
        self.run_seconds = 0.0
        self.peak_rss_bytes = 0
        header = self._reply("loading")
        self._inputs = [_Node(name, tuple(shape)) for name, shape in header["inputs"]]
        self._outputs = [_Node(name) for name in header["outputs"]]
        self.load_seconds = header["load_seconds"]

    def _reply(self, doing: str) -> dict:
        line = self._child.stdout.readline()
        if not line:
            code = self._child.wait()
            self._stderr.seek(0)
            why = signal.Signals(-code).name if code < 0 else f"exit status {code}: {_last_error(self._stderr.read())}"
            self.close()
            raise HtpSessionError(f"the HTP child died ({why}) while {doing} {self.graph}")
        try:
            return json.loads(line)
        except ValueError:
            self.close()
            raise HtpSessionError(f"the HTP child answered {line[:200]!r} while {doing} {self.graph}") from None

    def get_inputs(self) -> list[_Node]:
        return self._inputs

    def get_outputs(self) -> list[_Node]:
        return self._outputs

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._child is None:
            raise HtpSessionError(f"the HTP session of {self.graph} is closed")
        feeds_path, out = self._folder / "feeds.npz", self._folder / "outputs.npz"
        np.savez(feeds_path, **feeds)
        self._child.stdin.write(f"{feeds_path} {out}\n")
        self._child.stdin.flush()
        reply = self._reply(f"running call {self.calls + 1} of")
        if "error" in reply:
            raise HtpSessionError(f"{self.graph}: {reply['error']}")
        self.calls += 1
        self.run_seconds += reply["run_seconds"]
        self.peak_rss_bytes = max(self.peak_rss_bytes, reply["peak_rss_bytes"])
        with np.load(out) as outputs:
            return [outputs[name] for name in names]

    def close(self) -> None:
        """End the child (its stdin closes; it is killed if it does not end in 10 s) and remove the exchange folder."""
        if self._child is not None:
            child, self._child = self._child, None
            try:
                child.stdin.close()
                child.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                child.kill()
                child.wait()
            self._stderr.close()
            self._folder_context.__exit__(None, None, None)

    def __enter__(self) -> HtpSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def context_load_error(context_model: str | os.PathLike) -> str | None:
    """Why the compiled context model (``model_ctx.onnx`` and the binary it names) does not load on the HTP backend,
    or None where it loads, or where no backend is installed to load it with. Loading is not compiling (a tenth of a
    second for the tiny networks): a binary of random bytes, or built for another SoC, is found here as the broken
    file it is, before a command reports it as the network's failure."""
    if htp_available() is not None:
        return None
    try:
        HtpSession(context_model).close()
    except HtpSessionError as e:
        return str(e)
    return None
