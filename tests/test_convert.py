"""`pasd-verify convert`: the whole conversion on files, with clear errors and no partial output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pasd_verify.checkpoint import save_state_dict_file
from pasd_verify.cli import main
from pasd_verify import convert_to_sha
from pasd_verify.presets import build_pasd, build_unet

GOLDEN = Path(__file__).parent.parent / "golden"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny UNet's config and MHA checkpoint in both formats, and AIMET's MHA encodings."""
    folder = tmp_path_factory.mktemp("inputs")
    unet = build_unet("tiny", seed=0)
    (folder / "config.json").write_text(json.dumps({**unet.config, "_class_name": "UNet2DConditionModel"}))
    save_state_dict_file(unet.state_dict(), folder / "unet.safetensors")
    save_state_dict_file(unet.state_dict(), folder / "unet.pth")
    return folder


def _run(*args) -> int:
    return main(["convert", *map(str, args)])


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_convert_writes_checkpoint_encodings_and_name_map(inputs, tmp_path, suffix, capsys):
    encodings = GOLDEN / "unet_tiny_mha_per_channel_1.0.0.encodings"
    before = {p: p.read_bytes() for p in (inputs / f"unet.{suffix}", encodings)}
    assert _run("--model-config", inputs / "config.json", "--state-dict", inputs / f"unet.{suffix}",
                "--encodings", encodings, "--out", tmp_path / "out") == 0
    assert _files(tmp_path / "out") == sorted(["name_map.json", "parameters_sha.encodings", f"state_dict_sha.{suffix}"])
    out = capsys.readouterr().out
    assert "param_encodings_split" in out and "problems" in out
    assert all(p.read_bytes() == data for p, data in before.items())
    name_map = json.loads((tmp_path / "out" / "name_map.json").read_text())
    assert name_map == json.loads((GOLDEN / "unet_tiny_name_map.json").read_text())


def test_convert_pasd_models_from_their_configs(tmp_path):
    unet, controlnet = build_pasd("tiny", seed=0)
    for model, name in ((unet, "unet"), (controlnet, "controlnet")):
        model.save_pretrained(tmp_path / name)  # config.json + diffusion_pytorch_model.safetensors
        assert _run("--model-config", tmp_path / name, "--state-dict",
                    tmp_path / name / "diffusion_pytorch_model.safetensors", "--out", tmp_path / f"{name}-sha") == 0
        name_map = json.loads((tmp_path / f"{name}-sha" / "name_map.json").read_text())
        assert name_map
        if name == "unet":
            assert any(".pixel_attentions." in k for k in name_map)


def _bad_cases(inputs: Path, tmp: Path) -> dict:
    good_enc = GOLDEN / "unet_tiny_mha_per_channel_1.0.0.encodings"
    cases = {}
    (tmp / "malformed.encodings").write_text('{"version": "1.0.0", "param_encodings": [')
    cases["malformed json"] = (["--encodings", tmp / "malformed.encodings"], "malformed.encodings: malformed JSON")
    enc = json.loads(good_enc.read_text())
    enc["version"] = "0.5"
    (tmp / "version.encodings").write_text(json.dumps(enc))
    cases["unknown version"] = (["--encodings", tmp / "version.encodings"], "version.encodings: version '0.5'")
    enc = json.loads(good_enc.read_text())
    entry = next(e for e in enc["param_encodings"] if e["name"].endswith("attn1.to_q.weight"))
    entry["scale"], entry["offset"] = entry["scale"][:-1], entry["offset"][:-1]
    (tmp / "heads.encodings").write_text(json.dumps(enc))
    cases["channels not divisible by heads"] = (["--encodings", tmp / "heads.encodings"],
                                                 f"{entry['name']}: 31 per-channel encodings for 32 output channels")
    enc = json.loads(good_enc.read_text())
    enc["param_encodings"][0]["bw"] = 10**20  # 2**bw once grew by 80 MB/s until memory ran out
    (tmp / "bw.encodings").write_text(json.dumps(enc))
    cases["a bitwidth of 10**20"] = (["--encodings", tmp / "bw.encodings"],
                                     f"bw.encodings: param_encodings\\['{enc['param_encodings'][0]['name']}'\\]: "
                                     "field 'bw' is 100000000000000000000, outside 1-32")
    enc = json.loads(good_enc.read_text())
    entry = next(e for e in enc["param_encodings"] if e["name"].endswith("attn2.to_q.weight"))
    entry["offset"][3] = 5  # above 0: no grid holds it; the user's file and key, not the SHA head it lands in
    (tmp / "offset.encodings").write_text(json.dumps(enc))
    cases["an offset out of range"] = (["--encodings", tmp / "offset.encodings"],
                                       f"offset.encodings: {re.escape(entry['name'])}\\[3\\]: offset 5 is outside")
    data = (inputs / "unet.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 3])
    cases["truncated checkpoint"] = (["--state-dict", tmp / "cut.safetensors"], "cut.safetensors")
    other = build_unet("tiny", seed=0)
    sd = other.state_dict()
    sd.pop("conv_in.weight")
    save_state_dict_file(sd, tmp / "missing.safetensors")
    cases["checkpoint missing a key"] = (["--state-dict", tmp / "missing.safetensors"],
                                          "missing.safetensors \\(MHA form\\): does not match the model config .*config.json: 1 key\\(s\\) missing, e.g. 'conv_in.weight'")
    sd = build_unet("tiny", seed=0).state_dict()
    sd["conv_in.weight"] = torch.zeros(1, 2, 3, 3)
    save_state_dict_file(sd, tmp / "shape.pth")
    cases["checkpoint with a wrong shape"] = (["--state-dict", tmp / "shape.pth"], "'conv_in.weight' has shape \\(1, 2, 3, 3\\)")
    sd = build_unet("tiny", seed=0).state_dict()
    sd["conv_in.weight"][1, 0, 2, 2] = float("nan")
    sd["conv_out.bias"][0] = float("-inf")
    for suffix in ("safetensors", "pth"):
        save_state_dict_file(sd, tmp / f"nan.{suffix}")
        cases[f"NaN weights ({suffix})"] = (["--state-dict", tmp / f"nan.{suffix}"],
                                            f"nan.{suffix}: (conv_in.weight|conv_out.bias) holds 1 NaN or infinite")
    sd = build_unet("tiny", seed=0).state_dict()
    sd["conv_out.weight"] = sd["conv_out.weight"].to(torch.int8)
    save_state_dict_file(sd, tmp / "int.safetensors")
    cases["integer weights"] = (["--state-dict", tmp / "int.safetensors"],
                                "int.safetensors: conv_out.weight has dtype int8; a weight must be floating point")
    config = json.loads((inputs / "config.json").read_text())
    for name, field, value, words in [
        ("head-dim", "attention_head_dim", "two", "attention_head_dim is 'two'; UNet2DConditionModel takes int \\| "),
        ("layers", "layers_per_block", "one", "layers_per_block is 'one'; UNet2DConditionModel takes int"),
        ("width", "block_out_channels", [-32, 64], "block_out_channels is \\[-32, 64\\]; it counts something"),
        ("eps", "norm_eps", float("nan"), "norm_eps is nan; UNet2DConditionModel takes float"),
        ("flip", "flip_sin_to_cos", "yes", "flip_sin_to_cos is 'yes'; UNet2DConditionModel takes bool"),
        ("class", "_class_name", [], "_class_name \\[\\] is not one of"),
        ("blocks", "down_block_types", ["DownBlock2D"], "diffusers cannot build a UNet2DConditionModel from it: "
                                                       "ValueError: Must provide the same number"),
    ]:
        (tmp / f"{name}.json").write_text(json.dumps({**config, field: value}))
        cases[f"config {field}"] = (["--model-config", tmp / f"{name}.json"], f"config .*{name}.json: {words}")
    (tmp / "bad_config.json").write_text("{not json")
    cases["malformed config"] = (["--model-config", tmp / "bad_config.json"], "bad_config.json: malformed JSON")
    return cases


def test_every_bad_input_gets_a_clear_error_and_no_output(inputs, tmp_path, capsys):
    for kind, (override, message) in _bad_cases(inputs, tmp_path).items():
        args = {"--model-config": inputs / "config.json", "--state-dict": inputs / "unet.safetensors",
                "--out": tmp_path / f"out-{kind.replace(' ', '-')}"}
        args.update(dict(zip(override[::2], override[1::2])))
        flat = [str(x) for pair in args.items() for x in pair]
        assert main(["convert", *flat]) == 2, kind
        err = capsys.readouterr().err
        assert "pasd-verify: error:" in err, kind
        assert re.search(message, err), f"{kind}: {err}"
        out = args["--out"]
        assert [p for p in _files(out) if not p.startswith(".")] == [] and _files(out) == [], kind


def test_convert_refuses_to_overwrite_an_input(inputs, tmp_path, capsys):
    src = tmp_path / "state_dict_sha.safetensors"
    src.write_bytes((inputs / "unet.safetensors").read_bytes())
    assert _run("--model-config", inputs / "config.json", "--state-dict", src, "--out", tmp_path) == 2
    assert "an output would overwrite this input" in capsys.readouterr().err
    assert src.read_bytes() == (inputs / "unet.safetensors").read_bytes()


@given(data=st.binary(max_size=300))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_as_encodings_fail_cleanly_with_no_output(inputs, tmp_path, data):
    out = tmp_path / "random-out"
    (tmp_path / "random.encodings").write_bytes(data)
    assert _run("--model-config", inputs / "config.json", "--state-dict", inputs / "unet.safetensors",
                "--encodings", tmp_path / "random.encodings", "--out", out) == 2
    assert _files(out) == []


def test_encodings_can_be_written_in_the_other_format(inputs, tmp_path):
    assert _run("--model-config", inputs / "config.json", "--state-dict", inputs / "unet.safetensors",
                "--encodings", GOLDEN / "unet_tiny_mha_per_channel_0.6.1.encodings", "--encodings-version", "1.0.0",
                "--out", tmp_path / "out") == 0
    written = json.loads((tmp_path / "out" / "parameters_sha.encodings").read_text())
    reference = json.loads((GOLDEN / "unet_tiny_sha_per_channel_1.0.0.encodings").read_text())
    assert written["version"] == "1.0.0"
    assert {e["name"]: e for e in written["param_encodings"]} == {e["name"]: e for e in reference["param_encodings"]}


def test_a_reused_out_folder_holds_only_the_latest_runs_outputs(inputs, tmp_path):
    """An earlier run's encodings must not stay beside a later run's checkpoint, as if they belonged together."""
    out = tmp_path / "out"
    assert _run("--model-config", inputs / "config.json", "--state-dict", inputs / "unet.pth",
                "--encodings", GOLDEN / "unet_tiny_mha_per_channel_1.0.0.encodings", "--out", out) == 0
    (out / "mine.txt").write_text("not an output of convert")
    assert _run("--model-config", inputs / "config.json", "--state-dict", inputs / "unet.safetensors",
                "--out", out) == 0
    assert _files(out) == ["mine.txt", "name_map.json", "state_dict_sha.safetensors"]


def test_names_holding_control_characters_are_printed_escaped(inputs, tmp_path, capsys):
    """A NUL or a right-to-left override in a key of the user's file must not reach the terminal raw."""
    sd = build_unet("tiny", seed=0).state_dict()
    sd["evil\u202e\x00.weight"] = torch.zeros(1)
    save_state_dict_file(sd, tmp_path / "keys.safetensors")
    assert _run("--model-config", inputs / "config.json", "--state-dict", tmp_path / "keys.safetensors",
                "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "evil\\u202e\\x00.weight" in err and "\u202e" not in err and "\x00" not in err


def test_convert_an_sd15_style_vae_folder(tmp_path, capsys):
    """SD1.5's vae/ folder as diffusers writes it: the class comes from its config, both mid-block attentions (one
    head, a group norm before the projections) are split, and the SHA checkpoint gives the MHA VAE's images."""
    from pasd_verify.checkpoint import load_state_dict_file
    from pasd_verify.presets import build_vae, vae_image

    vae = build_vae("tiny", seed=3)
    vae.save_pretrained(tmp_path / "vae")
    assert _run("--model-config", tmp_path / "vae", "--state-dict", tmp_path / "vae" / "diffusion_pytorch_model.safetensors",
                "--out", tmp_path / "out") == 0
    assert "AutoencoderKL (config _class_name AutoencoderKL)" in capsys.readouterr().out
    name_map = json.loads((tmp_path / "out" / "name_map.json").read_text())
    assert sorted({k.rsplit(".", 2)[0] for k in name_map}) == ["decoder.mid_block.attentions.0",
                                                               "encoder.mid_block.attentions.0"]
    sha = build_vae("tiny", seed=99)
    convert_to_sha(sha)
    sha.load_state_dict(load_state_dict_file(tmp_path / "out" / "state_dict_sha.safetensors"), strict=True)
    image = vae_image(vae, size=(24, 16), seed=1)
    with torch.no_grad():
        expected, got = vae(image).sample, sha(image).sample
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("wrapped", [True, False], ids=["adaround", "adaround-flat"])
def test_aimets_adaround_file_converts_into_the_same_layout(inputs, tmp_path, capsys, wrapped):
    """AIMET's AdaRound writes parameter encodings without a version (wrapped in ``param_encodings`` since AIMET 1.32,
    bare before): the SHA file comes out in the layout that came in, holding what the 0.6.1 rewrite holds."""
    body = json.loads((GOLDEN / "unet_tiny_mha_per_channel_0.6.1.encodings").read_text())["param_encodings"]
    (tmp_path / "adaround.encodings").write_text(json.dumps({"param_encodings": body} if wrapped else body))
    assert _run("--model-config", inputs / "config.json", "--state-dict", inputs / "unet.safetensors",
                "--encodings", tmp_path / "adaround.encodings", "--out", tmp_path / "out") == 0
    written = json.loads((tmp_path / "out" / "parameters_sha.encodings").read_text())
    assert "version" not in written and "activation_encodings" not in written
    reference = json.loads((GOLDEN / "unet_tiny_sha_per_channel_0.6.1.encodings").read_text())["param_encodings"]
    assert (written["param_encodings"] if wrapped else written) == reference
    layout = "adaround" if wrapped else "adaround-flat"
    assert re.search(rf"^encodings_layout\s+{layout}$", capsys.readouterr().out, re.M)


@pytest.mark.aimet
def test_aimets_own_adaround_file_converts_and_aimet_freezes_the_sha_file(inputs, tmp_path):
    """The whole way a user goes: AIMET's AdaRound on the MHA UNet writes its file, ``convert`` rewrites it, and
    AIMET's ``set_and_freeze_param_encodings`` reads the SHA file onto the SHA model, each head's quantizer holding
    its slice of the MHA projection's per-channel scales (sliced here by hand from AIMET's file)."""
    import copy

    from aimet_torch.quantsim import QuantizationSimModel

    from pasd_verify.checkpoint_files import load_state_dict_file
    from pasd_verify.kinds import graph_of
    from pasd_verify.quant import QUANTSIM_CONFIGS, aimet_torch_session
    from pasd_verify.quant.calibration import seeded_samples
    from pasd_verify.quant.reference import aimet_adaround, aimet_rows

    unet = build_unet("tiny", seed=0)
    module, rows = aimet_rows(unet, seeded_samples(unet, 1, latent=(8, 8)))
    _, aimet_file = aimet_adaround(module, rows, iterations=1, folder=tmp_path / "aimet")
    aimet_body = json.loads(Path(aimet_file).read_text())
    assert "version" not in aimet_body  # AIMET's own layout, the one this test is about
    out = tmp_path / "out"
    assert _run("--model-config", inputs / "config.json", "--state-dict", inputs / "unet.safetensors",
                "--encodings", aimet_file, "--out", out) == 0
    assert set(json.loads((out / "parameters_sha.encodings").read_text())) == set(aimet_body)

    sha = copy.deepcopy(unet)
    name_map = convert_to_sha(sha)
    sha.load_state_dict(load_state_dict_file(out / "state_dict_sha.safetensors"))
    with aimet_torch_session():
        sim = QuantizationSimModel(graph_of(sha).module, tuple(t.unsqueeze(0) for t in rows[0]), default_param_bw=4,
                                   config_file=str(QUANTSIM_CONFIGS["per_channel"]))
    sim.set_and_freeze_param_encodings(str(out / "parameters_sha.encodings"))
    prefix = next(n for n in aimet_body["param_encodings"] if n.endswith("conv_in.weight"))[:-len("conv_in.weight")]
    checked = 0
    for mha, heads in name_map.items():
        if prefix + mha not in aimet_body["param_encodings"]:
            continue  # AIMET rounds only weights
        scales = [e["scale"] for e in aimet_body["param_encodings"][prefix + mha]]
        size = len(scales) // len(heads)
        for i, head in enumerate(heads):
            quantizer = sim.model.get_submodule(prefix + head.rsplit(".", 1)[0]).param_quantizers["weight"]
            got = quantizer.get_scale().flatten().tolist()
            assert got == pytest.approx(scales[i * size:(i + 1) * size], rel=1e-6), head
            checked += 1
    assert checked >= 3 * len(name_map.modules)
