"""Atomic file output: write to a temporary file beside the target, rename into place only on success."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def refuse_overwriting_inputs(out_dir: str | os.PathLike, output_names: Iterable[str],
                              inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raise before any work when one of the outputs ``out_dir/<name>`` would replace one of ``inputs``."""
    from .errors import PasdVerifyError

    outputs = {(Path(out_dir) / name).resolve() for name in output_names}
    for path in inputs:
        if path is not None and Path(path).exists() and Path(path).resolve() in outputs:
            raise PasdVerifyError(f"{path}: an output would overwrite this input; choose another --out")


@contextlib.contextmanager
def staged_outputs(out_dir: str | os.PathLike, output_names: Iterable[str]) -> Iterator[Path]:
    """All or none: yield a hidden staging folder inside ``out_dir`` to write the outputs into; when the block ends
    without error, each of ``output_names`` present there replaces ``out_dir/<name>`` (a file, or a folder); on any
    error nothing is moved. The staging folder, and whatever else a library left in it, is removed either way.

    Staged in ``out_dir`` itself, so that every move is a rename on one file system.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pasd-verify-", dir=out_dir))
    try:
        yield staging
        for name in output_names:
            if not (staging / name).exists():
                continue
            target = out_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
