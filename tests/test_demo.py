"""The demo's stages tell the truth: a stage whose input a failed stage would have made is skipped, naming it, and
never passes on a stand-in (the whole demo passing is tests/test_cli.py)."""

from __future__ import annotations

import pytest

from pasd_verify import demo
from pasd_verify.name_map import NameMap

NEEDS_THE_REWRITE = ("equivalence_fp32", "equivalence_fp64", "checkpoint", "undo")


def _raises(model):
    raise RuntimeError("the rewrite broke")


@pytest.mark.parametrize("broken", [_raises, lambda model: NameMap()], ids=["raises", "converts-nothing"])
def test_a_failed_rewrite_skips_every_stage_that_needs_it(tmp_path, monkeypatch, broken):
    monkeypatch.setattr(demo, "convert_to_sha", broken)
    chosen = [s for s in demo.STAGES if s.name in ("sha_rewrite", *NEEDS_THE_REWRITE, "pasd")]
    report = demo.run_demo(tmp_path, stages=chosen, progress=False)
    stages = {s["name"]: s for s in report["stages"]}
    assert report["passed"] is False
    assert stages["sha_rewrite"]["status"] == "failed"
    for name in NEEDS_THE_REWRITE:
        assert stages[name]["status"] == "skipped", name
        assert stages[name]["reason"].endswith("from sha_rewrite, which did not pass"), name
        assert "relative_error" not in stages[name]
    # the PASD stage rewrites its own pair: with the rewrite broken it fails instead of comparing a model with itself
    assert stages["pasd"]["status"] == "failed"
    assert not (tmp_path / "state_dict_sha.safetensors").exists()


def test_with_a_working_rewrite_the_dependent_stages_run_and_pass(tmp_path):
    chosen = [s for s in demo.STAGES if s.name in ("sha_rewrite", *NEEDS_THE_REWRITE)]
    report = demo.run_demo(tmp_path, stages=chosen, progress=False)
    assert [(s["name"], s["status"]) for s in report["stages"]] == [(s.name, "passed") for s in chosen]
