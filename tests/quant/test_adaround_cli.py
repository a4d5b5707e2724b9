"""``pasd-verify adaround``: the outputs AIMET and a user consume, and bad input that gets a clear error and no output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pasd_verify import convert_to_sha
from pasd_verify.checkpoint import load_state_dict_file, save_state_dict_file
from pasd_verify.cli import main
from pasd_verify.encodings import load_encodings
from pasd_verify.encodings_check import check_encodings, compare_encodings
from pasd_verify.presets import build_pasd, build_unet
from pasd_verify.quant.calibration import save_samples, seeded_samples

FAST = ["--iterations", "2", "--latent", "8", "8"]


def test_adaround_preset_writes_every_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["adaround", "--preset", "tiny", "--kind", "pasd-unet", "--samples", "2", *FAST, "--both-versions",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adarounded.safetensors", "param_encodings.encodings", "param_encodings.0.6.1.encodings", "report.json",
         "adaround.png"])
    report = json.loads((out / "report.json").read_text())
    layers = report["layers"]
    sha_unet, _ = build_pasd("tiny", seed=0)
    convert_to_sha(sha_unet)
    conv_or_linear = [n for n, m in sha_unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(r["name"] for r in layers) == sorted(conv_or_linear)
    for r in layers:
        assert r.keys() >= {"name", "shape", "iterations", "mse_nearest", "mse_after", "seconds", "peak_rss_bytes"}
    assert report["totals"]["layers"] == len(layers) and report["samples"] == 2

    # the folded weights load strictly into the SHA model; the encodings name its parameters, in both formats
    sha_unet.load_state_dict(load_state_dict_file(out / "adarounded.safetensors"), strict=True)
    shapes = {n: tuple(p.shape) for n, p in sha_unet.state_dict().items()}
    v1, v0 = load_encodings(out / "param_encodings.encodings"), load_encodings(out / "param_encodings.0.6.1.encodings")
    assert v1["version"] == "1.0.0" and check_encodings(v1, shapes) == []
    assert compare_encodings(v0, v1, sections=("param_encodings",)) == []
    assert {e["name"] for e in v1["param_encodings"]} == {f"{n}.weight" for n in conv_or_linear}
    assert (out / "adaround.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"AdaRounded {len(layers)} layers" in printed and "peak RSS" in printed


@pytest.fixture(scope="module")
def unet_files(tmp_path_factory):
    """A tiny UNet's folder (config + MHA checkpoint) and a folder of two good calibration samples."""
    root = tmp_path_factory.mktemp("adaround-files")
    unet = build_unet("tiny", seed=0)
    unet.save_pretrained(root / "unet")
    save_samples(seeded_samples(unet, 2, latent=(8, 8)), root / "calibration")
    return root


def _adaround_files(root: Path, out: Path, *, calibration: Path | None = None, state_dict: Path | None = None) -> int:
    return main(["adaround", "--model-config", str(root / "unet"),
                 "--state-dict", str(state_dict or root / "unet" / "diffusion_pytorch_model.safetensors"),
                 "--calibration", str(calibration or root / "calibration"), "--iterations", "1", "--out", str(out)])


def test_adaround_on_files_with_a_calibration_folder(unet_files, tmp_path):
    assert _adaround_files(unet_files, tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["samples"] == 2 and report["calibration"] == str(unet_files / "calibration")
    assert report["sample_shapes"]["latent"] == [1, 4, 8, 8]


def _bad_calibration(root: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Calibration folders with one defect each, and what the error must name."""
    good = [load_state_dict_file(p) for p in sorted((root / "calibration").glob("*.safetensors"))]
    cases = {}

    def folder(name: str, second: dict) -> Path:
        path = tmp / name
        save_samples([good[0], second], path)
        return path

    nan = dict(good[1])
    nan["latent"] = nan["latent"].clone()
    nan["latent"][0, 0, 0, 0] = float("nan")
    cases["nan"] = (folder("nan", nan), r"sample_00001\.safetensors: latent holds (1 )?NaN")
    text = good[1]["encoder_hidden_states"]
    cases["0 tokens"] = (folder("tokens", {**good[1], "encoder_hidden_states": text[:, :0]}),
                         r"sample_00001\.safetensors: encoder_hidden_states has shape \(1, 0, 32\), which holds nothing")
    cases["batch 0"] = (folder("batch", {k: v[:0] if v.ndim else v for k, v in good[1].items()}),
                        r"sample_00001\.safetensors: \w+ has shape \(0, .*which holds nothing")
    cases["0x0 latent"] = (folder("hw", {**good[1], "latent": good[1]["latent"][:, :, :0, :0]}),
                           r"sample_00001\.safetensors: latent has shape \(1, 4, 0, 0\), which holds nothing")
    cases["integer latent"] = (folder("int", {**good[1], "latent": good[1]["latent"].to(torch.int32)}),
                               r"sample_00001\.safetensors: latent has dtype int32; expected floating point")
    cases["timestep 1e30"] = (folder("t", {**good[1], "timestep": torch.tensor([1e30])}),
                              r"sample_00001\.safetensors: timestep 1e\+30 is outside \[0, 1000\]")
    cases["negative timestep"] = (folder("t-", {**good[1], "timestep": torch.tensor([-1])}),
                                  r"sample_00001\.safetensors: timestep -1 is outside \[0, 1000\]")
    cases["bool timestep"] = (folder("tb", {**good[1], "timestep": torch.tensor([True])}),
                              r"sample_00001\.safetensors: timestep has dtype bool")
    missing = {k: v for k, v in good[1].items() if k != "encoder_hidden_states"}
    cases["missing key"] = (folder("missing", missing), r"sample_00001\.safetensors: missing key 'encoder_hidden_states'")
    cases["wrong shape"] = (folder("shape", {**good[1], "latent": torch.randn(1, 3, 8, 8)}),
                            r"sample_00001\.safetensors: latent has shape \(1, 3, 8, 8\)")
    cases["other size"] = (folder("size", {**good[1], "latent": torch.randn(1, 4, 16, 16)}),
                           r"sample_00001\.safetensors: latent has shape \(1, 4, 16, 16\), the first sample")
    truncated = tmp / "truncated"
    save_samples(good, truncated)
    data = (truncated / "sample_00001.safetensors").read_bytes()
    (truncated / "sample_00001.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (truncated, r"sample_00001\.safetensors")
    (tmp / "empty").mkdir()
    cases["empty"] = (tmp / "empty", r"empty: no \.safetensors calibration samples")
    return cases


def test_bad_calibration_gets_an_error_naming_file_and_key_and_leaves_nothing(unet_files, tmp_path, capsys):
    for case, (folder, expected) in _bad_calibration(unet_files, tmp_path).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        assert _adaround_files(unet_files, out, calibration=folder) == 2, case
        err = capsys.readouterr().err
        assert re.search(expected, err), (case, err)
        assert not out.exists() or not any(out.iterdir()), case


def test_checkpoint_of_another_model_is_refused_naming_the_key(unet_files, tmp_path, capsys):
    other = build_unet("tiny", seed=0)
    state = {k: v for k, v in other.state_dict().items() if not k.startswith("conv_out")}
    state["conv_out.extra"] = torch.zeros(1)
    save_state_dict_file(state, tmp_path / "other.safetensors")
    out = tmp_path / "out"
    assert _adaround_files(unet_files, out, state_dict=tmp_path / "other.safetensors") == 2
    err = capsys.readouterr().err
    assert "other.safetensors" in err and "conv_out" in err
    assert not out.exists()


def test_adaround_refuses_an_output_folder_holding_its_input(unet_files, tmp_path, capsys):
    folder = tmp_path / "in"
    save_state_dict_file(build_unet("tiny", seed=0).state_dict(), folder / "adarounded.safetensors")
    before = (folder / "adarounded.safetensors").read_bytes()
    assert _adaround_files(unet_files, folder, state_dict=folder / "adarounded.safetensors") == 2
    assert "would overwrite this input" in capsys.readouterr().err
    assert (folder / "adarounded.safetensors").read_bytes() == before


def test_float16_calibration_samples_feed_a_float32_model_cast(unet_files, tmp_path):
    """As diffusers' pipelines cast their inputs: a sample saved in float16 is not a fault (found by the thorough
    bad-input run, where it failed inside the model's forward)."""
    from pasd_verify.quant.calibration import load_samples

    good = [load_state_dict_file(p) for p in sorted((unet_files / "calibration").glob("*.safetensors"))]
    save_samples([{k: v.half() if k != "timestep" else v for k, v in s.items()} for s in good], tmp_path / "half")
    unet = build_unet("tiny", seed=0)
    loaded = load_samples(tmp_path / "half", unet)
    for sample, original in zip(loaded, good):
        assert sample["latent"].dtype == torch.float32 and sample["timestep"].dtype == original["timestep"].dtype
        assert torch.equal(sample["latent"], original["latent"].half().float())
