"""golden/generate.py, run again, reproduces the committed golden files by what they mean: the encodings with real
AIMET (aimet tier), the tiny pipeline's pictures on the HTP backend (htp tier)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pasd_verify.encodings import load_encodings
from pasd_verify.encodings_check import compare_encodings
from pasd_verify.export.htp import htp_available
from pasd_verify.pipeline.verdicts import Thresholds, picture_figures
from pasd_verify.pipeline.pasd import to_tensor

GOLDEN = Path(__file__).parent.parent / "golden"


def _generator():
    spec = importlib.util.spec_from_file_location("golden_generate", GOLDEN / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.aimet
def test_generate_reproduces_the_golden_files(tmp_path):
    written = _generator().generate(tmp_path)
    committed = sorted(p.name for p in GOLDEN.iterdir() if p.name.startswith("unet_tiny_"))
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


@pytest.mark.htp
@pytest.mark.skipif(htp_available() is not None, reason=str(htp_available()))
def test_generate_reproduces_the_pipeline_pictures(tmp_path):
    generator = _generator()
    written = generator.generate_pipeline(tmp_path)
    committed = sorted(p.name for p in GOLDEN.iterdir() if p.name.startswith("pipeline_tiny_"))
    assert sorted(p.name for p in written) == committed
    fresh, golden = (json.loads((d / generator.PIPELINE_NUMBERS).read_text()) for d in (tmp_path, GOLDEN))
    assert fresh.keys() == golden.keys()
    for key in ("passed", "backend", "steps", "culprit"):  # the verdict the README states
        assert fresh[key] == golden[key], key
    # The fp32 picture is torch on the CPU: another CPU's kernels round differently, which moves a pixel by at most
    # one 8-bit level, never more
    named = generator.PIPELINE_FILES
    fp32 = [np.asarray(Image.open(d / named["picture_fp32.png"]), dtype=np.int16) for d in (tmp_path, GOLDEN)]
    assert fp32[0].shape == fp32[1].shape
    assert np.abs(fp32[0] - fp32[1]).max() <= 1
    # The HTP's picture and the figures also depend on the calibration, whose grids another CPU may move by a step
    # (REFERENCE section 9): each must be the golden one by the pipeline's own criterion of the same picture
    thresholds = Thresholds()
    for name in (named["picture_candidate.png"], named["comparison.png"], named["steps.png"]):
        a, b = (to_tensor(Image.open(d / name)) for d in (tmp_path, GOLDEN))
        assert a.shape == b.shape, name  # the same panels in the same layout
        figures = picture_figures(b, a)
        assert figures["psnr_db"] >= thresholds.picture_psnr_db and figures["ssim"] >= thresholds.picture_ssim, \
            (name, figures)
