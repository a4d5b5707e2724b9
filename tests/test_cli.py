import json

from pasd_verify.cli import main


def test_demo_writes_a_passing_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is True
    assert [s["name"] for s in report["stages"]] == [
        "sha_rewrite", "equivalence_fp32", "equivalence_fp64", "checkpoint", "encodings", "undo", "pasd"
    ]
    assert all(s["status"] == "passed" for s in report["stages"])
    assert "PASSED" in capsys.readouterr().out
