"""AdaRounded parameter encodings as export input: weights are found in the graph by content, encodings that do not
fit the model are refused before anything is written, and (``htp`` tier) the exported QDQ graph holds exactly the
weights AdaRound wrote, on AdaRound's grids, where a recalibrating export moves them."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx import numpy_helper

from pasd_verify.checkpoint import load_state_dict_file, save_state_dict_file
from pasd_verify.cli import main
from pasd_verify.encodings import EncodingsError, save_encodings
from pasd_verify.export.frozen import (ON_GRID_STEPS, adarounded_entries, initializers_holding, off_grid_steps,
                                       onnx_param_encodings)
from pasd_verify.kinds import graph_of as export_graph
from pasd_verify.export.htp import htp_available
from pasd_verify.export.onnx_io import export_float
from pasd_verify.presets import build_unet
from pasd_verify.quant.adaround import AdaroundConfig, adaround
from pasd_verify.quant.calibration import model_calls, seeded_samples
from pasd_verify.quant.workflow import param_encodings_file
from pasd_verify.sha import convert_to_sha


# --- the grid check -----------------------------------------------------------------------------------------

@given(bw=st.integers(2, 16), channels=st.integers(1, 5), per_channel=st.booleans(), data=st.data())
def test_weights_built_on_a_grid_lie_on_it_and_moved_ones_do_not(bw, channels, per_channel, data):
    """A weight written as float32 (q + offset) * scale is within ON_GRID_STEPS of its grid; moving one element by
    a fraction of a step, or past the grid's end, is seen by that many steps."""
    grids = channels if per_channel else 1
    scales = data.draw(st.lists(st.floats(1e-5, 1.0), min_size=grids, max_size=grids))
    offsets = data.draw(st.lists(st.sampled_from([-(2 ** (bw - 1)), 0]), min_size=grids, max_size=grids))
    codes = data.draw(st.lists(st.integers(0, 2**bw - 1), min_size=channels * 6, max_size=channels * 6))
    rows = np.array(codes, dtype=np.float64).reshape(channels, 6)
    scale = np.array(scales)[:, None] if per_channel else scales[0]
    offset = np.array(offsets)[:, None] if per_channel else offsets[0]
    weight = torch.from_numpy(((rows + offset) * scale).astype(np.float32)).reshape(channels, 3, 2)
    entry = {"bw": bw, "dtype": "INT", "enc_type": "PER_CHANNEL" if per_channel else "PER_TENSOR", "is_sym": True,
             "scale": scales, "offset": offsets, "name": "w"}
    assert off_grid_steps(weight, entry) <= ON_GRID_STEPS

    channel, column = data.draw(st.integers(0, channels - 1)), data.draw(st.integers(0, 5))
    step = scales[channel if per_channel else 0]
    fraction = data.draw(st.floats(0.05, 0.45)) * data.draw(st.sampled_from([-1, 1]))
    moved = weight.clone().reshape(channels, 6)
    moved[channel, column] += fraction * step
    assert off_grid_steps(moved.reshape(weight.shape), entry) >= 0.999 * abs(fraction) - ON_GRID_STEPS
    beyond = weight.clone().reshape(channels, 6)
    beyond[channel, column] = (2**bw + 1 + offsets[channel if per_channel else 0]) * step  # two steps past the top
    assert off_grid_steps(beyond.reshape(weight.shape), entry) >= 2 - ON_GRID_STEPS


# --- finding the weights in the graph -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sha_graph(tmp_path_factory):
    """The tiny SHA UNet with its first down block AdaRounded (2 iterations), its AdaRound encodings file and its
    float ONNX graph, plus the model as it was before rounding."""
    folder = tmp_path_factory.mktemp("frozen")
    model = build_unet("tiny", seed=0)
    convert_to_sha(model)
    original = copy.deepcopy(model)
    samples = seeded_samples(model, 1, latent=(8, 8))
    result = adaround(model, model_calls(model, samples), AdaroundConfig(iterations=2, only=("down_blocks.0",)),
                      progress=False)
    save_encodings(param_encodings_file(result, "1.0.0"), folder / "param.encodings")
    graph = export_graph(model)
    export_float(graph, graph.feeds(samples[0]), folder / "float.onnx")
    return {"model": model, "original": original, "encodings": folder / "param.encodings",
            "onnx": folder / "float.onnx", "folder": folder}


def test_every_conv_and_linear_weight_is_found_once_in_the_graph_some_only_transposed(tiny_sha_graph):
    model, path = tiny_sha_graph["model"], tiny_sha_graph["onnx"]
    weights = {f"{n}.weight": m.weight for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    found = initializers_holding(path, weights)
    arrays = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    transposed = 0
    for name, initializers in found.items():
        assert len(initializers) == 1, (name, initializers)
        array, weight = arrays[initializers[0]], weights[name].detach().numpy()
        if not np.array_equal(array, weight):
            assert weight.ndim == 2 and np.array_equal(array, weight.T), name
            transposed += 1
    # a Linear on a 3-D input is a MatMul on a folded, renamed transpose: why names alone cannot be used
    assert transposed > 0


def test_adarounded_encodings_name_the_graph_initializers_holding_their_weights(tiny_sha_graph):
    g = tiny_sha_graph
    entries = adarounded_entries(g["encodings"], g["model"])
    written = json.loads(g["encodings"].read_text())["param_encodings"]
    assert sorted(entries) == sorted(e["name"] for e in written)
    frozen = onnx_param_encodings(entries, g["model"], g["onnx"], "param.encodings")
    arrays = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(g["onnx"])).graph.initializer}
    assert len(frozen["param_encodings"]) == len(entries)
    parameters = dict(g["model"].named_parameters())
    by_grid = {json.dumps({k: v for k, v in e.items() if k != "name"}, sort_keys=True): e["name"] for e in written}
    for entry in frozen["param_encodings"]:
        grid = json.dumps({k: v for k, v in entry.items() if k != "name"}, sort_keys=True)
        weight = parameters[by_grid[grid]].detach().numpy()
        array = arrays[entry["name"]]
        assert np.array_equal(array, weight) or np.array_equal(array, weight.T), entry["name"]


def test_encodings_of_weights_that_were_not_rounded_are_refused_naming_file_and_key(tiny_sha_graph):
    g = tiny_sha_graph
    with pytest.raises(EncodingsError, match=r"param\.encodings: down_blocks\.0\.\S+\.weight: the model's weight "
                                             r"lies up to [\d.]+ grid steps off"):
        adarounded_entries(g["encodings"], g["original"])


def _edited(path, tmp_path, edit) -> str:
    encodings = json.loads(path.read_text())
    edit(encodings["param_encodings"])
    out = tmp_path / "edited.encodings"
    out.write_text(json.dumps(encodings))
    return str(out)


def test_encodings_that_do_not_fit_the_model_are_refused(tiny_sha_graph, tmp_path):
    g = tiny_sha_graph

    def rename(entries):
        entries[0]["name"] = "down_blocks.0.nothing.weight"

    def one_channel_short(entries):
        entry = next(e for e in entries if e["enc_type"] == "PER_CHANNEL")
        entry["scale"], entry["offset"] = entry["scale"][:-1], entry["offset"][:-1]

    with pytest.raises(EncodingsError, match=r"edited\.encodings: down_blocks\.0\.nothing\.weight: names no parameter"):
        adarounded_entries(_edited(g["encodings"], tmp_path, rename), g["model"])
    with pytest.raises(EncodingsError, match=r"per-channel encodings for \d+ output channels"):
        adarounded_entries(_edited(g["encodings"], tmp_path, one_channel_short), g["model"])
    with pytest.raises(EncodingsError, match=r"edited\.encodings: no parameter encodings to freeze"):
        adarounded_entries(_edited(g["encodings"], tmp_path, list.clear), g["model"])


def test_identical_weights_with_different_grids_cannot_be_told_apart(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1, bias=False), torch.nn.Conv2d(2, 2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 0.25]]).reshape(2, 2, 1, 1))
        model[1].weight.copy_(model[0].weight)
    torch.onnx.export(model, (torch.ones(1, 2, 3, 3),), str(tmp_path / "two.onnx"), dynamo=False,
                      do_constant_folding=False)
    grid = {"bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": True, "offset": [-128]}
    same = {"0.weight": {**grid, "scale": [1 / 128], "name": "0.weight"},
            "1.weight": {**grid, "scale": [1 / 128], "name": "1.weight"}}
    frozen = onnx_param_encodings(same, model, tmp_path / "two.onnx", "two.encodings")
    # torch's exporter may share one initializer between the two; whatever holds them takes the grid they share
    holders = {i.name for i in onnx.load(str(tmp_path / "two.onnx")).graph.initializer}
    assert {e["name"] for e in frozen["param_encodings"]} == holders
    different = {**same, "1.weight": {**grid, "scale": [1 / 64], "name": "1.weight"}}
    with pytest.raises(EncodingsError, match=r"two\.encodings: 0\.weight, 1\.weight have bit-identical weights but "
                                             r"different grids"):
        onnx_param_encodings(different, model, tmp_path / "two.onnx", "two.encodings")


def test_export_refuses_a_bad_encodings_file_before_writing_anything(tmp_path, capsys):
    bad = tmp_path / "bad.encodings"
    bad.write_text('{"version": "1.0.0", "param_encodings": [')
    out = tmp_path / "out"
    assert main(["export", "--preset", "tiny", "--kind", "unet", "--param-encodings", str(bad), "--out", str(out)]) == 2
    assert f"{bad}: malformed JSON" in capsys.readouterr().err
    assert not out.exists()


# --- end to end on the HTP ----------------------------------------------------------------------------------

_INTEGER_RANGES = {onnx.TensorProto.INT4: (-8, 7), onnx.TensorProto.UINT4: (0, 15), onnx.TensorProto.INT8: (-128, 127),
                   onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT16: (-(2**15), 2**15 - 1),
                   onnx.TensorProto.UINT16: (0, 2**16 - 1)}


def _dequantized_initializers(path) -> list[np.ndarray]:
    """Every constant the QDQ graph at ``path`` quantizes, as its DequantizeLinear gives it back: ONNX's
    QuantizeLinear (round half to even, saturate to the zero point's integer type) and DequantizeLinear, written
    out here in float64."""
    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    values = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers:
            continue
        x = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        zero_point = initializers[node.input[2]]
        zero = numpy_helper.to_array(zero_point).astype(np.float64)
        if scale.ndim == 1 and x.ndim > 1:  # per axis
            shape = [1] * x.ndim
            shape[next((a.i for a in node.attribute if a.name == "axis"), 1)] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        low, high = _INTEGER_RANGES[zero_point.data_type]
        q = np.clip(np.rint(x / scale) + zero, low, high)
        values.append((q - zero) * scale)
    return values


def _reproduced(weights: dict[str, torch.Tensor], dequantized: list[np.ndarray]) -> set[str]:
    """The weights some dequantized constant equals (or its transpose), to float32 rounding of their values."""
    hits = set()
    for name, weight in weights.items():
        w = weight.double().numpy()
        for d in dequantized:
            for form in ([w, w.T] if w.ndim == 2 else [w]):
                if d.shape == form.shape and np.abs(d - form).max() <= 1e-6 * np.abs(form).max():
                    hits.add(name)
    return hits


@pytest.mark.htp
@pytest.mark.skipif(htp_available() is not None, reason=str(htp_available()))
def test_adaround_then_export_ships_the_rounded_weights_on_their_grids(tmp_path, monkeypatch, capsys):
    """``pasd-verify adaround`` (W4, the default) then ``pasd-verify export --param-encodings`` (W8A16 for the rest):
    every AdaRounded weight comes out of the QDQ graph exactly, at 4 bits, and the export passes on the HTP.
    Without the encodings the export requantizes the same weights onto 8-bit min-max grids and moves them."""
    unet = build_unet("tiny", seed=0)
    unet.save_pretrained(tmp_path / "unet")
    model = ["--model-config", str(tmp_path / "unet"), "--latent", "8", "8", "--samples", "2"]
    assert main(["adaround", *model, "--state-dict", str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"),
                 "--iterations", "2", "--out", str(tmp_path / "ada")]) == 0
    rounded = load_state_dict_file(tmp_path / "ada" / "adarounded.safetensors")
    adarounded = {e["name"] for e in json.loads((tmp_path / "ada" / "param_encodings.encodings").read_text())[
        "param_encodings"]}
    weights = {name: rounded[name] for name in adarounded}
    export = [*model, "--state-dict", str(tmp_path / "ada" / "adarounded.safetensors")]

    assert main(["export", *export, "--param-encodings", str(tmp_path / "ada" / "param_encodings.encodings"),
                 "--out", str(tmp_path / "frozen")]) == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "frozen" / "report.json").read_text())
    calibration = report["stages"]["calibration"]
    assert calibration["adarounded_parameters"] == len(adarounded) == calibration["frozen_param_encodings"]
    assert report["stages"]["encodings_and_qdq"]["problems"] == []
    assert report["stages"]["htp"]["htp"]["status"] == "passed" and report["passed"] is True
    assert _reproduced(weights, _dequantized_initializers(tmp_path / "frozen" / "model.qdq.onnx")) == adarounded
    exported = json.loads((tmp_path / "frozen" / "model.encodings").read_text())["param_encodings"]
    assert sum(e["bw"] == 4 for e in exported) == len(adarounded)

    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # only the QDQ graph matters for the contrast
    main(["export", *export, "--no-localize", "--out", str(tmp_path / "recalibrated")])
    moved = adarounded - _reproduced(weights, _dequantized_initializers(tmp_path / "recalibrated" / "model.qdq.onnx"))
    assert len(moved) >= 0.9 * len(adarounded)


@pytest.mark.htp
@pytest.mark.skipif(htp_available() is not None, reason=str(htp_available()))
def test_an_sd15_text_encoder_folder_goes_through_adaround_and_export_to_the_htp(tmp_path, capsys):
    """A user's ``text_encoder/`` folder as SD1.5 ships it (transformers 4.x's ``text_model.`` prefix and
    ``position_ids`` in ``model.safetensors``), tiny: AdaRound on it, then the export of the rounded weights with
    their grids frozen. Every AdaRounded weight (the per-head q/k/v convs, out_proj, the MLP's fc1/fc2) comes out of
    the QDQ graph exactly, and the graph passes on the HTP."""
    from pasd_verify.presets import build_text_encoder

    folder = tmp_path / "text_encoder"
    build_text_encoder("tiny", seed=5).save_pretrained(folder)
    state = load_state_dict_file(folder / "model.safetensors")
    save_state_dict_file({**{"text_model." + k: v for k, v in state.items()},
                          "text_model.embeddings.position_ids": torch.arange(77)[None]}, folder / "model.safetensors")
    model = ["--model-config", str(folder), "--samples", "2"]
    assert main(["adaround", *model, "--state-dict", str(folder / "model.safetensors"), "--iterations", "2",
                 "--out", str(tmp_path / "ada")]) == 0
    rounded = load_state_dict_file(tmp_path / "ada" / "adarounded.safetensors")
    adarounded = {e["name"] for e in json.loads((tmp_path / "ada" / "param_encodings.encodings").read_text())[
        "param_encodings"]}
    assert any("q_proj_convs" in n for n in adarounded) and any("mlp.fc2" in n for n in adarounded)
    assert main(["export", *model, "--state-dict", str(tmp_path / "ada" / "adarounded.safetensors"),
                 "--param-encodings", str(tmp_path / "ada" / "param_encodings.encodings"),
                 "--out", str(tmp_path / "frozen")]) == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "frozen" / "report.json").read_text())
    assert report["graph"]["kind"] == "text-encoder" and report["passed"] is True
    assert report["stages"]["calibration"]["frozen_param_encodings"] == len(adarounded)
    weights = {name: rounded[name] for name in adarounded}
    assert _reproduced(weights, _dequantized_initializers(tmp_path / "frozen" / "model.qdq.onnx")) == adarounded
