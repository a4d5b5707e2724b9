"""aimet tier: golden/generate.py, run again with real AIMET, reproduces the committed golden files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pasd_verify.encodings import load_encodings
from test_encodings import close

pytestmark = pytest.mark.aimet

GOLDEN = Path(__file__).parent.parent / "golden"


def _generator():
    spec = importlib.util.spec_from_file_location("golden_generate", GOLDEN / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _by_name(section):
    return dict(section) if isinstance(section, dict) else {e["name"]: e for e in section}


def test_generate_reproduces_the_golden_files(tmp_path):
    written = _generator().generate(tmp_path)
    committed = sorted(p.name for p in GOLDEN.iterdir() if p.suffix in (".encodings", ".json"))
    assert sorted(p.name for p in written) == committed
    for name in committed:
        if name.endswith(".json"):
            assert json.loads((tmp_path / name).read_text()) == json.loads((GOLDEN / name).read_text())
            continue
        fresh, golden = load_encodings(tmp_path / name), load_encodings(GOLDEN / name)
        assert fresh.keys() == golden.keys(), name
        for section in ("param_encodings", "activation_encodings"):
            a, b = _by_name(fresh[section]), _by_name(golden[section])
            assert a.keys() == b.keys(), f"{name}: {section} names differ"  # names exactly
            assert close(a, b, rel=1e-5), f"{name}: {section} numbers differ"  # numbers to float tolerance
