"""``pasd-verify check``: the laws on a port's files, written as ``report.json`` and ``junit.xml`` (both or none)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ..errors import PasdVerifyError
from ..io import refuse_overwriting_inputs, staged_outputs, write_json
from .artifacts import LawResult, Port, PortArtifacts
from .laws import check_port, missing_artifacts, select_laws
from .report import junit_xml, report

OUTPUTS = ("report.json", "junit.xml")


def check_files(out_dir: str | os.PathLike, artifacts: PortArtifacts, *, laws: list[str] | None = None,
                seed: int = 0, progress: Callable[[str], None] | None = None) -> tuple[list[LawResult], dict[str, Any]]:
    """Check every law the ``artifacts`` allow (or those named in ``laws``) and write ``report.json`` and
    ``junit.xml`` into ``out_dir``. Every input is read before any law runs: an unreadable one raises
    :class:`~pasd_verify.errors.PasdVerifyError` naming it, and nothing is written."""
    refuse_overwriting_inputs(out_dir, OUTPUTS, [getattr(artifacts, k) for k in sorted(artifacts.given() - {"kind"})])
    chosen = select_laws(laws)
    started = time.perf_counter()
    port = Port(artifacts, seed=seed)
    _refuse_unanswerable(port, chosen, named=bool(laws))
    results = check_port(port, chosen, progress=progress)
    extra = {"seconds": round(time.perf_counter() - started, 3), "seed": seed}
    if hasattr(port, "heads"):
        extra["head_names"] = {"scheme": port.heads.scheme, "patterns": port.heads.templates()}
    body = report(results, artifacts, extra)
    with staged_outputs(out_dir, OUTPUTS) as staging:
        write_json(staging / "report.json", body)
        (staging / "junit.xml").write_text(junit_xml(results), encoding="utf-8")
    return results, body


def _refuse_unanswerable(port: Port, chosen, *, named: bool) -> None:
    """Before any law runs: a law asked for by name must have its files, and some law must (a check that checks
    nothing would exit 0)."""
    lacking = {law.name: missing_artifacts(port, law) for law in chosen}
    if named:
        lacking = {name: flags for name, flags in lacking.items() if flags}
        if lacking:
            raise PasdVerifyError("; ".join(f"--law {name} needs {', '.join(flags)}" for name, flags in lacking.items())
                                  + ": give those files, or leave the law out")
    elif all(lacking.values()):
        nearest = min(lacking, key=lambda name: len(lacking[name]))
        raise PasdVerifyError(f"no law can be checked on the files given; the nearest, {nearest}, needs "
                              f"{', '.join(lacking[nearest])}")
