"""aimet tier: golden/generate.py, run again with real AIMET, reproduces the committed golden files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pasd_verify.encodings import load_encodings
from pasd_verify.encodings_check import compare_encodings

pytestmark = pytest.mark.aimet

GOLDEN = Path(__file__).parent.parent / "golden"


def _generator():
    spec = importlib.util.spec_from_file_location("golden_generate", GOLDEN / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        # the same encodings by what they mean, on any CPU: names exactly, scales to float tolerance, grids
        # at most one step apart (REFERENCE section 9)
        problems = compare_encodings(fresh, golden, source=name)
        assert not problems, "\n".join(problems[:20])
