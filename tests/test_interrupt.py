"""Interruption is a behaviour: SIGINT, SIGTERM and SIGHUP at several points of the long commands, and a
pasd-verify killed outright, leave no process, no staging folder, no temporary cache and no output folder, and
print one line, not a traceback.

Each test starts the real command in a session of its own (so that every process it started can be found by its
process group) with a private TMPDIR, waits for a point named by the command's own output, signals it, and checks
all four.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pasd_verify.checkpoint import save_state_dict_file
from pasd_verify.io import staged_outputs
from pasd_verify.presets import build_unet

WAIT = 240.0  # seconds for a point to be reached; the tiny models reach each in well under a minute


class Run:
    """``python -m pasd_verify.cli ARGS`` in its own session, output in files, temporary files in ``tmp``."""

    def __init__(self, folder: Path, *args: str):
        self.folder, self.tmp = folder, folder / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = folder / "stdout.txt", folder / "stderr.txt"
        env = {**os.environ, "TMPDIR": str(self.tmp), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pasd_verify.cli", *args], stdout=out, stderr=err,
                                         env=env, cwd=folder, start_new_session=True)

    def text(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def _wait_until(self, reached, what: str, poll: float) -> None:
        deadline = time.monotonic() + WAIT
        while not reached():
            if self.proc.poll() is not None:
                pytest.fail(f"ended (exit {self.proc.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{what} not reached in {WAIT:.0f} s:\n{self.text()[-3000:]}")
            time.sleep(poll)

    def wait_for(self, marker: str) -> None:
        """Until the command has printed ``marker``."""
        self._wait_until(lambda: marker in self.text(), repr(marker), 0.2)

    def wait_for_file(self, pattern: str) -> None:
        """Until a file matching ``pattern`` (a glob under the run's folder) exists."""
        self._wait_until(lambda: any(self.folder.glob(pattern)), pattern, 0.05)

    def ours_in_tmp(self) -> list[str]:
        return sorted(p.name for p in self.tmp.iterdir() if p.name.startswith("pasd-verify-"))

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        if self.group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _assert_stopped_cleanly(run: Run, signum: int, out: Path) -> None:
    code = run.proc.wait(timeout=120)
    err = run.err_path.read_text(errors="replace")
    try:
        assert code == 128 + signum, f"exit {code}:\n{err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        line = f"pasd-verify: interrupted by {signal.Signals(signum).name}: stopped; no output was written"
        assert err.count("pasd-verify: interrupted") == 1 and line in err.splitlines(), err[-3000:]
        deadline = time.monotonic() + 10  # a killed child is reaped by init, not at once
        while run.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not run.group_alive(), "a process of the command outlived it"
        assert run.ours_in_tmp() == []
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    finally:
        run.kill()


@pytest.fixture(scope="module")
def tiny_unet_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-unet")
    unet = build_unet("tiny", seed=0)
    (folder / "config.json").write_text(json.dumps({**unet.config, "_class_name": "UNet2DConditionModel"}))
    save_state_dict_file(unet.state_dict(), folder / "unet.safetensors")
    return folder


@pytest.mark.parametrize("delay", [0.5, 2.0, 3.5, 5.0])
def test_convert_is_all_or_none_whenever_sigterm_comes(tiny_unet_files, tmp_path, delay):
    """convert prints no progress on a tiny model, so the signal comes after a delay: from before the imports end to
    after the outputs are written. Either the whole set is there (exit 0) or nothing (the four checks)."""
    out = tmp_path / "out"
    run = Run(tmp_path, "convert", "--model-config", str(tiny_unet_files / "config.json"), "--state-dict",
              str(tiny_unet_files / "unet.safetensors"), "--out", str(out))
    time.sleep(delay)
    run.proc.send_signal(signal.SIGTERM)
    # finished before the signal (0); or -SIGTERM, the default action, outside main(): before Python reached it (no
    # output) or after it returned, while the interpreter shut down (every output)
    code = run.proc.wait(timeout=120)
    if code in (0, -signal.SIGTERM):
        written = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert written == ["name_map.json", "state_dict_sha.safetensors"] or (code and not out.exists())
        assert run.ours_in_tmp() == []
        return
    _assert_stopped_cleanly(run, signal.SIGTERM, out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_adaround_stopped_with_its_cache_on_disk_leaves_nothing(tmp_path, signum):
    """The disk cache (--cache-budget 0) exists when the signal comes: the first layer's line is out."""
    out = tmp_path / "out"
    run = Run(tmp_path, "adaround", "--preset", "tiny", "--samples", "4", "--iterations", "50", "--cache-budget", "0",
              "--out", str(out))
    run.wait_for("time_embedding.linear_2 mse")
    assert [n for n in run.ours_in_tmp() if n.startswith("pasd-verify-adaround-")], "no disk cache to clean up"
    run.proc.send_signal(signum)
    _assert_stopped_cleanly(run, signum, out)


def test_demo_stopped_between_its_stages_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    run = Run(tmp_path, "demo", "--out", str(out))
    # the checkpoint stage's files are in the staging folder (tqdm skips the lines of stages that end fast)
    run.wait_for_file("out/.pasd-verify-*/state_dict_sha.safetensors")
    run.proc.send_signal(signal.SIGTERM)
    _assert_stopped_cleanly(run, signal.SIGTERM, out)


EXPORT = ("export", "--preset", "tiny", "--kind", "pasd-unet", "--samples", "2")


@pytest.mark.htp
@pytest.mark.parametrize("signum, marker, delay", [
    (signal.SIGTERM, "calibration:", 0.0),      # quantizing and exporting the QDQ graph
    (signal.SIGTERM, "encodings_and_qdq:", 3.0),  # the HTP child compiling
    (signal.SIGHUP, "encodings_and_qdq:", 3.0),  # the terminal closed; SIGINT is tested on adaround
])
def test_export_stopped_at_a_stage_leaves_nothing(tmp_path, signum, marker, delay):
    out = tmp_path / "out"
    run = Run(tmp_path, *EXPORT, "--out", str(out))
    run.wait_for(marker)
    time.sleep(delay)
    run.proc.send_signal(signum)
    _assert_stopped_cleanly(run, signum, out)


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


@pytest.mark.htp
def test_export_killed_outright_takes_its_htp_child_along_and_the_next_run_sweeps_its_folders(tmp_path):
    """SIGKILL runs no cleanup: the HTP child dies with its parent (PR_SET_PDEATHSIG) instead of compiling on as an
    orphan, and the staging and HTP folders it left are removed by the next run that stages into the same place."""
    out = tmp_path / "out"
    run = Run(tmp_path, *EXPORT, "--out", str(out))
    run.wait_for("encodings_and_qdq:")
    deadline = time.monotonic() + 60
    while not (children := _children(run.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert children, "the HTP child never started"
    run.proc.kill()
    run.proc.wait()
    deadline = time.monotonic() + 10
    while run.group_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not run.group_alive(), "the HTP child outlived its killed parent"
    finally:
        run.kill()
    left = [p.name for p in out.iterdir()]
    assert left and all(name.startswith(".pasd-verify-") for name in left)
    assert [n for n in run.ours_in_tmp() if n.startswith("pasd-verify-htp-")]
    with staged_outputs(out, ["x"]) as staging:
        (staging / "x").write_text("next run")
    assert sorted(p.name for p in out.iterdir()) == ["x"]
    from pasd_verify.io import private_folder

    with private_folder("pasd-verify-htp-", run.tmp):
        pass
    assert run.ours_in_tmp() == []


def _file_size_limit(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_disk_that_fills_up_mid_write_is_an_error_naming_the_file_and_leaves_nothing(tiny_unet_files, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the checkpoint's write fails part way, as ENOSPC would."""
    out = tmp_path / "out"
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pasd_verify.cli", "convert", "--model-config",
                           str(tiny_unet_files / "config.json"), "--state-dict", str(tiny_unet_files / "unet.safetensors"),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=_file_size_limit(64 * 1024))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert re.search(r"pasd-verify: error: .*state_dict_sha\.safetensors.*: File too large", done.stderr), done.stderr
    assert not out.exists()


class _SignalsItself(torch.nn.Module):
    """A model whose forward receives SIGTERM: the signal lands while AIMET traces it."""

    def forward(self, x):
        os.kill(os.getpid(), signal.SIGTERM)
        return x * 2


def _swallowing_command(args) -> int:
    """A command that stages an output and, meanwhile, has AIMET build a connected graph of a model that is signalled
    while it is traced. AIMET's bare ``except:`` turns the interruption into an AssertionError, which the command
    handles as a library failure and goes on from, as a demo stage does."""
    from aimet_torch.meta.connectedgraph_utils import get_ops_with_missing_modules

    from pasd_verify.signals import begin_work

    begin_work()  # as every command does once its libraries are imported: signals raise from here on
    with staged_outputs(args.out, ["result.txt"]) as staging:
        (staging / "result.txt").write_text("written after the signal")
        try:
            get_ops_with_missing_modules(_SignalsItself(), torch.zeros(1, 2))
        except AssertionError as e:
            args.swallowed.append(e)
    return 0


def test_a_signal_a_library_swallows_still_stops_the_command_with_nothing_written(tmp_path, monkeypatch, capsys):
    """In this process, with the real command line's handlers and AIMET's real ConnectedGraph: the interruption's
    exception never reaches pasd-verify, yet the command stops with SIGTERM's status and its line, and the output
    it staged after the signal never moves into place. (A demo run signalled during its encodings stage wrote every
    output and exited 1 before the stop request was recorded apart from its exception.)"""
    import argparse

    from pasd_verify import cli

    swallowed: list = []

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.set_defaults(func=_swallowing_command, verbose=False, swallowed=swallowed)
        p.add_argument("--out")
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    code = cli.main(["--out", str(out)])
    assert swallowed and "connected graph failed" in str(swallowed[0]), "AIMET did not swallow the interruption"
    assert code == 128 + signal.SIGTERM
    err = capsys.readouterr().err  # AIMET's own log line may be in it too, depending on the session's handlers
    line = "pasd-verify: interrupted by SIGTERM: stopped; no output was written"
    assert err.count("pasd-verify:") == 1 and line in err.splitlines(), err
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) == before
    # the stop was this command's: the process goes on, and its next outputs are written
    from pasd_verify.io import stop_requested

    assert stop_requested() is None
    with staged_outputs(tmp_path / "next", ["x"]) as staging:
        (staging / "x").write_text("after")
    assert (tmp_path / "next" / "x").read_text() == "after"


def test_a_signal_after_the_verdict_ends_with_the_verdicts_code_and_a_line(tiny_unet_files, tmp_path):
    """The interpreter's shutdown after the verdict takes seconds (torch's and AIMET's teardown; here an exit hook that
    waits, so that the signal surely lands in it): a SIGTERM then must not turn a finished run into a silent 143."""
    out = tmp_path / "out"
    # the hook says when it starts: main() has returned, so the signal lands in the teardown and not in the command
    script = ("import atexit, time; atexit.register(lambda: (print('exiting', flush=True), time.sleep(60))); "
              "from pasd_verify.cli import console_main; console_main()")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, "convert", "--model-config",
                             str(tiny_unet_files / "config.json"), "--state-dict",
                             str(tiny_unet_files / "unet.safetensors"), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:  # convert's verdict (its last line names the last file it wrote), then the hook's
            lines.append(line)
            if line == "exiting\n":
                break
        assert lines[-2:][0].startswith("wrote ") and lines[-1] == "exiting\n", "".join(lines)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, err[-3000:]
    assert "pasd-verify: SIGTERM after the run had finished; its outputs and verdict stand" in err.splitlines()
    assert (out / "state_dict_sha.safetensors").is_file() and (out / "name_map.json").is_file()
