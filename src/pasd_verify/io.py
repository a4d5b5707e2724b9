"""Atomic file output: write to a temporary file beside the target, rename into place only on success; and the
record of a stop request (SIGINT, SIGTERM, SIGHUP) that no library can swallow, which keeps outputs out of place."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import sys
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
                              inputs: Iterable[str | os.PathLike | None], *, command: str | None = None) -> None:
    """Raise before any work when the outputs cannot be written to ``out_dir`` (a file is in the way, or the folder
    or the nearest existing folder above it is not writable), or when one of the outputs ``out_dir/<name>`` would
    replace one of ``inputs``. With ``command``, the outputs are owned through ``out_dir``'s manifest
    (:func:`refuse_replacing_foreign`): what it does not list, or what cannot be removed, is refused too."""
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
    if command is not None:
        refuse_replacing_foreign(out_dir, output_names, command)


# --- what a command may replace: only what it wrote ----------------------------------------------------------

MANIFEST = ".pasd-verify-outputs.json"
_PINNED = 0x10 | 0x20  # FS_IMMUTABLE_FL, FS_APPEND_FL: not even root may remove such an entry (chattr +i, +a)
_FS_IOC_GETFLAGS = 0x80086601


def _tree(path: Path) -> list[str]:
    """Every entry below the folder ``path`` (links not followed), as sorted POSIX paths relative to it."""
    found = []
    for folder, dirs, files in os.walk(path):
        found += [Path(folder, name).relative_to(path).as_posix() for name in (*dirs, *files)]
    return sorted(found)


def read_manifest(out_dir: str | os.PathLike) -> dict[str, list[str] | None]:
    """What the last run into ``out_dir`` wrote, from its manifest: each output's name, and for a folder every entry
    in it (None for a file). Empty when there is no manifest, or one this version cannot read: then nothing in
    ``out_dir`` counts as written by pasd-verify."""
    try:
        outputs = json.loads((Path(out_dir) / MANIFEST).read_text())["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(outputs, dict):
        return {}
    return {name: entries if isinstance(entries, list) else None for name, entries in outputs.items()}


def _manifest_of(folder: Path, output_names: Iterable[str]) -> dict[str, list[str] | None]:
    found = {}
    for name in output_names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            found[name] = _tree(path)
        elif path.exists() or path.is_symlink():
            found[name] = None
    return found


def _write_manifest(out_dir: Path, command: str, outputs: dict[str, list[str] | None]) -> None:
    write_json(out_dir / MANIFEST, {"tool": "pasd-verify", "command": command, "outputs": outputs})


def _pinned(path: Path) -> bool:
    """Whether ``path`` (a regular file or a folder) carries the immutable or append-only flag, which makes it (or,
    for a folder, its entries) impossible to remove, root or not. Linux only; False where the flags cannot be read."""
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        flags = int.from_bytes(fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))[:4], sys.byteorder)
    except OSError:  # a file system without the flags
        return False
    finally:
        os.close(fd)
    return bool(flags & _PINNED)


def _unremovable(path: Path) -> tuple[Path, str] | None:
    """The first entry of ``path`` (a file, or a folder and everything in it) that cannot be removed, and why; None
    when the whole of it can be. A folder's entries need the folder writable, searchable and unpinned."""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return None
    if _pinned(path):
        return path, "it is marked immutable or append-only (chattr +i / +a)"
    if not stat.S_ISDIR(mode):
        return None
    for folder, dirs, files in os.walk(path):
        folder = Path(folder)
        if dirs or files:
            if not os.access(folder, os.W_OK | os.X_OK):
                return folder / (dirs + files)[0], f"its folder {folder} is not writable"
            if folder != path and _pinned(folder):
                return folder, "it is marked immutable or append-only (chattr +i / +a)"
        for name in files:
            entry = folder / name
            if stat.S_ISREG(entry.lstat().st_mode) and _pinned(entry):
                return entry, "it is marked immutable or append-only (chattr +i / +a)"
    if not os.access(path, os.R_OK | os.X_OK):
        return path, "it cannot be listed"
    return None


def refuse_replacing_foreign(out_dir: str | os.PathLike, output_names: Iterable[str], command: str) -> None:
    """Raise, naming the path, when replacing the outputs in ``out_dir`` would remove anything the last run did not
    write (per ``out_dir``'s manifest: a user's own ``steps/`` folder, or a file a user added into one of ours), or
    anything that cannot be removed: checked before any work, and again before the outputs move, so that a run
    replaces its whole set or nothing."""
    from .errors import OutputFolderError

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    written = read_manifest(out_dir)
    for name in output_names:
        path = out_dir / name
        if not (path.exists() or path.is_symlink()):
            continue
        is_folder = path.is_dir() and not path.is_symlink()
        if name not in written or (written[name] is None) == is_folder:
            raise OutputFolderError(
                f"{path}: this run would replace it, and no earlier `pasd-verify {command}` into {out_dir} wrote it "
                f"(it is not in {out_dir / MANIFEST}); move it away, or choose another --out")
        if is_folder:
            foreign = sorted(set(_tree(path)) - set(written[name]))
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise OutputFolderError(
                    f"{path}: this run would replace this folder, which holds entries no earlier `pasd-verify "
                    f"{command}` wrote ({shown}); move them away, or choose another --out")
        stuck = _unremovable(path)
        if stuck is not None:
            raise OutputFolderError(f"{stuck[0]}: this run would replace {path} and cannot remove it: {stuck[1]}; "
                                    "nothing was written")


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
def staged_outputs(out_dir: str | os.PathLike, output_names: Iterable[str], *,
                   command: str | None = None) -> Iterator[Path]:
    """All or none: yield a hidden staging folder inside ``out_dir`` to write the outputs into; when the block ends
    without error, ``output_names`` are replaced as one set: each one present in staging replaces ``out_dir/<name>``
    (a file, or a folder), and each one absent there is removed from ``out_dir``, so that a folder never mixes the
    outputs of two runs. On any error nothing is moved, and a folder the call created is removed again. The
    staging folder, and whatever else a library left in it, is removed either way.

    The old outputs are first moved aside (renames, which need no right to remove what they hold), then the new ones
    in; a failure part way moves everything back, so ``out_dir`` holds the old set or the new one, never a mix.
    With ``command``, ``out_dir``'s manifest (:data:`MANIFEST`) records what was written, and nothing it does not
    list is replaced (:func:`refuse_replacing_foreign`, checked again here: the folder may have changed while the
    command ran).

    Staged in ``out_dir`` itself, so that every move is a rename on one file system.
    """
    out_dir = Path(out_dir)
    names = list(output_names)
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
            if command is not None:
                refuse_replacing_foreign(out_dir, names, command)
                new = _manifest_of(staging, names)
                # listed before they move, so that a run killed part way leaves nothing the next one calls foreign
                _write_manifest(out_dir, command, {**read_manifest(out_dir), **new})
            _replace_set(out_dir, staging, names)
            if command is not None:
                _write_manifest(out_dir, command, new)
            moved = True
    finally:
        if not moved:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: never a file of someone else's


def _replace_set(out_dir: Path, staging: Path, names: list[str]) -> None:
    """Move every ``out_dir/<name>`` aside into ``staging`` (removed with it), then every ``staging/<name>`` into
    ``out_dir``; on any failure, undo the moves made."""
    aside = staging / ".replaced"
    aside.mkdir()
    undo: list[tuple[Path, Path]] = []
    try:
        for name in names:
            if (out_dir / name).exists() or (out_dir / name).is_symlink():
                os.replace(out_dir / name, aside / name)
                undo.append((aside / name, out_dir / name))
        for name in names:
            if (staging / name).exists():
                os.replace(staging / name, out_dir / name)
                undo.append((out_dir / name, staging / name))
    except BaseException:
        for moved_to, came_from in reversed(undo):
            os.replace(moved_to, came_from)
        raise
