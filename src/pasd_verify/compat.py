"""Make basicsr 1.4.2 importable with current torchvision.

basicsr 1.4.2 (its last release) imports ``torchvision.transforms.functional_tensor`` from its package
``__init__`` (via ``basicsr/data/degradations.py``); torchvision 0.17 removed that module, so even
``from basicsr.archs.rrdbnet_arch import RRDB`` fails. The functions basicsr uses from it live on in
``torchvision.transforms.functional``, so registering that module under the old name before basicsr's first
import is enough. Upstream fixed this after the release (BasicSR #650); drop this module when a release has it.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_REMOVED = "torchvision.transforms.functional_tensor"


def install_torchvision_alias() -> None:
    """Register the removed torchvision module name as an alias of its successor, if it is missing."""
    if _REMOVED in sys.modules:
        return
    try:
        importlib.import_module(_REMOVED)
    except ModuleNotFoundError:
        sys.modules[_REMOVED] = importlib.import_module("torchvision.transforms.functional")


def import_basicsr_module(name: str) -> ModuleType:
    """Import ``basicsr.<name>`` (e.g. ``"archs.rrdbnet_arch"``) with the alias in place."""
    install_torchvision_alias()
    return importlib.import_module(f"basicsr.{name}")


def rrdb_class() -> type:
    """basicsr's own ``RRDB`` (residual-in-residual dense block) class."""
    return import_basicsr_module("archs.rrdbnet_arch").RRDB
