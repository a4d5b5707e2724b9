"""Verify an MHA -> SHA port made by any tool: the laws of :mod:`pasd_verify.port.laws` on whatever subset of its
files a user has (``pasd-verify check``, and the pytest plugin of :mod:`pasd_verify.port.plugin`), the heads matched
by name (:mod:`pasd_verify.port.names`) and reported as a table, ``report.json`` and JUnit XML.

The names below are imported when first used (PEP 562): pytest loads the plugin in every run of an environment that
has pasd-verify installed, and a run that names no port must not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib

_WHERE = {"LAWS": "laws", "Failure": "laws", "Law": "laws", "LawResult": "laws", "Port": "laws",
          "PortArtifacts": "laws", "check_port": "laws", "run_law": "laws",
          "HeadNames": "names", "infer_head_names": "names", "load_head_names": "names"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
