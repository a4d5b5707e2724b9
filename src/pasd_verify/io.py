"""Atomic file output: write to a temporary file beside the target, rename into place only on success; and the
record of a stop request (SIGINT, SIGTERM, SIGHUP) that no library can swallow, which keeps outputs out of place."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is, as SIGINT raises KeyboardInterrupt: every ``finally`` runs, so
    the staging folders, temporary caches and HTP children go as they do on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_stop_requested: int | None = None  # the first ending signal of this run, see interrupt()


def interrupt(signum: int) -> NoReturn:
    """Record that the run was asked to stop, and raise :class:`Interrupted` where it is.

    The exception alone is not enough: a library's bare ``except:`` can swallow it (AIMET's ConnectedGraph turns
    every error raised while it traces a model, this one included, into an AssertionError, which a demo stage then
    reports as a failure and goes on). The record stays, and :func:`staged_outputs` refuses to put outputs in place
    once it is set."""
    global _stop_requested
    if _stop_requested is None:
        _stop_requested = signum
    raise Interrupted(signum)


def stop_requested() -> int | None:
    """The signal that asked this run to stop, or None."""
    return _stop_requested


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` again when a stop was requested: between the steps of a long loop, and before
    outputs move into place, whether or not a library swallowed the first one."""
    if _stop_requested is not None:
        raise Interrupted(_stop_requested)


def clear_stop_request() -> None:
    """Forget a stop request: a new command starts (several run in one process in tests and callers' scripts)."""
    global _stop_requested
    _stop_requested = None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed.

    Readers never see a half-written file, and a failed run leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the output should look like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if e.filename is None:  # a write on an open file (a full disk) names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# JSON has no infinity or NaN; Python writes the bare words Infinity and NaN, which most parsers refuse (Node's
# JSON.parse throws, jq reads 1.8e308). A non-finite float is written as one of these strings instead: Python's
# float() and JavaScript's Number() both read them back.
NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _finite_json(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else NON_FINITE[obj]
    if isinstance(obj, dict):
        return {key: _finite_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(value) for value in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON, atomically; a non-finite float is written as the string
    ``"Infinity"``, ``"-Infinity"`` or ``"NaN"``."""
    text = json.dumps(_finite_json(obj), indent=2, sort_keys=False, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def refuse_overwriting_inputs(out_dir: str | os.PathLike, output_names: Iterable[str],
                              inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raise before any work when the outputs cannot be written to ``out_dir`` (a file is in the way, or the folder
    or the nearest existing folder above it is not writable), or when one of the outputs ``out_dir/<name>`` would
    replace one of ``inputs``."""
    from .errors import PasdVerifyError

    out_dir = Path(out_dir)
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise PasdVerifyError(f"{existing}: a broken symbolic link is in the way of the output folder")
        existing = existing.parent
    if not existing.is_dir():
        raise PasdVerifyError(f"{existing}: is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PasdVerifyError(f"{existing}: no permission to write there; choose another --out")
    outputs = {(out_dir / name).resolve() for name in output_names}
    for path in inputs:
        if path is not None and Path(path).exists() and Path(path).resolve() in outputs:
            raise PasdVerifyError(f"{path}: an output would overwrite this input; choose another --out")


_OWNED = re.compile(r"-(\d+)-[^-]*$")


def _sweep_orphans(folder: Path, prefix: str) -> None:
    """Remove ``folder/<prefix><pid>-*`` folders whose process is gone: what a run killed outright (SIGKILL, a power
    cut) left behind, which no ``finally`` of its own could remove."""
    with contextlib.suppress(OSError):
        for path in folder.glob(f"{prefix}*"):
            owner = _OWNED.search(path.name)
            if owner is None or not path.is_dir() or int(owner.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(owner.group(1)), 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except OSError:  # alive, someone else's
                pass


@contextlib.contextmanager
def private_folder(prefix: str, dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """A temporary folder ``<dir>/<prefix><pid>-XXXX``, removed when the block ends however it ends (an exception,
    SIGINT, or SIGTERM turned into one by the command line). Creating one first removes the folders of the same
    prefix whose process no longer exists."""
    folder = Path(dir if dir is not None else tempfile.gettempdir())
    _sweep_orphans(folder, prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=folder))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_outputs(out_dir: str | os.PathLike, output_names: Iterable[str]) -> Iterator[Path]:
    """All or none: yield a hidden staging folder inside ``out_dir`` to write the outputs into; when the block ends
    without error, ``output_names`` are replaced as one set: each one present in staging replaces ``out_dir/<name>``
    (a file, or a folder), and each one absent there is removed from ``out_dir``, so that a folder never mixes the
    outputs of two runs. On any error nothing is moved, and a folder the call created is removed again. The
    staging folder, and whatever else a library left in it, is removed either way.

    Staged in ``out_dir`` itself, so that every move is a rename on one file system.
    """
    out_dir = Path(out_dir)
    created = []  # the folders this call makes, deepest last
    folder = out_dir
    while not folder.exists():
        created.insert(0, folder)
        folder = folder.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    moved = False
    try:
        with private_folder(".pasd-verify-", out_dir) as staging:
            yield staging
            raise_if_interrupted()  # a swallowed stop request still means: nothing written
            for name in output_names:
                target = out_dir / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                if (staging / name).exists():
                    os.replace(staging / name, target)
                elif target.exists() or target.is_symlink():
                    target.unlink()  # an earlier run's output this run did not write
            moved = True
    finally:
        if not moved:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: never a file of someone else's
