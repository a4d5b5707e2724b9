"""The checkpoint rewrite: split/merge in memory and on disk, strict loading, and clear errors."""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import pickle
import re
import struct
import weakref
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file as safetensors_load_file
from torch import nn

from helpers import assert_same_state_dict
from pasd_verify import (CheckpointError, NameMap, convert_checkpoint_file, convert_to_sha, merge_state_dict,
                         split_state_dict)
from pasd_verify.checkpoint import _sha_plan
from pasd_verify.checkpoint_files import (_SafetensorsReader, _sniff, _tensor_at_fault, _unpickling_reason, _write_safetensors,
                                          check_checkpoint_matches,
                                          check_tensor_values, checkpoint_shapes, load_model_weights,
                                          load_state_dict_file, save_state_dict_file)
from pasd_verify.kinds.loading import name_map_from_config
from pasd_verify.presets import build_unet, unet_inputs

FORMATS = ["safetensors", "pth"]


@pytest.fixture(scope="module")
def tiny():
    """(MHA model, its SHA conversion, the name map)."""
    mha = build_unet("tiny", seed=0)
    sha = copy.deepcopy(mha)
    return mha, sha, convert_to_sha(sha)




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
    assert_same_state_dict(merge_state_dict(sha_sd, name_map), mha_sd)


@given(model=attention_models())
def test_split_state_dict_loads_strictly_into_the_converted_model(model):
    mha_sd = copy.deepcopy(model.state_dict())
    sha = copy.deepcopy(model)
    name_map = convert_to_sha(sha)
    converted = copy.deepcopy(sha.state_dict())
    for p in sha.parameters():
        nn.init.zeros_(p)
    sha.load_state_dict(split_state_dict(mha_sd, name_map), strict=True)
    assert_same_state_dict(sha.state_dict(), converted)


def test_split_does_not_change_its_input(tiny):
    mha, _, name_map = tiny
    mha_sd = mha.state_dict()
    snapshot = copy.deepcopy(mha_sd)
    split_state_dict(mha_sd, name_map)
    assert_same_state_dict(mha_sd, snapshot)


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_conversion_round_trip(tiny, tmp_path, fmt):
    mha, sha, name_map = tiny
    mha_file, sha_file, back_file = (tmp_path / f"{n}.{fmt}" for n in ("mha", "sha", "back"))
    save_state_dict_file(mha.state_dict(), mha_file)
    counts = convert_checkpoint_file(mha_file, sha_file, name_map, to="sha")
    assert counts["keys_rewritten"] == len(name_map)
    # Read back with each format's own reader, not ours.
    on_disk = safetensors_load_file(sha_file) if fmt == "safetensors" else torch.load(sha_file, weights_only=True)
    assert_same_state_dict({k: on_disk[k] for k in sha.state_dict()}, sha.state_dict())
    assert set(on_disk) == set(sha.state_dict())
    fresh = copy.deepcopy(sha)
    fresh.load_state_dict(on_disk, strict=True)
    inputs = unet_inputs(mha)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).sample, mha(**inputs).sample, rtol=0, atol=1e-5)
    convert_checkpoint_file(sha_file, back_file, name_map, to="mha")
    assert_same_state_dict(load_state_dict_file(back_file), mha.state_dict(), ordered=fmt == "pth")


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
        assert_same_state_dict(safetensors_load_file(tmp_path / f"{dtype}.sha.safetensors"),
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
def test_an_output_of_the_other_format_is_refused_naming_both_files(tiny, tmp_path, fmt):
    """Converting never changes the file format: asking for one is an error naming the output, the input's format
    and the input, and nothing is written."""
    mha, _, name_map = tiny
    src = tmp_path / f"mha.{fmt}"
    save_state_dict_file(mha.state_dict(), src)
    other = {"safetensors": "pth", "pth": "safetensors"}[fmt]
    dst = tmp_path / f"sha.{other}"
    with pytest.raises(CheckpointError) as info:
        convert_checkpoint_file(src, dst, name_map)
    expected = "safetensors" if fmt == "safetensors" else "torch"
    assert str(info.value) == f"{dst}: output must have the input's format ({expected}), as in {src.name}"
    assert not dst.exists()


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
    name_map = NameMap()
    name_map.add("a", heads=3, has_bias=False)
    save_state_dict_file({"a.to_q.weight": torch.zeros(8, 4), "a.to_k.weight": torch.zeros(9, 4),
                          "a.to_v.weight": torch.zeros(9, 4)}, tmp_path / f"mha.{fmt}")
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


# --- every checkpoint error names its source, the form and the key ---------------------------------------------

def _small_pair():
    """(MHA state dict, SHA state dict, name map) of one two-head attention."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": Attention(8, heads=2, dim_head=4, bias=True)})
    mha = {k: v.clone() for k, v in model.state_dict().items()}
    name_map = convert_to_sha(model)
    return mha, {k: v.clone() for k, v in model.state_dict().items()}, name_map


def _plant(defect: str, to: str, mha: dict, sha: dict, name_map: dict) -> tuple[dict, str, str, str]:
    """The input of a conversion ``to`` with ``defect``, and what its error must say: the form word, the key and
    the defect, in memory and file to file alike."""
    mha_key = "attn.to_k.weight"
    heads = name_map[mha_key]
    source = dict(mha if to == "sha" else sha)
    form = "MHA" if to == "sha" else "SHA"
    if defect == "missing":
        key = mha_key if to == "sha" else heads[1]
        del source[key]
        what = "missing"
    elif defect == "clashing":
        key = heads[0] if to == "sha" else mha_key
        source[key] = (sha if to == "sha" else mha)[key]
        form, what = "MHA and SHA", "it is neither a clean MHA nor SHA checkpoint"
    elif defect == "mis-shaped":
        key = mha_key
        if to == "sha":
            source[key] = source[key].reshape(2, 4, 8)
            what = "has shape (2, 4, 8), expected a Linear weight or bias"
        else:
            for head in heads:  # heads alike, but 2x2 convs, not 1x1
                source[head] = source[head].reshape(4, 2, 2, 2)
            what = "have shape (4, 2, 2, 2), expected 1x1 conv weights or biases"
    else:  # "uneven heads"
        key = mha_key
        if to == "sha":
            source[key] = torch.zeros(9, 8)  # 9 rows for 2 heads
            what = "has 9 rows, which 2 heads do not divide evenly"
        else:
            source[heads[1]] = torch.zeros(5, 8, 1, 1)  # heads of different sizes
            what = "have different shapes [(4, 8, 1, 1), (5, 8, 1, 1)]"
    return source, form, key, what


def _rewrite_error(source: dict, name_map, to: str, where: str, folder, **kwargs) -> tuple[str, str]:
    """(the label the error must name, the error) of rewriting ``source`` ``to`` a form, in memory or as a file.
    In memory the default label is checked: it is what a caller that passes none reads."""
    if where == "memory":
        rewrite = split_state_dict if to == "sha" else merge_state_dict
        with pytest.raises(CheckpointError) as info:
            rewrite(source, name_map, **kwargs)
        return "state dict", str(info.value)
    src, dst = folder / f"in.{where}", folder / f"out.{where}"
    save_state_dict_file(source, src)
    with pytest.raises(CheckpointError) as info:
        convert_checkpoint_file(src, dst, name_map, to=to, **kwargs)
    assert sorted(os.listdir(folder)) == [src.name]  # nothing written, no staging file left
    return str(src), str(info.value)


def _names_form(message: str, form: str) -> bool:
    """``form`` ("MHA", "SHA", "MHA and SHA") as words of ``message``, not inside a longer word."""
    return re.search(rf"(?<![\w-]){form}(?![\w-])", message) is not None


# Every defect, both directions, every input kind: a full product (24 cases), so that none is left to a draw.
@pytest.mark.parametrize("where", ["memory", *FORMATS])
@pytest.mark.parametrize("to", ["sha", "mha"])
@pytest.mark.parametrize("defect", ["missing", "clashing", "mis-shaped", "uneven heads"])
def test_checkpoint_errors_name_the_source_the_form_and_the_key(defect, to, where, tmp_path):
    mha, sha, name_map = _small_pair()
    source, form, key, what = _plant(defect, to, mha, sha, name_map)
    label, message = _rewrite_error(source, name_map, to, where, tmp_path)
    assert message.startswith(f"{label}: ") and _names_form(message, form) and repr(key) in message, message
    assert what in message, message


@pytest.mark.parametrize("where", ["memory", *FORMATS])
@pytest.mark.parametrize("to", ["sha", "mha"])
def test_projections_the_name_map_does_not_rewrite_are_refused_naming_the_form_and_key(to, where, tmp_path):
    """A name map from another model: a q/k/v key outside it would be left half-converted, so the rewrite stops,
    naming the input, the form and the key. Only MHA keys may be let through (modules deliberately left MHA)."""
    mha, sha, name_map = _small_pair()
    stray = "other.to_q.weight" if to == "sha" else "other.to_q_convs.0.weight"
    source = dict(mha if to == "sha" else sha, **{stray: torch.zeros(4, 8) if to == "sha" else torch.zeros(4, 8, 1, 1)})
    label, message = _rewrite_error(source, name_map, to, where, tmp_path)
    form = "MHA" if to == "sha" else "SHA"
    assert message.startswith(f"{label}: 1 {form} q/k/v key(s) the name map does not rewrite, e.g. {stray!r}")
    hint = "; pass allow_unconverted=True for modules deliberately left MHA" if to == "sha" else ""
    assert message.endswith(f"let pasd_verify.kinds.loading choose the model from the weights){hint}"), message
    if to == "sha":  # allowed, the MHA key is kept as it is and the mapped ones split
        if where == "memory":
            kept = split_state_dict(source, name_map, allow_unconverted=True)
        else:
            convert_checkpoint_file(tmp_path / f"in.{where}", tmp_path / f"out.{where}", name_map,
                                    allow_unconverted=True)
            kept = load_state_dict_file(tmp_path / f"out.{where}")
        assert torch.equal(kept[stray], source[stray]) and "attn.to_q.weight" not in kept
    elif where != "memory":  # a per-head SHA key outside the map is never valid, whatever the flag says
        (tmp_path / "flagged").mkdir()
        _, flagged = _rewrite_error(source, name_map, to, where, tmp_path / "flagged", allow_unconverted=True)
        assert f"SHA q/k/v key(s) the name map does not rewrite, e.g. {stray!r}" in flagged


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_existing_output_is_replaced_whole_or_not_at_all(tiny, tmp_path, fmt):
    mha, sha, name_map = tiny
    src, dst = tmp_path / f"mha.{fmt}", tmp_path / f"sha.{fmt}"
    save_state_dict_file(mha.state_dict(), src)
    save_state_dict_file({"stale": torch.ones(3)}, dst)  # an older output that differs from what src gives
    convert_checkpoint_file(src, dst, name_map)
    assert_same_state_dict(load_state_dict_file(dst), sha.state_dict(), ordered=False)
    # a failing conversion leaves the existing output as it was
    written = dst.read_bytes()
    src.write_bytes(src.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=str(src)):
        convert_checkpoint_file(src, dst, name_map)
    assert dst.read_bytes() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, dst.name])


def test_legacy_non_zip_pth_files_load_and_convert(tiny, tmp_path):
    mha, sha, name_map = tiny
    src = tmp_path / "mha.pth"
    torch.save(mha.state_dict(), src, _use_new_zipfile_serialization=False)
    assert not __import__("zipfile").is_zipfile(src)
    assert_same_state_dict(load_state_dict_file(src), mha.state_dict())
    convert_checkpoint_file(src, tmp_path / "sha.pth", name_map)
    assert_same_state_dict(load_state_dict_file(tmp_path / "sha.pth"), sha.state_dict(), ordered=False)


# --- how the file rewrite reads: once per tensor, nothing held past its last use ---------------------------------

def test_the_safetensors_split_reads_each_tensor_once_and_lets_it_go_after_its_last_head(tmp_path):
    """The file rewrite's memory bound (about one tensor) rests on this: every head of an MHA key is cut from one
    read of it, and that read is released once its last head is written."""
    mha, _, name_map = _small_pair()
    src = tmp_path / "mha.safetensors"
    save_state_dict_file(mha, src)
    reads = []
    with _SafetensorsReader(src) as f:
        get_tensor = f.get_tensor

        def counted(key):
            tensor = get_tensor(key)
            reads.append((key, weakref.ref(tensor)))
            return tensor

        f.get_tensor = counted
        keys = f.keys()
        plan = _sha_plan(keys, {k: f.dtype_and_shape(k) for k in keys}, NameMap.of(name_map), str(src))
        heads = [make(f) for _, _, make in plan]
        assert sorted(key for key, _ in reads) == sorted(mha)  # each tensor read exactly once
        del heads
        gc.collect()
        assert [key for key, ref in reads if ref() is not None] == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_tensors_keep_their_shape_and_dtype_through_the_rewrite(tmp_path, fmt):
    mha, _, name_map = _small_pair()
    mha = dict(mha, **{"extra.empty": torch.zeros(0, 3, dtype=torch.float16)})
    src, dst = tmp_path / f"mha.{fmt}", tmp_path / f"sha.{fmt}"
    save_state_dict_file(mha, src)
    convert_checkpoint_file(src, dst, name_map)
    empty = load_state_dict_file(dst)["extra.empty"]
    assert empty.shape == (0, 3) and empty.dtype == torch.float16


def test_a_safetensors_file_cut_short_while_being_read_is_named_with_the_key(tmp_path):
    """safe_open validates the file when it is opened; one truncated after that (rewritten by another process)
    is caught at the read, naming the file and the tensor."""
    src = tmp_path / "mha.safetensors"
    save_state_dict_file({"a": torch.ones(4), "b": torch.ones(1 << 20)}, src)  # b: past any read buffer
    with _SafetensorsReader(src) as f:
        os.truncate(src, src.stat().st_size - 8)
        with pytest.raises(CheckpointError) as info:
            f.get_tensor("b")
    assert str(info.value) == f"{src}: b is cut short; the file is truncated"


def test_a_dtype_safetensors_cannot_hold_is_named_with_the_key_and_nothing_is_written(tmp_path):
    with pytest.raises(CheckpointError) as info:
        save_state_dict_file({"ok": torch.ones(2), "phase": torch.ones(2, dtype=torch.complex64)},
                             tmp_path / "out.safetensors")
    assert str(info.value) == "phase: dtype torch.complex64 cannot be stored in safetensors"
    assert list(tmp_path.iterdir()) == []


def test_damaged_files_are_named_by_their_own_format(tmp_path):
    """torch.load reads .safetensors files too nowadays; a damaged one must still get the safetensors error."""
    src = tmp_path / "mha.safetensors"
    save_state_dict_file({"a": torch.ones(4)}, src)
    src.write_bytes(src.read_bytes()[:-4])
    for read in (load_state_dict_file, checkpoint_shapes):
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(src))}: not a readable safetensors file"):
            read(src)


def test_sha_heads_that_are_not_4d_convs_or_biases_are_refused(tmp_path):
    _, sha, name_map = _small_pair()
    heads = name_map["attn.to_k.weight"]
    flat = dict(sha, **{head: sha[head].reshape(4, 8) for head in heads})
    with pytest.raises(CheckpointError) as info:
        merge_state_dict(flat, name_map)
    assert str(info.value) == ("state dict: the SHA heads of 'attn.to_k.weight' have shape (4, 8), expected 1x1 conv "
                               "weights or biases")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings from Linux /proc")
def test_pth_checkpoints_are_memory_mapped_unless_asked_not_to(tmp_path):
    """Mapped, a .pth's tensors stay in the page cache instead of being copied into the process (the documented
    memory bound of the .pth rewrite)."""
    src = tmp_path / "mha.pth"
    save_state_dict_file({"a": torch.ones(1024)}, src)
    mapped = load_state_dict_file(src)
    assert str(src) in Path("/proc/self/maps").read_text()
    del mapped
    gc.collect()
    copied = load_state_dict_file(src, mmap=False)
    assert str(src) not in Path("/proc/self/maps").read_text()
    assert torch.equal(copied["a"], torch.ones(1024))


def _pickle_runs(marker):
    """A pickle payload that, if unpickled without weights_only, creates ``marker``."""
    class Payload:
        def __reduce__(self):
            return Path.touch, (marker,)
    return Payload()


def test_a_pth_whose_pickle_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code ran"
    src = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "payload": _pickle_runs(marker)}, src)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(src)
    assert not marker.exists()
    assert str(info.value).startswith(f"{src}: refused: the pickle holds more than tensors (Unsupported global: "
                                      "GLOBAL getattr was not an allowed global by default)")
    assert "weights_only" not in str(info.value) and "safe_globals" not in str(info.value)  # advice to run the code
    assert str(info.value).endswith("); pasd-verify never runs a checkpoint's code. Save the state dict as "
                                    ".safetensors where the file is trusted")


def test_a_checkpoint_under_the_other_formats_suffix_is_named_for_what_it_is(tmp_path):
    save_state_dict_file({"w": torch.ones(2)}, tmp_path / "st.safetensors")
    (tmp_path / "st.pth").write_bytes((tmp_path / "st.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"st.pth: not a readable torch checkpoint; the file is really a "
                                              r"safetensors checkpoint: rename it to end in .safetensors$"):
        load_state_dict_file(tmp_path / "st.pth")
    for legacy in (False, True):
        torch.save({"w": torch.ones(2)}, tmp_path / "pt.pth", _use_new_zipfile_serialization=not legacy)
        (tmp_path / "pt.safetensors").write_bytes((tmp_path / "pt.pth").read_bytes())
        with pytest.raises(CheckpointError, match=r"pt.safetensors: not a readable safetensors file \(.*\); the file "
                                                  r"is really a torch checkpoint: rename it to end in .pth$"):
            load_state_dict_file(tmp_path / "pt.safetensors")


def test_a_pth_saved_on_a_gpu_loads_onto_the_cpu(tmp_path):
    """Checkpoints saved from CUDA record their tensors' device; they must load on a CPU-only machine (and land on
    the CPU on a GPU one). Made by rewriting the storage location a CPU save records, as a CUDA save records it."""
    cpu_file, gpu_file = tmp_path / "cpu.pth", tmp_path / "gpu.pth"
    torch.save({"w": torch.arange(4.0)}, cpu_file)
    with zipfile.ZipFile(cpu_file) as z, zipfile.ZipFile(gpu_file, "w", zipfile.ZIP_STORED) as out:
        for info in z.infolist():
            data = z.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            out.writestr(info.filename, data)
    for load in (load_state_dict_file, lambda p: load_state_dict_file(p, mmap=False)):
        loaded = load(gpu_file)
        assert loaded["w"].device.type == "cpu" and torch.equal(loaded["w"], torch.arange(4.0))
    assert checkpoint_shapes(gpu_file) == {"w": (4,)}


def test_load_errors_name_the_exception_and_what_was_found(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00not a pickle")
    with pytest.raises(CheckpointError, match=r"junk.pth: not a readable torch checkpoint \(UnpicklingError: "):
        load_state_dict_file(tmp_path / "junk.pth")
    torch.save({"w": torch.zeros(1), "epoch": 3}, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(tmp_path / "nested.pth")
    assert str(info.value) == f"{tmp_path / 'nested.pth'}: expected a flat {{name: tensor}} state dict, got dict"


def test_safetensors_headers_are_8_byte_aligned(tmp_path):
    """The format's readers (and mmap users) expect the data to start 8-byte aligned, as safetensors writes it."""
    for n in range(1, 9):  # header lengths of every residue
        path = tmp_path / f"{n}.safetensors"
        save_state_dict_file({"k" * n: torch.ones(n)}, path)
        (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert header_len % 8 == 0
        assert torch.equal(safetensors_load_file(path)["k" * n], torch.ones(n))


def test_the_writer_refuses_a_tensor_other_than_it_promised(tmp_path):
    """The header is written before the tensors; one that then comes out otherwise would corrupt the file."""
    for made, promised in ((torch.ones(3), ("F32", [4])), (torch.ones(4, dtype=torch.float16), ("F32", [4]))):
        with pytest.raises(CheckpointError) as info:
            _write_safetensors(tmp_path / "out.safetensors", [("a", lambda made=made: made)], {"a": promised})
        assert str(info.value) == f"a: got {made.dtype} {tuple(made.shape)}, expected {promised[0]} {promised[1]}"


def test_a_checkpoint_that_does_not_match_the_config_names_every_kind_of_difference():
    shapes = {"kept": (2,), "wrong": (3, 4), "extra.a": (1,), "extra.b": (1,)}
    expected = {"kept": (2,), "wrong": (4, 3), "gone": (5,)}
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_matches(shapes, expected, "ckpt.safetensors")
    assert str(info.value) == ("ckpt.safetensors: does not match the model config: 1 key(s) missing, e.g. 'gone'; "
                               "2 unexpected key(s), e.g. 'extra.a'; 'wrong' has shape (3, 4), the model (4, 3)")
    check_checkpoint_matches(expected, expected, "same")  # no difference, no error
    with pytest.raises(CheckpointError) as info:  # either file may be the one at fault: both are named
        check_checkpoint_matches(shapes, expected, "ckpt.safetensors", Path("unet/config.json"))
    assert str(info.value).startswith("ckpt.safetensors: does not match the model config unet/config.json: 1 key(s)")


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_conversion_reports_its_counts_and_refuses_bad_arguments(tiny, tmp_path, fmt):
    mha, sha, name_map = tiny
    src, dst = tmp_path / f"mha.{fmt}", tmp_path / f"sha.{fmt}"
    save_state_dict_file(mha.state_dict(), src)
    counts = convert_checkpoint_file(src, dst, name_map)
    assert counts == {"tensors_in": len(mha.state_dict()), "tensors_out": len(sha.state_dict()),
                      "keys_rewritten": len(NameMap.of(name_map))}
    with pytest.raises(ValueError) as info:
        convert_checkpoint_file(src, tmp_path / f"x.{fmt}", name_map, to="fp16")
    assert str(info.value) == "to must be 'sha' or 'mha', got 'fp16'"
    with pytest.raises(CheckpointError) as missing:
        convert_checkpoint_file(tmp_path / f"none.{fmt}", tmp_path / f"x.{fmt}", name_map)
    assert str(missing.value) == f"{tmp_path / f'none.{fmt}'}: no such checkpoint file"
    with pytest.raises(CheckpointError) as missing:
        checkpoint_shapes(tmp_path / f"none.{fmt}")
    assert str(missing.value) == f"{tmp_path / f'none.{fmt}'}: no such checkpoint file"
    assert not (tmp_path / f"x.{fmt}").exists()


def test_the_safetensors_rewrite_keeps_the_data_order_with_heads_in_place(tmp_path):
    """Tensors come out in the input's data order (not by name), each MHA key replaced where it was by its heads."""
    mha, _, name_map = _small_pair()
    mha = {"z.first": torch.ones(1), **mha, "a.last": torch.ones(1)}  # names that sort otherwise
    src, dst = tmp_path / "mha.safetensors", tmp_path / "sha.safetensors"
    save_state_dict_file(mha, src)
    convert_checkpoint_file(src, dst, name_map)
    expected = [name for key in mha for name in name_map.get(key, [key])]
    with _SafetensorsReader(dst) as f:
        assert f.keys() == expected


@pytest.mark.parametrize("key, tensor, words", [
    ("a.bias", torch.zeros(3, dtype=torch.int32), "a.bias has dtype int32; a weight must be floating point"),
    ("a.weight", torch.zeros(2, 2, dtype=torch.bool), "a.weight has dtype bool; a weight must be floating point"),
    ("a.weight", torch.tensor([1.0, float("inf"), float("nan")], dtype=torch.float16),
     "a.weight holds 2 NaN or infinite value(s) of 3"),
    ("a.running_mean", torch.tensor([float("nan")], dtype=torch.float64), "a.running_mean holds 1 NaN"),
])
def test_weights_that_cannot_be_weights_are_refused_by_name(key, tensor, words):
    with pytest.raises(CheckpointError) as info:
        check_tensor_values(key, tensor, "m.safetensors")
    assert str(info.value).startswith(f"m.safetensors: {words}")


@pytest.mark.parametrize("key, tensor", [
    ("embeddings.position_ids", torch.arange(77)),  # CLIP's integer buffer
    ("a.weight", torch.ones(0, 3, dtype=torch.bfloat16)),
    ("a.weight", torch.full((2,), -65504.0, dtype=torch.float16)),
])
def test_integer_buffers_and_finite_weights_pass(key, tensor):
    assert check_tensor_values(key, tensor, "m.safetensors") is tensor


def test_weights_a_model_runs_with_share_one_dtype(tmp_path):
    """One float16 tensor among float32 ones would fail deep in a forward (found by the bad-input property)."""
    tensors = {"a.weight": torch.ones(2), "b.weight": torch.ones(2), "c.weight": torch.ones(2, dtype=torch.float16),
               "ids": torch.arange(3)}
    save_state_dict_file(tensors, tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model_weights(tmp_path / "mixed.safetensors")
    assert str(info.value) == (f"{tmp_path / 'mixed.safetensors'}: mixes floating dtypes: c.weight is float16, 2 "
                               "tensors are float32; a model runs in one dtype")
    del tensors["a.weight"], tensors["b.weight"]
    save_state_dict_file(tensors, tmp_path / "half.safetensors")  # all float16, and an integer buffer: one dtype
    assert load_model_weights(tmp_path / "half.safetensors").keys() == tensors.keys()


def _doctored(path: Path, source: Path, change) -> Path:
    """``source`` with its safetensors header changed by ``change(header)`` (the data left as it was)."""
    data = source.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = change(json.loads(data[8:8 + length]))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])
    return path


def _entry(name, **fields):
    return lambda header: {**header, name: {**header[name], **fields}}


@pytest.mark.parametrize("change, words", [
    (_entry("a.weight", dtype="F99"), "tensor 'a.weight': dtype 'F99' is not a safetensors dtype"),
    (_entry("a.weight", dtype=[]), "tensor 'a.weight': dtype [] is not a safetensors dtype"),
    (_entry("a.weight", shape=[5]), "tensor 'a.weight': shape [5] of F32 needs 20 bytes, its data_offsets [0, 16] hold 16"),
    (_entry("b.weight", shape=[2, -2]), "tensor 'b.weight': shape [2, -2] is not a list of sizes"),
    (_entry("b.weight", shape="2x2"), "tensor 'b.weight': shape '2x2' is not a list of sizes"),
    (_entry("b.weight", data_offsets=[16]), "tensor 'b.weight': data_offsets [16] is not [begin, end]"),
    (_entry("b.weight", data_offsets=[16, "x"]), "tensor 'b.weight': data_offsets [16, 'x'] is not [begin, end]"),
    (lambda header: {**header, "b.weight": 7}, "tensor 'b.weight': its entry is not an object"),
])
def test_a_doctored_safetensors_header_names_the_tensor_at_fault(tmp_path, change, words):
    """safetensors' own message for some faults names no tensor; ours adds the first one at fault."""
    save_state_dict_file({"a.weight": torch.ones(4), "b.weight": torch.ones(2, 2)}, tmp_path / "good.safetensors")
    path = _doctored(tmp_path / "bad.safetensors", tmp_path / "good.safetensors", change)
    with pytest.raises(CheckpointError) as info:
        checkpoint_shapes(path)
    assert str(info.value).startswith(f"{path}: not a readable safetensors file (")
    assert str(info.value).endswith(f"); {words}")


def test_a_header_longer_than_its_file_names_no_tensor(tmp_path):
    save_state_dict_file({"a.weight": torch.ones(4)}, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", len(data)) + data[8:])
    with pytest.raises(CheckpointError) as info:
        checkpoint_shapes(tmp_path / "long.safetensors")
    assert str(info.value).endswith(")") and "tensor '" not in str(info.value)


def test_finite_float16_weights_whose_sum_overflows_pass():
    """The check sums first (no allocation); a finite float16 tensor whose sum overflows is counted exactly."""
    tensor = torch.full((4,), 60000.0, dtype=torch.float16)
    assert not math.isfinite(float(tensor.sum()))
    assert check_tensor_values("a.weight", tensor, "m.safetensors") is tensor


def _raw_safetensors(path: Path, header, *, declared: int | None = None) -> Path:
    """A file of a safetensors header, unpadded, under a declared length (its own by default), and no data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw)
    return path


_F99 = {"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}


@pytest.mark.parametrize("header, declared, words", [
    # the header exactly fills the file: it is read
    (_F99, None, "; tensor 'a': dtype 'F99' is not a safetensors dtype"),
    # a length 4 bytes past the file, or one with the top bit set (not a negative number), is not read
    (_F99, len(json.dumps(_F99)) + 4, ""),
    (_F99, 2**63 + len(json.dumps(_F99)), ""),
    (_F99, 2**64 - 1, ""),  # read as signed, -1: "read to the end"
    # nothing to name: not JSON, not an object, or every entry sound
    (b"{not json", None, ""),
    ([1, 2], None, ""),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, None, ""),
    # the metadata is no tensor: skipped, and the entries after it still read
    ({"__metadata__": {"format": "pt"}, **_F99}, None, "; tensor 'a': dtype 'F99' is not a safetensors dtype"),
    # an empty tensor is sound; a dtype safetensors defines but pasd-verify does not read has no size to check
    ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, None, ""),
    ({"a": {"dtype": "U16", "shape": [3], "data_offsets": [0, 2]}}, None, ""),
    # the bytes an entry holds are its end minus its begin
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 36]}}, None,
     "; tensor 'a': shape [4] of F32 needs 16 bytes, its data_offsets [16, 36] hold 20"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, None, ""),
])
def test_the_tensor_at_fault_is_read_from_the_header_alone(tmp_path, header, declared, words):
    assert _tensor_at_fault(_raw_safetensors(tmp_path / "m.safetensors", header, declared=declared)) == words


@pytest.mark.parametrize("message, reason", [
    # torch 2.4+ (this stack's)
    ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but "
     "it can result in arbitrary code execution.\n WeightsUnpickler error: Unsupported global: GLOBAL m.Payload was "
     "not an allowed global by default. Please use `torch.serialization.add_safe_globals([Payload])` to allowlist.",
     "Unsupported global: GLOBAL m.Payload was not an allowed global by default"),
    # torch 2.0-2.3
    ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed.\n"
     "Trying to load unsupported GLOBAL m.Payload whose module m is blocked.",
     "Trying to load unsupported GLOBAL m.Payload whose module m is blocked"),
    ("Weights only load failed.\nWeightsUnpickler error: Unsupported operand 149", "Unsupported operand 149"),
    # one sentence: only its full stop goes
    ("WeightsUnpickler error: Unsupported global: GLOBAL m.X.", "Unsupported global: GLOBAL m.X"),
])
def test_a_weights_only_refusal_keeps_the_sentence_that_says_what_the_file_holds(message, reason):
    assert _unpickling_reason(pickle.UnpicklingError(message)) == reason


def test_a_refusal_in_other_words_is_named_by_its_type():
    assert _unpickling_reason(pickle.UnpicklingError("invalid load key, 'x'.")) == "UnpicklingError"


def test_a_damaged_torch_checkpoint_is_named_for_what_broke_and_not_called_another_format(tmp_path):
    torch.save({"a.weight": torch.ones(2)}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (cut := tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])  # a zip archive without its directory
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(cut)
    assert str(info.value).startswith(f"{cut}: not a readable torch checkpoint (PytorchStreamReader failed reading "
                                      "zip archive: failed finding central directory")
    assert str(info.value).endswith(".)")  # torch's own sentence, and no "the file is really a ..." hint
    (legacy := tmp_path / "legacy.pth").write_bytes(b"\x80\x02")  # a legacy pickle, cut after its protocol
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(legacy)
    assert str(info.value) == f"{legacy}: not a readable torch checkpoint (EOFError: )"


@pytest.mark.parametrize("head, expected", [
    (struct.pack("<Q", 2) + b"{}", "safetensors"),  # the smallest header, exactly filling the file
    (struct.pack("<Q", 4) + b"{}  ", "safetensors"),
    (struct.pack("<Q", 3) + b"{}", None),  # a header longer than the file
    (struct.pack("<Q", 1) + b"{", None),  # too short to be an object
    (struct.pack("<Q", 2) + b"[]", None),  # a length that fits, but no object after it
    (b"PK\x03\x04" + b"\x00" * 8, "torch"),  # a zip archive: torch.save's format
    (b"\x80\x02" + b"\x00" * 8, "torch"),  # a pickle: torch.save's legacy format
    (b"\x80", "torch"),
    (b"{}", None),
])
def test_a_checkpoint_is_recognised_by_its_first_bytes(tmp_path, head, expected):
    (path := tmp_path / "m.bin").write_bytes(head)
    assert _sniff(path) == expected


def test_a_checkpoint_that_cannot_be_opened_is_recognised_as_nothing(tmp_path):
    assert _sniff(tmp_path / "absent.bin") is None


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_nan_weight_is_refused_naming_the_file_and_key(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    save_state_dict_file({"a.weight": torch.tensor([1.0, float("nan")])}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    assert str(info.value) == f"{path}: a.weight holds 1 NaN or infinite value(s) of 2"


def test_an_empty_integer_weight_read_one_tensor_at_a_time_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_state_dict_file({"a.weight": torch.empty(0, dtype=torch.int32)}, path)
    with _SafetensorsReader(path) as f, pytest.raises(CheckpointError) as info:
        f.get_tensor("a.weight")
    assert str(info.value) == f"{path}: a.weight has dtype int32; a weight must be floating point"
