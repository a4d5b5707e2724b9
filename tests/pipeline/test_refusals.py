"""``pasd-verify pipeline`` on a new user's bad input (issue 35, sections 6 and 7): each is refused with exit 2 and a
message naming the file or flag, before any work, and nothing in ``--out`` changes; what the command did not write
is never removed."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from pasd_verify.cli import main
from helpers import write_folders

SMALL = ["--preset", "tiny", "--process-size", "64", "--steps", "1"]


def assert_refused(capsys, arguments, out, *needles):
    """Run the command; it must exit 2 with every needle in its message, a message that is no traceback."""
    code = main(["pipeline", *arguments, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err
    return err


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


# --- 7. user files deleted; not all-or-none ---------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["exports", "steps", "localized"])
def test_a_users_own_folder_named_like_an_output_is_refused_and_kept(tmp_path, photo, capsys, folder):
    out = tmp_path / "out"
    (out / folder).mkdir(parents=True)
    (out / folder / "my_notes.txt").write_text("a user's own file: pipeline never wrote it")
    before = _tree(out)
    assert_refused(capsys, [*SMALL, "--image", str(photo)], out, f"{out / folder}: this run would replace it",
             "move it away, or choose another --out")
    assert _tree(out) == before


def test_a_rerun_replaces_its_own_outputs_and_refuses_an_undeletable_one_before_any_work(tmp_path, photo, capsys):
    from test_io import undeletable

    out = tmp_path / "out"
    arguments = [*SMALL, "--image", str(photo)]
    assert main(["pipeline", *arguments, "--out", str(out)]) == 0
    assert main(["pipeline", *arguments, "--seed", "1", "--out", str(out)]) == 0  # its own outputs: replaced
    capsys.readouterr()
    before = _tree(out)
    with undeletable(out / "steps" / "step_00.npz"):
        err = assert_refused(capsys, [*arguments, "--seed", "2"], out, "steps/step_00.npz: this run would replace",
                       "cannot remove it")
        assert "fp32 reference run" not in err  # refused before the work
        assert _tree(out) == before  # report.json, the pictures and noise.npz too: all or none


# --- 6. tracebacks where a clear error is promised ----------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--seed", "99999999999999999999999"], "--seed must be a whole number from 0 to"),
    (["--prompt", "caf\udce9"], "--prompt: not valid UTF-8"),  # argv's undecodable bytes arrive as surrogates
    (["--process-size", "100000"], "a run takes at most 4194304"),
    (["--upscale", "1000"], "makes a working size of 80000 x 64000"),
    (["--steps", "1000000000"], "trained on 1000 timesteps; a run takes at most 1000 steps"),
])
def test_a_flag_beyond_what_a_run_can_take_is_refused_before_any_work(tmp_path, photo, capsys, flags, needle):
    out = tmp_path / "out"
    started = time.perf_counter()
    assert_refused(capsys, [*SMALL, "--image", str(photo), *flags], out, needle)
    assert time.perf_counter() - started < 60 and not out.exists()


def _png_header(width: int, height: int, mode: int = 2) -> bytes:
    """A PNG that claims ``width`` x ``height`` (8-bit, RGB) and holds one row of pixels: the header is all PIL
    reads to size it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (1 + 3 * min(width, 64)))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height, needle", [
    (20000, 20000, "decompression bomb"),  # 400 megapixels: beyond PIL's own limit
    (12000, 12000, "a 12000 x 12000 photo makes a working size of 12000 x 12000"),  # 144 MP: within PIL's
    (400000, 100, "a run takes at most 4194304 pixels"),  # a very wide one, resized up to the process size
])
def test_a_photo_too_large_to_run_is_refused_from_its_header(tmp_path, capsys, width, height, needle):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(width, height))
    err = assert_refused(capsys, [*SMALL, "--image", str(path)], tmp_path / "out", str(path))
    assert needle in err.replace("\n", " "), err


def test_a_16_bit_greyscale_photo_keeps_its_tones_and_a_nan_tiff_is_refused(tmp_path, capsys):
    from pasd_verify.pipeline.command import load_photo

    ramp = np.linspace(0, 65535, 64 * 80).reshape(64, 80).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    photo, _ = load_photo(tmp_path / "grey16.png")
    rgb = np.asarray(photo).astype(int)
    assert photo.mode == "RGB" and np.abs(rgb[..., 0] - np.round(ramp / 257)).max() <= 1
    assert (rgb == 255).mean() < 0.01  # not clipped to white
    Image.fromarray(np.full((64, 80), np.nan, np.float32)).save(tmp_path / "nan.tiff")
    assert_refused(capsys, [*SMALL, "--image", str(tmp_path / "nan.tiff")], tmp_path / "out", "nan.tiff: a F image with 5120 "
             "NaN or Inf pixel(s)")
    assert not (tmp_path / "out").exists()


def test_an_image_that_is_a_fifo_with_no_writer_is_refused_without_waiting(tmp_path, capsys):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    # a guard, so that a hang fails the test instead of the session: a writer opens (and closes) it after 60 s
    guard = threading.Timer(60, lambda: open(fifo, "wb").close())
    guard.start()
    try:
        started = time.perf_counter()
        assert_refused(capsys, [*SMALL, "--image", str(fifo)], tmp_path / "out", f"{fifo}: not a readable image: it is "
                 "a FIFO, not a regular file")
        assert time.perf_counter() - started < 30
    finally:
        guard.cancel()


def test_a_noise_file_that_is_no_npz_is_named_without_talk_of_pickles(tmp_path, photo, capsys):
    npy = tmp_path / "noise.npy"
    np.save(npy, np.zeros((1, 4, 8, 10), np.float32))
    assert_refused(capsys, [*SMALL, "--image", str(photo), "--noise", str(npy)], tmp_path / "out",
             f"{npy}: not a readable noise file (.npz): not a zip of arrays", "this is a single .npy array")
    junk = tmp_path / "noise.npz"
    junk.write_bytes(os.urandom(4096))
    err = assert_refused(capsys, [*SMALL, "--image", str(photo), "--noise", str(junk)], tmp_path / "out",
                   f"{junk}: not a readable noise file (.npz): not a zip of arrays")
    assert "pickle" not in err.lower()


def test_a_noise_member_of_another_shape_is_refused_from_its_header_unread(tmp_path, photo, capsys):
    """An npz member that claims 256 MB (and holds a few bytes): refused by its header, never allocated."""
    import zipfile

    from numpy.lib import format as npy

    path = tmp_path / "noise.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("first.npy", "w") as f:
            npy.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (1, 4, 4000, 4000)})
            f.write(b"\x00" * 64)
        with archive.open("start.npy", "w") as f:
            np.save(f, np.array("noise"))
    assert_refused(capsys, [*SMALL, "--image", str(photo), "--noise", str(path)], tmp_path / "out",
             f"{path}: first is float32 (1, 4, 4000, 4000); this run needs float32 (1, 4, 8, 10)")


def test_a_conditioning_scale_that_overflows_the_fp32_reference_is_bad_input(tmp_path, photo, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, [*SMALL, "--image", str(photo), "--conditioning-scale", "1e38"], out,
             "the fp32 reference run's latent is NaN or Inf after step 0", "--conditioning-scale 1e+38")
    assert not out.exists()


# --- the SD1.5 and PASD folders -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny preset in the layouts users hold."""
    return write_folders(tmp_path_factory.mktemp("folders"))


def _scheduler(config):
    def edit(sd, pasd):
        path = sd / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    return edit


def _small_vocabulary(sd, pasd):
    """A text encoder whose weights match its config, of a vocabulary smaller than the tokenizer's: its embedding
    fails on the first prompt's ids otherwise."""
    from pasd_verify.presets import build_text_encoder

    shutil.rmtree(sd / "text_encoder")
    build_text_encoder("tiny", seed=0, vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1).save_pretrained(
        sd / "text_encoder")


def _swap(sd, pasd):
    (pasd / "unet").rename(pasd / "was_unet")
    (pasd / "controlnet").rename(pasd / "unet")
    (pasd / "was_unet").rename(pasd / "controlnet")


@pytest.mark.parametrize("edit, needles", [
    (_scheduler(lambda c: [c]),
     ["scheduler_config.json: not a scheduler config: expected a JSON object, found a list"]),
    (_scheduler(lambda c: {**c, "prediction_type": "banana"}), ["scheduler_config.json: prediction_type 'banana'"]),
    (_scheduler(lambda c: {**c, "_class_name": "NoSuchScheduler"}),
     ["scheduler_config.json: _class_name 'NoSuchScheduler' is not a diffusers scheduler"]),
    (_scheduler(lambda c: {**c, "beta_schedule": "zzz"}), ["scheduler_config.json: UniPC cannot be built"]),
    (lambda sd, pasd: (sd / "tokenizer" / "vocab.json").write_text("{not json"), ["tokenizer: not a CLIP tokenizer"]),
    (_small_vocabulary,
     ["text_encoder/config.json: vocab_size 100 is smaller than the tokenizer's", "a tokenizer of another model?"]),
    (_swap, ["unet: holds a pasd-controlnet", "are unet/ and controlnet/ swapped?"]),
])
def test_a_broken_or_swapped_folder_is_named_before_any_work(tmp_path, folders, photo, capsys, edit, needles):
    sd, pasd = (shutil.copytree(f, tmp_path / f.name) for f in folders)
    edit(sd, pasd)
    out = tmp_path / "out"
    assert_refused(capsys, ["--process-size", "64", "--steps", "1", "--image", str(photo), "--sd-dir", str(sd),
                      "--pasd-dir", str(pasd)], out, *needles)
    assert not out.exists()


# --- --export-dir: another network's graph, a broken context binary ----------------------------------------------

def _graph(path, inputs, outputs, *, context: str | None = None):
    """A graph with the given inputs and outputs ({name: shape}); with ``context``, a context model whose one
    EPContext node names the binary ``context`` beside it, as onnxruntime-qnn writes them."""
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs.items()]
    if context is None:
        nodes = [helper.make_node("Identity", [next(iter(inputs))], [o]) for o in outputs]
        model = helper.make_model(helper.make_graph(nodes, "g", ins, outs))
    else:
        nodes = [helper.make_node("EPContext", list(inputs), list(outputs), domain="com.microsoft", embed_mode=0,
                                  ep_cache_context=context, main_context=1, source="QNNExecutionProvider")]
        model = helper.make_model(helper.make_graph(nodes, "g", ins, outs),
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


CONTROLNET_INPUTS = {"sample": (1, 4, 8, 10), "timestep": (1,), "encoder_hidden_states": (1, 77, 32),
                     "control_image": (1, 3, 64, 80)}


def test_another_networks_graph_in_a_slot_is_named_with_the_inputs_expected_and_found(tmp_path, photo, capsys):
    exports = tmp_path / "exports"
    _graph(exports / "unet" / "model.qdq.onnx", CONTROLNET_INPUTS, {"mid_residual": (1, 4, 8, 10)})
    assert_refused(capsys, [*SMALL, "--image", str(photo), "--export-dir", str(exports), "--backend", "unet=qdq"],
             tmp_path / "out", f"{exports / 'unet' / 'model.qdq.onnx'}: not an export of this run's unet: its graph "
             "takes ['control_image', 'encoder_hidden_states', 'sample', 'timestep']", "unet takes [")
    _graph(exports / "text_encoder" / "model.qdq.onnx", {"latent": (1, 4, 8, 10)}, {"image": (1, 3, 64, 80)})
    assert_refused(capsys, [*SMALL, "--image", str(photo), "--export-dir", str(exports), "--backend", "text_encoder=qdq"],
             tmp_path / "out", "text_encoder/model.qdq.onnx: not an export of this run's text_encoder",
             "text_encoder takes ['input_ids']")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("binary, needle", [(None, "model_ctx_qnn.bin does not exist"),
                                            (b"", "model_ctx_qnn.bin is empty")])
def test_a_missing_or_empty_context_binary_is_named_before_any_work(tmp_path, photo, capsys, binary, needle):
    folder = tmp_path / "exports" / "vae_decoder"
    _graph(folder / "model_ctx.onnx", {"latent": (1, 4, 8, 10)}, {"image": (1, 3, 64, 80)},
           context="model_ctx_qnn.bin")
    if binary is not None:
        (folder / "model_ctx_qnn.bin").write_bytes(binary)
    err = assert_refused(capsys, [*SMALL, "--image", str(photo), "--export-dir", str(tmp_path / "exports"), "--backend",
                            "vae_decoder=htp"], tmp_path / "out", str(folder / "model_ctx_qnn.bin"), needle)
    assert "fp32 reference run" not in err and not (tmp_path / "out").exists()


@pytest.mark.htp
def test_a_context_binary_of_random_bytes_is_named_before_any_work(tmp_path, photo, capsys):
    from pasd_verify.export.htp import htp_available

    if htp_available() is not None:
        pytest.skip(htp_available())
    folder = tmp_path / "exports" / "vae_decoder"
    _graph(folder / "model_ctx.onnx", {"latent": (1, 4, 8, 10)}, {"image": (1, 3, 64, 80)},
           context="model_ctx_qnn.bin")
    (folder / "model_ctx_qnn.bin").write_bytes(np.random.default_rng(0).bytes(49152))
    err = assert_refused(capsys, [*SMALL, "--image", str(photo), "--export-dir", str(tmp_path / "exports"), "--backend",
                            "vae_decoder=htp"], tmp_path / "out", f"{folder / 'model_ctx.onnx'} (and the context "
                   "binary it names) cannot be loaded on the HTP backend")
    assert "fp32 reference run" not in err and not (tmp_path / "out").exists()
