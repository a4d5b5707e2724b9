"""The HTP law of ``pasd-verify check`` on exports: a context binary that agrees with the CPU passes, and a QDQ graph
the HTP miscomputes or dies on (the tiny UNet without the export's exact rewrites: REFERENCE section 8) fails naming
its output or the graph."""

from __future__ import annotations

import json

import pytest

from pasd_verify.cli import main
from pasd_verify.export.htp import htp_available
from pasd_verify.export.pipeline import ExportConfig, export_files
from pasd_verify.kinds import preset_model

pytestmark = [pytest.mark.htp, pytest.mark.skipif(htp_available() is not None, reason=str(htp_available()))]


def _exported(tmp_path, kind: str, form: str = "sha", **config):
    """The tiny model of ``kind`` as a model folder (its MHA weights) and its export (W8A16, of ``form``)."""
    from pasd_verify.sha import convert_to_sha

    model = preset_model("tiny", kind).model
    model.save_pretrained(tmp_path / "model")
    if form == "sha":
        convert_to_sha(model)
    export_files(model, tmp_path / "export", ExportConfig(samples=2, localize=False, **config))
    return tmp_path / "model", tmp_path / "export"


def _htp_law(tmp_path, *args) -> dict:
    code = main(["check", *args, "--law", "htp.agrees-with-cpu", "--out", str(tmp_path / "report")])
    law = json.loads((tmp_path / "report" / "report.json").read_text())["laws"][0]
    return {"code": code, **law}


def test_a_context_binary_that_agrees_with_the_cpu_passes(tmp_path):
    model, export = _exported(tmp_path, "text-encoder")
    law = _htp_law(tmp_path, "--model", str(model), "--qdq", str(export / "model.qdq.onnx"), "--context",
                   str(export / "model_ctx.onnx"))
    assert law["code"] == 0 and law["status"] == "passed", law
    assert law["figures"]["cpu_vs_htp_sqnr_db"] >= law["figures"]["threshold_db"]
    assert law["figures"]["graph"].endswith("model_ctx.onnx")


@pytest.mark.parametrize("form", ["mha", "sha"])
def test_a_graph_the_htp_miscomputes_or_dies_on_fails_naming_it(tmp_path, form):
    """Without the rewrites the HTP miscomputes the MHA UNet (the failure names its output) and kills itself on the
    SHA one with SIGSEGV (the failure names the graph: a crash is a result, not an error of the check)."""
    model, export = _exported(tmp_path, "unet", form, rewrites=())
    qdq = export / "model.qdq.onnx"
    law = _htp_law(tmp_path, "--model", str(model), "--qdq", str(qdq))
    assert law["code"] == 1 and law["status"] == "failed", law
    if form == "mha":
        assert [f["key"] for f in law["failures"]] == ["noise"]
        assert law["figures"]["cpu_vs_htp_sqnr_db"] < law["figures"]["threshold_db"]
    else:
        assert [f["key"] for f in law["failures"]] == [str(qdq)]
        assert "crashed" in law["failures"][0]["message"]


def test_a_context_binary_of_random_bytes_is_named_before_any_law(tmp_path, capsys):
    """A broken context binary is the input's fault: exit 2 naming the file, not a failed HTP law (exit 1) that would
    send a team after an accuracy bug that does not exist."""
    import os

    model, export = _exported(tmp_path, "text-encoder")
    binary = next(export.glob("*_qnn.bin"))
    binary.write_bytes(os.urandom(binary.stat().st_size))
    out = tmp_path / "report"
    code = main(["check", "--model", str(model), "--context", str(export / "model_ctx.onnx"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{export / 'model_ctx.onnx'} (and the context binary it names) cannot be loaded on the HTP" in err
    assert not out.exists()
