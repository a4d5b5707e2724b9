import json
import logging
import warnings

import pytest

from pasd_verify.cli import main
from pasd_verify.logs import library_warnings
from helpers import option_choices


def test_demo_writes_a_passing_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is True
    assert [s["name"] for s in report["stages"]] == [
        "sha_rewrite", "equivalence_fp32", "equivalence_fp64", "checkpoint", "encodings", "undo", "pasd", "adaround",
        "pipeline", "export",
    ]
    assert all(s["status"] == "passed" for s in report["stages"])
    pipeline = next(s for s in report["stages"] if s["name"] == "pipeline")
    # the export stage's figures are those of the exports the pipeline ran on: each network's, from its own report
    export = next(s for s in report["stages"] if s["name"] == "export")
    for network in ("text_encoder", "vae_encoder", "controlnet", "unet", "vae_decoder"):
        own = json.loads((tmp_path / "pipeline" / "exports" / network / "report.json").read_text())
        assert export[f"{network}_sim_vs_qdq_sqnr_db"] == own["stages"]["encodings_and_qdq"]["sim_vs_qdq_sqnr_db"]
    # every network exported and run on the HTP through PASD's loop, judged by the picture against fp32's
    assert pipeline["picture_psnr_db"] >= 20 and pipeline["picture_ssim"] >= 0.8
    assert (tmp_path / pipeline["comparison"]).is_file()
    check = json.loads((tmp_path / "pipeline" / "report.json").read_text())
    assert all(e["passed"] for e in check["exports"].values())
    if pipeline["backend"] == "htp":  # one HTP child per network served every call of every run
        sessions = check["graph_sessions"]
        assert sorted(sessions) == sorted(f"{n}=htp" for n in check["backends"])
        # both guidance halves of each step in the candidate run, teacher forcing and the UNet's attribution run
        assert sessions["unet=htp"]["calls"] == 3 * 2 * pipeline["steps"]
        assert (tmp_path / "pipeline" / "exports" / "unet" / "model_ctx_qnn.bin").is_file()
    printed = capsys.readouterr()
    assert "PASSED" in printed.out
    # every stage's row shows its headline figures (the pipeline's picture PSNR and SSIM among them)
    rows = {line.split()[0]: line for line in printed.out.splitlines() if line.split()[:1] in
            [[s["name"]] for s in report["stages"]]}
    assert sorted(rows) == sorted(s["name"] for s in report["stages"])
    assert all("=" in line.split("PASSED", 1)[1] for line in rows.values()), rows
    assert "picture_psnr_db=" in rows["pipeline"] and "picture_ssim=" in rows["pipeline"]
    # our table and progress only: the tracer, AIMET and aimet-onnx warnings went to the log and are counted
    assert "Warning" not in printed.out + printed.err and "WARNING" not in printed.out + printed.err
    assert report["library_warnings_suppressed"] == sum(s["library_warnings"] for s in report["stages"]) > 0
    assert "warnings from torch, diffusers and AIMET went to the log" in printed.out


def test_library_warnings_go_to_the_log_not_the_terminal(caplog, capsys):
    logger = logging.getLogger("pasd_verify.demo")
    with caplog.at_level(logging.INFO, logger=logger.name), library_warnings("stage", logger) as caught:
        warnings.warn("tracer noise", FutureWarning)
    assert len(caught) == 1
    assert capsys.readouterr().err == ""
    assert any("FutureWarning" in r.getMessage() and "tracer noise" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("command", [
    ["demo"],
    ["convert", "--model-config", "config.json", "--state-dict", "unet.safetensors"],
    ["adaround", "--preset", "tiny", "--samples", "1", "--iterations", "1"],
    ["export", "--preset", "tiny", "--samples", "1"],
])
def test_an_output_location_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "unet.safetensors").write_bytes(b"")
    (tmp_path / "taken").write_text("a file")
    for out in ("taken", "taken/out"):
        assert main([*command, "--out", out]) == 2
        assert "taken: is a file, not a folder" in capsys.readouterr().err
        assert (tmp_path / "taken").read_text() == "a file"


def test_the_rewrites_the_command_line_offers_are_the_exports():
    """cli.py spells the names itself so that --help imports no onnx: what its parser offers must be the export's."""
    from pasd_verify.export.rewrites import REWRITES

    for flag in ("--rewrite", "--no-rewrite"):
        assert option_choices("export", flag) == list(REWRITES), flag


def test_a_rewrite_both_turned_on_and_off_is_refused_before_any_output(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["export", "--preset", "tiny", "--kind", "text-encoder", "--rewrite", "mask-floor", "--no-rewrite",
                 "mask-floor", "--out", str(out)])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("pasd-verify: error: --rewrite mask-floor and --no-rewrite mask-floor "
                                               "contradict each other")
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--psnr-db", "nan"), ("--psnr-db", "inf"), ("--psnr-db", "x"),
                                         ("--ssim", "2"), ("--ssim", "0"), ("--ssim", "nan")])
def test_a_threshold_flag_out_of_range_is_refused_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["pipeline", flag, value, "--out", "unused"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "picture_" not in err
