"""PASD's own checkpoint folders (stock class names in config.json, PASD's parameter names) are recognised by
their weights, load as the PASD models, convert with every check, and any config that does not describe its
checkpoint is refused by every public conversion entry point, with nothing written."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import assert_same_state_dict, option_choices
from pasd_verify import CheckpointError, PasdVerifyError, convert_checkpoint_file, convert_to_sha
from pasd_verify.checkpoint import load_state_dict_file, save_state_dict_file
from pasd_verify.cli import main
from pasd_verify.convert import convert_checkpoint, convert_files
from pasd_verify.kinds.loading import (
    MODEL_CLASSES,
    choose_model,
    load_model,
    model_from_config,
    name_map_from_config,
    parameter_shapes,
)
from pasd_verify.models import PASDControlNetModel, PASDUNet2DConditionModel, pasd_forward
from pasd_verify.presets import build_pasd, pasd_inputs
from strategies import as_pasd_writes_it, sha_tolerance, small_model_configs

WEIGHTS = "diffusion_pytorch_model.safetensors"


def save_as_pasd_does(model, folder: Path, *, drop_config_keys: tuple[str, ...] = ()) -> Path:
    """``save_pretrained``, then the config.json PASD writes: the stock class name (PASD's classes are called
    UNet2DConditionModel and ControlNetModel), optionally without some of its keys."""
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in as_pasd_writes_it(config).items() if k not in drop_config_keys}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def pasd_pair():
    return build_pasd("tiny", seed=0, use_rrdb=True, return_rgbs=True)


@pytest.fixture(scope="module")
def pasd_folders(tmp_path_factory, pasd_pair):
    root = tmp_path_factory.mktemp("pasd")
    unet, controlnet = pasd_pair
    return save_as_pasd_does(unet, root / "unet"), save_as_pasd_does(controlnet, root / "controlnet")


def test_cli_model_classes_are_the_loadable_ones():
    """What ``--model-class`` offers (spelled in cli.py so that --help imports no model code) is what loads."""
    for command in ("convert", "adaround", "export"):
        assert sorted(option_choices(command, "--model-class")) == sorted(MODEL_CLASSES), command


def test_pasd_folders_name_the_stock_classes(pasd_folders):
    # the premise of this file: what PASD writes, not what our classes would write
    names = [json.loads((f / "config.json").read_text())["_class_name"] for f in pasd_folders]
    assert names == ["UNet2DConditionModel", "ControlNetModel"]


def test_pixel_attention_weights_make_a_pasd_unet(pasd_folders):
    unet_folder, _ = pasd_folders
    keys = load_state_dict_file(unet_folder / WEIGHTS).keys()
    choice = choose_model(unet_folder, keys)
    assert choice.cls is PASDUNet2DConditionModel
    assert "pixel-attention" in choice.reason
    assert choose_model(unet_folder).cls.__name__ == "UNet2DConditionModel"  # without weights, the config is all


@pytest.mark.parametrize("return_rgbs", [True, False])
@pytest.mark.parametrize("use_rrdb", [True, False])
@pytest.mark.parametrize("config_has_flags", [True, False])
def test_controlnet_flags_follow_the_weights(tmp_path, return_rgbs, use_rrdb, config_has_flags):
    _, controlnet = build_pasd("tiny", seed=1, use_rrdb=use_rrdb, return_rgbs=return_rgbs)
    folder = save_as_pasd_does(controlnet, tmp_path / "cn",
                               drop_config_keys=() if config_has_flags else ("return_rgbs", "use_rrdb"))
    keys = load_state_dict_file(folder / WEIGHTS).keys()
    choice = choose_model(folder, keys)
    if config_has_flags or return_rgbs or use_rrdb:
        assert choice.cls is PASDControlNetModel, choice
        assert choice.overrides == {"return_rgbs": return_rgbs, "use_rrdb": use_rrdb}
    else:  # no PASD key and no PASD weight: a stock ControlNet is exactly what the folder holds
        assert choice.cls.__name__ == "ControlNetModel"
    loaded = load_model(folder)
    assert parameter_shapes(loaded) == parameter_shapes(controlnet)


def test_config_that_contradicts_the_weights_is_overruled_and_said(tmp_path):
    _, controlnet = build_pasd("tiny", seed=1, use_rrdb=False, return_rgbs=False)
    folder = save_as_pasd_does(controlnet, tmp_path / "cn")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "return_rgbs": True}))
    choice = choose_model(folder, load_state_dict_file(folder / WEIGHTS).keys())
    assert choice.overrides["return_rgbs"] is False
    assert "config says return_rgbs=True" in choice.reason


def test_load_model_gives_the_pasd_models_with_their_weights(pasd_folders, pasd_pair):
    unet, controlnet = pasd_pair
    loaded_unet, loaded_controlnet = (load_model(f) for f in pasd_folders)
    assert type(loaded_unet) is PASDUNet2DConditionModel and type(loaded_controlnet) is PASDControlNetModel
    for original, loaded in ((unet, loaded_unet), (controlnet, loaded_controlnet)):
        assert_same_state_dict(loaded.state_dict(), original.state_dict())
    # Bit-identical weights are the law of loading; the forward may still differ in the last bits, since the CPU
    # kernels choose their code path by memory alignment, which differs between the built and the loaded tensors.
    inputs = pasd_inputs(unet, latent=(8, 8), seed=3)
    with torch.no_grad():
        reference = pasd_forward(unet, controlnet, **inputs)[0]
        loaded = pasd_forward(loaded_unet, loaded_controlnet, **inputs)[0]
    assert (loaded - reference).abs().max() <= sha_tolerance(torch.float32) * reference.abs().max()


def test_model_class_overrides_and_unknown_names_are_refused(pasd_folders):
    unet_folder, _ = pasd_folders
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\), e.g. 'up_blocks\.\d\.pixel_attentions"):
        load_model(unet_folder, model_class="UNet2DConditionModel")
    with pytest.raises(PasdVerifyError, match="'Nope' is not one of"):
        choose_model(unet_folder, model_class="Nope")


def test_pasd_folders_convert_and_their_sha_checkpoints_load_strictly(pasd_folders, pasd_pair, tmp_path, capsys):
    unet, controlnet = pasd_pair
    sha_models = []
    for folder, model, reason in zip(pasd_folders, pasd_pair, ("pixel-attention", "return_rgbs=True, use_rrdb=True")):
        out = tmp_path / folder.name
        assert main(["convert", "--model-config", str(folder), "--state-dict", str(folder / WEIGHTS),
                     "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "model_class" in printed and type(model).__name__ in printed and reason in printed, printed
        sha = copy.deepcopy(model)
        name_map = convert_to_sha(sha)
        assert json.loads((out / "name_map.json").read_text()) == name_map
        for p in sha.parameters():
            torch.nn.init.zeros_(p)  # only the file can make the outputs right
        sha.load_state_dict(load_state_dict_file(out / "state_dict_sha.safetensors"), strict=True)
        sha_models.append(sha)
    inputs = pasd_inputs(unet, latent=(8, 8), seed=4)
    with torch.no_grad():
        reference = pasd_forward(unet, controlnet, **inputs)[0]
        candidate = pasd_forward(*sha_models, **inputs)[0]
    assert (candidate - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_convert_checkpoint_on_pasds_unet_config_splits_every_attention(pasd_folders, tmp_path):
    unet_folder, _ = pasd_folders
    counts = convert_checkpoint(unet_folder, unet_folder / WEIGHTS, tmp_path / "sha.safetensors")
    assert counts["model_class"] == "PASDUNet2DConditionModel"
    keys = load_state_dict_file(tmp_path / "sha.safetensors").keys()
    assert not [k for k in keys if re.search(r"\.to_[qkv]\.weight$", k)]
    assert any(".pixel_attentions." in k and ".to_q_convs." in k for k in keys)


def test_a_stock_name_map_on_pasds_checkpoint_is_refused_naming_a_pixel_attention_key(pasd_folders, tmp_path):
    unet_folder, _ = pasd_folders
    stock_map = name_map_from_config(unet_folder)  # no weights: the config alone says stock UNet
    for suffix in ("safetensors", "pth"):
        src = unet_folder / WEIGHTS
        if suffix == "pth":
            torch.save(load_state_dict_file(src), tmp_path / "unet.pth")
            src = tmp_path / "unet.pth"
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(src))}: \d+ MHA q/k/v key\(s\) the name map "
                                                  rf"does not rewrite, e.g. '.*pixel_attentions.*to_[qkv]"):
            convert_checkpoint_file(src, tmp_path / f"out.{suffix}", stock_map)
        assert not (tmp_path / f"out.{suffix}").exists()


# --- a config that does not describe its checkpoint --------------------------------------------------------

def _build(config: dict, seed: int):
    torch.manual_seed(seed)
    return MODEL_CLASSES[config["_class_name"]].from_config(config).eval()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@given(checkpoint_config=small_model_configs(), other=small_model_configs(), seed=st.integers(0, 2**16),
       suffix=st.sampled_from(["safetensors", "pth"]))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_conversion_refuses_a_config_that_does_not_describe_the_checkpoint(
        tmp_path_factory, checkpoint_config, other, seed, suffix):
    folder = tmp_path_factory.mktemp("mismatch")
    config = as_pasd_writes_it(other)
    model = _build(checkpoint_config, seed)
    shapes = parameter_shapes(model)
    # the checkpoint's own keys decide PASD's kinds, so "does not describe" means: even so, the shapes differ
    assume(parameter_shapes(model_from_config(config, keys=shapes)) != shapes)
    src = folder / f"mha.{suffix}"
    save_state_dict_file(model.state_dict(), src)
    (folder / "config.json").write_text(json.dumps(config))
    out = folder / "out"
    named = re.compile(rf"{re.escape(str(src))}.*'[\w.]+'")
    with pytest.raises(PasdVerifyError, match=named):
        convert_files(folder / "config.json", src, out)
    with pytest.raises(PasdVerifyError, match=named):
        convert_checkpoint(folder / "config.json", src, out / f"sha.{suffix}")
    assert main(["convert", "--model-config", str(folder), "--state-dict", str(src), "--out", str(out)]) == 2
    assert _leftovers(out) == []
    assert _leftovers(folder) == ["config.json", f"mha.{suffix}"]


@given(checkpoint_config=small_model_configs(), other=small_model_configs(), seed=st.integers(0, 2**16),
       suffix=st.sampled_from(["safetensors", "pth"]))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_convert_checkpoint_file_refuses_a_name_map_that_does_not_fit_the_checkpoint(
        tmp_path_factory, checkpoint_config, other, seed, suffix):
    # A bare name map knows names and head counts only: it is wrong for a checkpoint when it misses or invents a
    # q/k/v key, or cuts one into heads the tensor cannot hold; then nothing may be written.
    model = _build(checkpoint_config, seed)
    name_map = name_map_from_config(as_pasd_writes_it(other))
    mha_qkv = {k for k in model.state_dict() if re.search(r"\.to_[qkv]\.(weight|bias)$", k)}
    assume(set(name_map) != mha_qkv)
    folder = tmp_path_factory.mktemp("namemap")
    src = folder / f"mha.{suffix}"
    save_state_dict_file(model.state_dict(), src)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(src))}: .*'[\w.]+'"):
        convert_checkpoint_file(src, folder / f"sha.{suffix}", name_map)
    assert _leftovers(folder) == [f"mha.{suffix}"]


# --- SD1.5's other folders: text_encoder/ (transformers' layout) and vae/ --------------------------------------

def _text_encoder_folder(folder: Path, layout: str):
    """A tiny text encoder saved by transformers 5 (``save_pretrained``: no prefix), or as SD1.5's 4.x-written
    ``text_encoder/model.safetensors`` is: every key under ``text_model.`` and the ``position_ids`` buffer kept."""
    from pasd_verify.presets import build_text_encoder

    model = build_text_encoder("tiny", seed=4)
    model.save_pretrained(folder)
    if layout == "transformers 4.x":
        state = {"text_model." + k: v for k, v in model.state_dict().items()}
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        save_state_dict_file(state, folder / "model.safetensors")
    return model


@pytest.mark.parametrize("layout", ["transformers 5", "transformers 4.x"])
def test_a_text_encoder_folder_loads_and_converts_in_the_checkpoints_own_names(tmp_path, layout):
    """The folder's CLIPTextModel is found by its config's architectures; it computes what the saved model computes;
    convert writes SHA keys and a name map in the file's own naming (prefix included), and the SHA file loads into
    the SHA model, which equals the saved MHA model."""
    from pasd_verify.kinds import load_model_form
    from pasd_verify.presets import text_tokens

    folder = tmp_path / "text_encoder"
    original = _text_encoder_folder(folder, layout)
    ids = text_tokens(original, batch=2, seed=1)
    with torch.no_grad():
        expected = original(input_ids=ids).last_hidden_state
        loaded = load_model(folder)
        assert type(loaded).__name__ == "CLIPTextModel"
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, expected, rtol=0, atol=0)

    out = tmp_path / "out"
    assert main(["convert", "--model-config", str(folder / "config.json"), "--state-dict",
                 str(folder / "model.safetensors"), "--out", str(out)]) == 0
    prefix = "text_model." if layout == "transformers 4.x" else ""
    name_map = json.loads((out / "name_map.json").read_text())
    assert len(name_map) == 12 and all(k.startswith(prefix + "encoder.layers.") for k in name_map)
    sha_keys = set(load_state_dict_file(out / "state_dict_sha.safetensors"))
    assert {n for names in name_map.values() for n in names} <= sha_keys
    assert (prefix + "embeddings.position_ids" in sha_keys) == bool(prefix)  # carried over as the file had it
    sha = load_model_form(folder / "config.json", out / "state_dict_sha.safetensors", form="sha")
    assert sha.kind.name == "text-encoder" and len(sha.name_map) == 12
    with torch.no_grad():
        assert (sha.model(input_ids=ids).last_hidden_state - expected).abs().max() <= sha_tolerance(torch.float32) * \
            expected.abs().max()
    back = tmp_path / "back.safetensors"
    convert_checkpoint(folder / "config.json", out / "state_dict_sha.safetensors", back, to="mha")
    assert_same_state_dict(load_state_dict_file(back), load_state_dict_file(folder / "model.safetensors"))


def test_a_vae_folder_gives_either_half_by_kind_and_refuses_to_guess(tmp_path):
    from pasd_verify.kinds import load_model_form
    from pasd_verify.models import VAEDecoder, VAEEncoder
    from pasd_verify.presets import build_vae

    folder = tmp_path / "vae"
    build_vae("tiny", seed=3).save_pretrained(folder)
    weights = folder / WEIGHTS
    halves = {kind: load_model_form(folder, weights, kind=kind) for kind in ("vae-encoder", "vae-decoder")}
    assert isinstance(halves["vae-encoder"].model, VAEEncoder) and isinstance(halves["vae-decoder"].model, VAEDecoder)
    for kind, loaded in halves.items():
        assert loaded.kind.name == kind and loaded.source["model_class"] == "AutoencoderKL"
        prefix = "encoder." if kind == "vae-encoder" else "decoder."
        assert list(loaded.name_map.modules) == [prefix + "mid_block.attentions.0"]
    with pytest.raises(PasdVerifyError, match=r"a VAE holds two networks; choose --kind vae-encoder or --kind "
                                              r"vae-decoder$"):
        load_model_form(folder, weights)
    with pytest.raises(PasdVerifyError, match=r"holds a text-encoder \(CLIPTextModel\), not a unet$"):
        _text_encoder_folder(tmp_path / "te", "transformers 5")
        load_model_form(tmp_path / "te" / "config.json", tmp_path / "te" / "model.safetensors", kind="unet")
