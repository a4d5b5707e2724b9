"""The checkpoint rewrite: split/merge in memory and on disk, strict loading, and clear errors."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from diffusers.models.attention_processor import Attention
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file as safetensors_load_file
from torch import nn

from pasd_verify import CheckpointError, convert_checkpoint_file, convert_to_sha, merge_state_dict, split_state_dict
from pasd_verify.checkpoint import load_state_dict_file, save_state_dict_file
from pasd_verify.loading import name_map_from_config
from pasd_verify.presets import build_unet, unet_inputs

FORMATS = ["safetensors", "pth"]


@pytest.fixture(scope="module")
def tiny():
    """(MHA model, its SHA conversion, the name map)."""
    mha = build_unet("tiny", seed=0)
    sha = copy.deepcopy(mha)
    return mha, sha, convert_to_sha(sha)


def _equal_dicts(a, b, *, ordered: bool = True) -> bool:
    """Same keys (in the same order unless a file reader chose its own) and bit-identical tensors."""
    same_keys = list(a) == list(b) if ordered else set(a) == set(b)
    return same_keys and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@st.composite
def attention_models(draw):
    """A small model of several attention modules with arbitrary head counts, biases and dtypes."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    count = draw(st.integers(1, 3))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    modules = {
        f"block{i}": Attention(
            draw(st.integers(1, 24)), cross_attention_dim=draw(st.one_of(st.none(), st.integers(1, 24))),
            heads=draw(st.integers(1, 8)), dim_head=draw(st.integers(1, 12)), bias=draw(st.booleans()),
        )
        for i in range(count)
    }
    return nn.ModuleDict(modules).to(dtype)


@given(model=attention_models())
def test_split_then_merge_is_bit_identical(model):
    mha_sd = model.state_dict()
    name_map = convert_to_sha(copy.deepcopy(model))
    sha_sd = split_state_dict(mha_sd, name_map)
    assert not set(name_map) & set(sha_sd), "MHA keys must be removed from the SHA state dict"
    assert _equal_dicts(merge_state_dict(sha_sd, name_map), mha_sd)


@given(model=attention_models())
def test_split_state_dict_loads_strictly_into_the_converted_model(model):
    mha_sd = copy.deepcopy(model.state_dict())
    sha = copy.deepcopy(model)
    name_map = convert_to_sha(sha)
    converted = copy.deepcopy(sha.state_dict())
    for p in sha.parameters():
        nn.init.zeros_(p)
    sha.load_state_dict(split_state_dict(mha_sd, name_map), strict=True)
    assert _equal_dicts(sha.state_dict(), converted)


def test_split_does_not_change_its_input(tiny):
    mha, _, name_map = tiny
    mha_sd = mha.state_dict()
    snapshot = copy.deepcopy(mha_sd)
    split_state_dict(mha_sd, name_map)
    assert _equal_dicts(mha_sd, snapshot)


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_conversion_round_trip(tiny, tmp_path, fmt):
    mha, sha, name_map = tiny
    mha_file, sha_file, back_file = (tmp_path / f"{n}.{fmt}" for n in ("mha", "sha", "back"))
    save_state_dict_file(mha.state_dict(), mha_file)
    counts = convert_checkpoint_file(mha_file, sha_file, name_map, to="sha")
    assert counts["keys_rewritten"] == len(name_map)
    # Read back with each format's own reader, not ours.
    on_disk = safetensors_load_file(sha_file) if fmt == "safetensors" else torch.load(sha_file, weights_only=True)
    assert _equal_dicts({k: on_disk[k] for k in sha.state_dict()}, sha.state_dict())
    assert set(on_disk) == set(sha.state_dict())
    fresh = copy.deepcopy(sha)
    fresh.load_state_dict(on_disk, strict=True)
    inputs = unet_inputs(mha)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).sample, mha(**inputs).sample, rtol=0, atol=1e-5)
    convert_checkpoint_file(sha_file, back_file, name_map, to="mha")
    assert _equal_dicts(load_state_dict_file(back_file), mha.state_dict(), ordered=fmt == "pth")


def test_safetensors_metadata_is_kept(tiny, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    mha, _, name_map = tiny
    save_file(mha.state_dict(), tmp_path / "mha.safetensors", metadata={"format": "pt", "origin": "test"})
    convert_checkpoint_file(tmp_path / "mha.safetensors", tmp_path / "sha.safetensors", name_map)
    with safe_open(tmp_path / "sha.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "test"}


def test_name_map_from_config_matches_converting_the_model(tiny):
    mha, _, name_map = tiny
    config = {**mha.config, "_class_name": "UNet2DConditionModel"}
    assert name_map_from_config(config) == name_map


def test_bfloat16_and_float16_survive_the_file_rewrite(tmp_path):
    model = nn.ModuleDict({"a": Attention(8, heads=2, dim_head=4, bias=True)})
    name_map = convert_to_sha(copy.deepcopy(model))
    for dtype in (torch.bfloat16, torch.float16):
        sd = model.to(dtype).state_dict()
        save_state_dict_file(sd, tmp_path / f"{dtype}.safetensors")
        convert_checkpoint_file(tmp_path / f"{dtype}.safetensors", tmp_path / f"{dtype}.sha.safetensors", name_map)
        assert _equal_dicts(safetensors_load_file(tmp_path / f"{dtype}.sha.safetensors"),
                            split_state_dict(sd, name_map), ordered=False)


# --- bad input: a clear error that names the file and key, and no output left behind ---------------------

def _listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_checkpoint_is_named_and_leaves_no_output(tiny, tmp_path, fmt):
    mha, _, name_map = tiny
    src = tmp_path / f"mha.{fmt}"
    save_state_dict_file(mha.state_dict(), src)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    before = _listing(tmp_path)
    with pytest.raises(CheckpointError, match=str(src)):
        convert_checkpoint_file(src, tmp_path / f"sha.{fmt}", name_map)
    assert _listing(tmp_path) == before
    assert src.read_bytes() == data[: len(data) // 2]


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_key_is_named(tiny, tmp_path, fmt):
    mha, _, name_map = tiny
    sd = mha.state_dict()
    missing = next(iter(name_map))
    del sd[missing]
    save_state_dict_file(sd, tmp_path / f"mha.{fmt}")
    with pytest.raises(CheckpointError, match=f"missing.*{missing}"):
        convert_checkpoint_file(tmp_path / f"mha.{fmt}", tmp_path / f"sha.{fmt}", name_map)
    assert not (tmp_path / f"sha.{fmt}").exists()


def test_already_converted_checkpoint_is_refused(tiny, tmp_path):
    mha, sha, name_map = tiny
    mixed = {**mha.state_dict(), **sha.state_dict()}
    with pytest.raises(CheckpointError, match="both MHA and SHA keys"):
        split_state_dict(mixed, name_map)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_that_heads_do_not_divide_are_named(tmp_path, fmt):
    name_map = {"a.to_q.weight": ["a.to_q_convs.0.weight", "a.to_q_convs.1.weight", "a.to_q_convs.2.weight"]}
    save_state_dict_file({"a.to_q.weight": torch.zeros(8, 4)}, tmp_path / f"mha.{fmt}")
    with pytest.raises(CheckpointError, match="a.to_q.weight.*3 heads"):
        convert_checkpoint_file(tmp_path / f"mha.{fmt}", tmp_path / f"sha.{fmt}", name_map)
    assert _listing(tmp_path) == [f"mha.{fmt}"]


def test_input_is_never_overwritten(tiny, tmp_path):
    mha, _, name_map = tiny
    src = tmp_path / "mha.safetensors"
    save_state_dict_file(mha.state_dict(), src)
    data = src.read_bytes()
    with pytest.raises(CheckpointError, match="overwrite the input"):
        convert_checkpoint_file(src, src, name_map)
    assert src.read_bytes() == data


def test_foreign_files_are_refused_with_their_name(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt: unknown checkpoint type"):
        load_state_dict_file(tmp_path / "notes.txt")
    (tmp_path / "junk.pth").write_bytes(b"\x00not a pickle")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_state_dict_file(tmp_path / "junk.pth")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match="nested.pth: expected a flat"):
        load_state_dict_file(tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match="missing.safetensors: no such checkpoint file"):
        load_state_dict_file(tmp_path / "missing.safetensors")
