"""Export: float ONNX agrees with torch, the exact rewrites are exact, AIMET's encodings fit the graph they name.

The HTP checks (compile, run, localize a divergence) are in ``test_export_htp.py`` under the ``htp`` marker.
"""

from __future__ import annotations

import gc
import json
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pasd_verify.export import pipeline
from pasd_verify.kinds import graph_of as export_graph, preset_model
from pasd_verify.export.htp import HtpResult
from pasd_verify.export.localize import extract_prefix, graph_blocks
from pasd_verify.export.agreement import relative_error, sqnr_db
from pasd_verify.export.onnx_io import export_float, large_constants, run_onnx
from pasd_verify.export.quantize import (_quiet_aimet, check_encoding_names, export_quantized,
                                         place_static_encodings, quantization_sim, sim_outputs)
from pasd_verify.export.rewrites import SiLUAsDivision, apply_onnx_rewrites, apply_rewrites, unshare_initializers
from pasd_verify.quant.calibration import seeded_samples
from pasd_verify.sha import convert_to_sha

KINDS = ("unet", "pasd-unet", "pasd-controlnet", "text-encoder", "vae-encoder", "vae-decoder")
# the kinds each rewrite has a pattern in: SiLU modules everywhere but CLIP (quick-GELU); LayerNorms in the UNets'
# transformers and in CLIP, none in the VAE (GroupNorm)
SILU_KINDS = tuple(k for k in KINDS if k != "text-encoder")
LAYERNORM_KINDS = tuple(k for k in KINDS if not k.startswith("vae-"))


def _numpy(feeds):
    return {k: v.numpy() for k, v in feeds.items()}


def _graph_and_feeds(kind: str, form: str, latent: tuple[int, int], seed: int = 0):
    loaded = preset_model("tiny", kind, form=form)
    model, controlnet = loaded.model, loaded.partner
    graph = export_graph(model)
    sample = seeded_samples(model, 1, latent=latent, seed=seed)[0]
    return model, graph, graph.feeds(sample, controlnet)


@settings(max_examples=6)
@given(kind=st.sampled_from(KINDS), form=st.sampled_from(("mha", "sha")),
       latent=st.tuples(st.sampled_from((8, 16, 24)), st.sampled_from((8, 16, 24))), seed=st.integers(0, 100))
def test_float_onnx_matches_the_torch_model(tmp_path_factory, kind, form, latent, seed):
    """The folded static-shape ONNX graph computes what the torch model computes, at any latent size it takes."""
    _, graph, feeds = _graph_and_feeds(kind, form, latent, seed)
    path = export_float(graph, feeds, tmp_path_factory.mktemp("onnx") / "model.onnx")
    reference = {k: v.numpy() for k, v in graph(feeds).items()}
    got = run_onnx(path, _numpy(feeds))
    assert list(got) == graph.output_names
    for name in graph.output_names:
        assert got[name].shape == reference[name].shape, name
        assert relative_error(reference[name], got[name]) <= 1e-4, name
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input if i.name in feeds] == [n for n in graph.input_names if n in feeds]
    # static shapes: the shape arithmetic torch writes is folded away
    assert not {n.op_type for n in model.graph.node} & {"Shape", "Gather", "Where", "ConstantOfShape"}


def test_pasd_graphs_name_every_residual_and_side_output():
    loaded = preset_model("tiny", "pasd-unet")
    unet, controlnet = loaded.model, loaded.partner
    unet_graph, cn_graph = export_graph(unet), export_graph(controlnet)
    skips = sum(len(b.resnets) for b in unet.up_blocks)
    assert unet_graph.input_names[3:] == [f"down_residual_{i}" for i in range(skips)] + ["mid_residual"]
    assert cn_graph.output_names == [f"rgb_{i}" for i in range(3)] + [f"down_residual_{i}" for i in range(skips)] + [
        "mid_residual"]
    # the ControlNet graph's outputs are the PASD UNet graph's inputs, shape for shape
    sample = seeded_samples(unet, 1)[0]
    produced = cn_graph(cn_graph.feeds(sample))
    consumed = unet_graph.feeds(sample, controlnet)
    for name in unet_graph.input_names[3:]:
        assert torch.equal(produced[name], consumed[name]), name


@settings(max_examples=50)
@given(values=st.lists(st.floats(-90.0, 90.0, width=32), min_size=1, max_size=64))
def test_silu_as_division_is_silu(values):
    """x / (1 + exp(-x)) against SiLU computed in float64: fp32 rounding apart, for any finite input.

    Below x = -88.7, exp(-x) overflows fp32 and the division gives -0 where SiLU is about -1e-37: the absolute
    floor of 1e-30 covers that, and is far below any quantization step."""
    x = torch.tensor(values, dtype=torch.float32)
    exact = F.silu(x.double())
    got = SiLUAsDivision()(x).double()
    assert torch.all((got - exact).abs() <= 4 * torch.finfo(torch.float32).eps * exact.abs() + 1e-30)
    assert torch.equal(SiLUAsDivision()(x.double()), x.double() / (1 + torch.exp(-x.double())))


@pytest.mark.parametrize("kind", SILU_KINDS)
def test_silu_rewrite_keeps_the_model_output(kind):
    model, graph, feeds = _graph_and_feeds(kind, "sha", (8, 8))
    before = graph(feeds)
    counts = apply_rewrites(model, ["silu-as-division"])
    assert counts["silu-as-division"] > 0
    assert not any(isinstance(m, torch.nn.SiLU) for m in model.modules())
    after = graph(feeds)
    for name, value in before.items():
        assert relative_error(value.numpy(), after[name].numpy()) <= 1e-5, name


def test_large_float_graph_keeps_its_weights_in_one_file_beside_it(tmp_path):
    """Over the protobuf limit the weights go to ONE ``<stem>.data`` file (torch's own exporter writes one file per
    tensor); forced here on the tiny SHA PASD UNet, whose graph then computes exactly what the inline graph does."""
    _, graph, feeds = _graph_and_feeds("pasd-unet", "sha", (8, 8))
    for folder in ("inline", "external"):
        (tmp_path / folder).mkdir()
    inline = export_float(graph, feeds, tmp_path / "inline" / "model.onnx", large=False)
    external = export_float(graph, feeds, tmp_path / "external" / "model.onnx", large=True)
    assert sorted(p.name for p in external.parent.iterdir()) == ["model.data", "model.onnx"]
    assert sorted(p.name for p in inline.parent.iterdir()) == ["model.onnx"]
    model = onnx.load(str(external), load_external_data=False)
    stored = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert stored and {e.value for i in stored for e in i.external_data if e.key == "location"} == {"model.data"}
    assert all(len(i.raw_data) <= 1024 for i in model.graph.initializer if i not in stored)
    onnx.checker.check_model(str(external))
    ours, reference = run_onnx(external, _numpy(feeds)), run_onnx(inline, _numpy(feeds))
    for name in graph.output_names:
        assert np.array_equal(ours[name], reference[name]), name


def _external_ranges(path) -> list[tuple[int, int]]:
    """(offset, length) of every initializer stored in the graph's external-data file, in file order."""
    model = onnx.load(str(path), load_external_data=False)
    ranges = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in init.external_data}
            ranges.append((int(where.get("offset", 0)), int(where["length"])))
    return sorted(ranges)


def test_large_export_stores_each_weight_once(tmp_path, monkeypatch):
    """In the large layout every byte of ``model.data`` and ``model.qdq.data`` belongs to a weight: the ONNX rewrite
    edits the graph alone (saving the weights again appended a second, dead copy: 4.4 GB at SD1.5 size)."""
    monkeypatch.setattr(pipeline, "EXTERNAL_DATA_BYTES", 0)  # the tiny model in the SD1.5 layout
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # the HTP steps are not what this is about
    model = preset_model("tiny", "unet").model
    convert_to_sha(model)
    report = pipeline.export_files(model, tmp_path, pipeline.ExportConfig(
        samples=1, rewrites=("layernorm-identity-mul",), localize=False))
    assert report["stages"]["float_export"]["rewrites"]["layernorm-identity-mul"] > 0
    for graph in ("model", "model.qdq"):
        ranges = _external_ranges(tmp_path / f"{graph}.onnx")
        assert ranges, graph
        for (offset, length), (following, _) in zip(ranges, ranges[1:]):
            assert offset + length <= following, f"{graph}: weights overlap at byte {following}"
        stored = sum(length for _, length in ranges)
        size = (tmp_path / f"{graph}.data").stat().st_size
        assert size - stored < 4096 * len(ranges), f"{graph}.data: {size - stored} of {size} bytes hold no weight"
        assert ranges[-1][0] + ranges[-1][1] == size


def test_nothing_of_aimet_waits_for_a_collection_at_the_htp_step(tmp_path, monkeypatch):
    """aimet-onnx's sim and the onnx-ir graph the QDQ build works on live in reference cycles: the export collects
    them once the QDQ graph is written, so that their graphs and weights (8.8 GB at SD1.5 size) are not held beside
    the CPU run of the QDQ graph and the HTP child."""
    import onnx_ir
    from aimet_onnx.quantsim import QuantizationSimModel

    kinds = (QuantizationSimModel, onnx_ir.Node, onnx_ir.Value)
    counts = []

    def htp_step(*args, **kwargs):  # gc.get_objects() also lists unreachable objects not yet collected
        counts.append(sum(isinstance(o, kinds) for o in gc.get_objects()))
        gc.collect()
        counts.append(sum(isinstance(o, kinds) for o in gc.get_objects()))
        return HtpResult("skipped", error="not what this test is about")

    monkeypatch.setattr(pipeline, "run_on_htp", htp_step)
    model = preset_model("tiny", "unet").model
    gc.collect()
    gc.disable()  # whether a collection happens on its own depends on how much Python allocates meanwhile
    try:
        pipeline.export_files(model, tmp_path, pipeline.ExportConfig(samples=1, localize=False))
    finally:
        gc.enable()
    waiting, alive = counts
    assert waiting == alive, f"{waiting - alive} aimet-onnx or onnx-ir objects were garbage at the HTP step"


def test_check_outputs_hold_the_check_input_and_what_each_step_computed_from_it(tmp_path, monkeypatch):
    """The ``.npz`` that lets two exports be compared afterwards (MHA against SHA at SD1.5 size): rerunning the
    torch model and the written QDQ graph on its stored input gives its stored outputs; without an HTP it stores
    no HTP outputs; it is no part of the export folder."""
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)
    loaded = preset_model("tiny", "pasd-unet")
    model, controlnet = loaded.model, loaded.partner
    path = tmp_path / "check.npz"
    report = pipeline.export_files(model, tmp_path / "out", pipeline.ExportConfig(
        samples=1, localize=False, check_outputs=str(path)), partner=controlnet)
    graph = export_graph(model)
    with np.load(path) as stored:
        saved = {key: stored[key] for key in stored.files}
    inputs = {k.removeprefix("input/"): v for k, v in saved.items() if k.startswith("input/")}
    assert sorted(inputs) == sorted(graph.input_names)
    assert sorted(saved) == sorted([f"input/{n}" for n in graph.input_names] +
                                   [f"{step}/{n}" for step in ("fp32", "qdq_cpu") for n in graph.output_names])
    fp32 = graph({k: torch.from_numpy(v) for k, v in inputs.items()})
    qdq = run_onnx(tmp_path / "out" / "model.qdq.onnx", inputs)
    for name in graph.output_names:
        assert np.array_equal(saved[f"fp32/{name}"], fp32[name].detach().numpy()), name
        assert np.array_equal(saved[f"qdq_cpu/{name}"], qdq[name]), name
    assert report["htp_skipped"] and "check.npz" not in report["outputs"]
    assert not list(tmp_path.glob(".check.npz.*")), "the atomic write left its temporary file"


@pytest.mark.parametrize("kind", LAYERNORM_KINDS)
def test_layernorm_identity_mul_leaves_the_float_graph_bit_identical(tmp_path, kind):
    """x * 1.0 == x in IEEE arithmetic: every output of the rewritten graph equals the original's bit for bit."""
    _, graph, feeds = _graph_and_feeds(kind, "mha", (8, 8))
    path = export_float(graph, feeds, tmp_path / "model.onnx")
    model = onnx.load(str(path))
    consumed = {name for n in model.graph.node for name in n.input}
    # those that feed an op (CLIP's final LayerNorm makes the graph's output, which no op reads)
    norms = sum(n.op_type == "LayerNormalization" and n.output[0] in consumed for n in model.graph.node)
    assert apply_onnx_rewrites(model, ["layernorm-identity-mul"]) == {"layernorm-identity-mul": norms} and norms
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "rewritten.onnx"))
    before, after = run_onnx(path, _numpy(feeds)), run_onnx(tmp_path / "rewritten.onnx", _numpy(feeds))
    for name in graph.output_names:
        assert np.array_equal(before[name], after[name]), name
    # every LayerNorm output now reaches its consumers only through the Mul
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        for name in node.input:
            if name in producers and producers[name].op_type == "LayerNormalization":
                assert node.op_type == "Mul" and node.name.endswith("identity_mul"), node.name


def _shared_biases(model: onnx.ModelProto) -> list[str]:
    """Initializers that feed the bias input of more than one Gemm/Conv node (those aimet-onnx cannot encode)."""
    initializers = {i.name for i in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Gemm", "Conv", "ConvTranspose") and len(node.input) > 2 and node.input[2] in initializers:
            consumers[node.input[2]] = consumers.get(node.input[2], 0) + 1
    return [name for name, count in consumers.items() if count > 1]


def test_the_float_export_gives_every_bias_its_own_initializer_and_computes_the_same(tmp_path, caplog):
    """The seeded CLIP's zero biases are one initializer in torch's export: aimet-onnx's ConnectedGraph warns that it
    cannot compute their encodings. The export's float graph has none shared, and its outputs are unchanged."""
    from aimet_onnx.meta.connectedgraph import ConnectedGraph

    _, graph, feeds = _graph_and_feeds("text-encoder", "sha", (8, 8))
    path = export_float(graph, feeds, tmp_path / "plain.onnx")
    model = onnx.load(str(path))
    assert _shared_biases(model)  # the case at hand
    assert unshare_initializers(model) > 0
    assert _shared_biases(model) == []
    onnx.save(model, str(tmp_path / "unshared.onnx"))
    before, after = run_onnx(path, _numpy(feeds)), run_onnx(tmp_path / "unshared.onnx", _numpy(feeds))
    for name in graph.output_names:
        assert np.array_equal(before[name], after[name]), name

    exported = pipeline.float_export(graph, feeds, _numpy(feeds), tmp_path, pipeline.ExportConfig(), large=False)
    written = onnx.load(str(exported.path))
    assert _shared_biases(written) == [] and exported.result.numbers["shared_initializers_duplicated"] > 0
    with caplog.at_level("WARNING", logger="ConnectedGraph"):
        ConnectedGraph(written)
    assert "consumed by multiple nodes" not in caplog.text


def test_aimet_onnx_warnings_stay_out_of_the_terminal_unless_verbose(tmp_path):
    """aimet-onnx's log areas print to the console (a handler of their own, not propagated); the export keeps them
    quiet, as aimet-torch's, and --verbose (pasd-verify's logging at INFO) lets them through. What reaches a handler
    of the area's logger is what its console handler would print. The shared-bias warning is the one a newcomer saw."""
    import logging

    from aimet_onnx.meta.connectedgraph import ConnectedGraph

    _, graph, feeds = _graph_and_feeds("text-encoder", "sha", (8, 8))
    model = onnx.load(str(export_float(graph, feeds, tmp_path / "plain.onnx")))
    shown = {}
    ours, area = logging.getLogger("pasd_verify"), logging.getLogger("ConnectedGraph")
    for verbose in (False, True):
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append
        level = ours.level
        ours.setLevel(logging.INFO if verbose else logging.WARNING)
        area.addHandler(handler)
        try:
            with _quiet_aimet():
                ConnectedGraph(model)
        finally:
            ours.setLevel(level)
            area.removeHandler(handler)
        shown[verbose] = any("consumed by multiple nodes" in r.getMessage() for r in records)
    assert shown == {False: False, True: True}


@pytest.fixture(scope="module")
def quantized_tiny_sha(tmp_path_factory):
    """The tiny SHA UNet exported, calibrated by aimet-onnx (W8A16) and written as encodings + QDQ."""
    folder = tmp_path_factory.mktemp("quantized")
    model, graph, feeds = _graph_and_feeds("unet", "sha", (8, 8))
    calibration = [_numpy(graph.feeds(s)) for s in seeded_samples(model, 2, seed=3)]
    export_float(graph, feeds, folder / "model.onnx")
    (folder / "aimet").mkdir()
    sim = quantization_sim(folder / "model.onnx", calibration, workdir=folder / "aimet")
    sim_out = sim_outputs(sim, _numpy(feeds), graph.output_names)
    (folder / "aimet_own").mkdir()
    with _quiet_aimet():  # aimet-onnx's own export of its graph: what model.onnx stands in for
        sim.export(str(folder / "aimet_own"), "model", encoding_version="1.0.0")
        onnx.save(sim.to_onnx_qdq(), str(folder / "aimet_own" / "model.qdq.onnx"))
    paths = export_quantized(sim, folder, large=False)
    return {"sim_out": sim_out, "paths": paths, "feeds": feeds, "aimet_model": folder / "aimet_own" / "model.onnx",
            "aimet_qdq": folder / "aimet_own" / "model.qdq.onnx",
            "reference": {k: v.numpy() for k, v in graph(feeds).items()}, "graph": graph}


def test_model_onnx_is_the_graph_aimet_exports(quantized_tiny_sha):
    """``model.onnx`` is the float graph as exported, not aimet-onnx's re-serialization of it; the two are the same
    graph: every node (type, name, inputs, outputs, attributes), every weight bit for bit, the same inputs and
    outputs. The encodings name this graph, so the substitution must change nothing."""
    ours = onnx.load(str(quantized_tiny_sha["paths"]["model"]))
    aimet = onnx.load(str(quantized_tiny_sha["aimet_model"]))
    assert len(ours.graph.node) > 100 and list(ours.graph.node) == list(aimet.graph.node)
    assert list(ours.graph.input) == list(aimet.graph.input) and list(ours.graph.output) == list(aimet.graph.output)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in aimet.graph.initializer}
    assert [i.name for i in ours.graph.initializer] == list(weights)
    for init in ours.graph.initializer:
        assert np.array_equal(onnx.numpy_helper.to_array(init), weights[init.name]), init.name


def test_qdq_graph_is_the_one_aimet_converts(quantized_tiny_sha):
    """``write_qdq`` (aimet-onnx's QDQ steps on the float graph on disk) against aimet-onnx's own
    ``sim.to_onnx_qdq()``: the same nodes in the same order (names, inputs, outputs, axes, dtypes), the same
    constants bit for bit (pre-rounded weights, scales, zero points), the same opset, and on the CPU the same
    outputs bit for bit."""
    ours = onnx.load(str(quantized_tiny_sha["paths"]["qdq"]))
    aimet = onnx.load(str(quantized_tiny_sha["aimet_qdq"]))
    quantizers = sum(n.op_type == "QuantizeLinear" for n in aimet.graph.node)
    assert quantizers > 100 and list(ours.graph.node) == list(aimet.graph.node)
    assert {(o.domain, o.version) for o in ours.opset_import} == {(o.domain, o.version) for o in aimet.opset_import}
    theirs = {i.name: onnx.numpy_helper.to_array(i) for i in aimet.graph.initializer}
    assert sorted(i.name for i in ours.graph.initializer) == sorted(theirs)
    for init in ours.graph.initializer:
        value = onnx.numpy_helper.to_array(init)
        assert value.dtype == theirs[init.name].dtype and np.array_equal(value, theirs[init.name]), init.name
    feeds = _numpy(quantized_tiny_sha["feeds"])
    got, want = run_onnx(quantized_tiny_sha["paths"]["qdq"], feeds), run_onnx(quantized_tiny_sha["aimet_qdq"], feeds)
    for name in quantized_tiny_sha["graph"].output_names:
        assert np.array_equal(got[name], want[name]), name


def test_qdq_graph_on_the_cpu_is_the_aimet_sim(quantized_tiny_sha):
    """The QDQ graph holds the sim's quantizers: only float rounding apart (>= 40 dB), and both carry the
    quantization error of W8A16 against fp32 (well below the sim-vs-QDQ agreement)."""
    q = quantized_tiny_sha
    qdq = run_onnx(q["paths"]["qdq"], _numpy(q["feeds"]))["noise"]
    assert sqnr_db(q["sim_out"]["noise"], qdq) >= 40.0
    fp32_vs_qdq = sqnr_db(q["reference"]["noise"], qdq)
    assert 10.0 < fp32_vs_qdq < sqnr_db(q["sim_out"]["noise"], qdq)
    types = {n.op_type for n in onnx.load(str(q["paths"]["qdq"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= types


def test_encodings_name_the_graph_in_the_right_sections(quantized_tiny_sha):
    paths = quantized_tiny_sha["paths"]
    encodings = json.loads(paths["encodings"].read_text())
    model = onnx.load(str(paths["model"]))
    assert encodings["version"] == "1.0.0"
    assert check_encoding_names(encodings, model) == []
    assert large_constants(model, {e["name"] for e in encodings["param_encodings"]}) == []
    params = {e["name"] for e in encodings["param_encodings"]}
    # every SHA head's q/k/v conv weight has its own encoding, 8 bits, one scale per output channel
    heads = [n for n in params if "_convs." in n and n.endswith(".weight")]
    assert heads and all(n.replace("to_q_convs", "to_k_convs") in params for n in heads if "to_q_convs" in n)
    initializers = {i.name: i for i in model.graph.initializer}
    for entry in encodings["param_encodings"]:
        if entry["name"] in heads:
            assert entry["bw"] == 8 and len(entry["scale"]) == initializers[entry["name"]].dims[0]


def test_encoding_name_check_finds_planted_defects(quantized_tiny_sha):
    """The check is not vacuous: a wrong name, and an activation listed as a parameter, are both reported."""
    paths = quantized_tiny_sha["paths"]
    encodings = json.loads(paths["encodings"].read_text())
    model = onnx.load(str(paths["model"]))
    activation = dict(encodings["activation_encodings"][5])
    encodings["param_encodings"].append(activation)
    encodings["activation_encodings"].append({**activation, "name": "no.such.tensor"})
    problems = check_encoding_names(encodings, model)
    assert any(activation["name"] in p and "not an initializer" in p for p in problems)
    assert any("no.such.tensor" in p for p in problems)


def test_static_encodings_move_to_the_parameter_section_without_touching_the_input(quantized_tiny_sha):
    paths = quantized_tiny_sha["paths"]
    model = onnx.load(str(paths["model"]))
    constant = next(i.name for i in model.graph.initializer)
    entry = {"name": constant, "bw": 16, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False,
             "offset": [0], "scale": [1.0]}
    original = {"version": "1.0.0", "activation_encodings": [entry], "param_encodings": []}
    snapshot = json.dumps(original)
    placed, moved = place_static_encodings(original, model)
    assert moved == [constant]
    assert placed["param_encodings"] == [entry] and placed["activation_encodings"] == []
    assert json.dumps(original) == snapshot


def test_diffusers_blocks_cut_from_the_qdq_graph_recompute_it_exactly(quantized_tiny_sha, tmp_path):
    """What block localization stands on: each diffusers block cut out of the QDQ graph, run on the CPU on its
    inputs as the whole graph computes them, gives the whole graph's values bit for bit; each block reads only
    graph inputs and what earlier blocks compute; the last one makes the graph's output."""
    blocks = _blocks_recompute_the_graph(quantized_tiny_sha["paths"]["qdq"], _numpy(quantized_tiny_sha["feeds"]),
                                         tmp_path)
    names = [b.name for b in blocks]
    assert names[-1] == "conv_out"
    assert {"conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0",
            "up_blocks.1"} == set(names[:-1])
    assert blocks[-1].outputs == ["noise"]


def _blocks_recompute_the_graph(qdq, feeds, tmp_path):
    """Cut every block out of ``qdq``; each, run alone on its inputs as the whole graph computes them, gives the
    whole graph's values bit for bit, and reads only graph inputs and what earlier blocks compute."""
    model = onnx.load(str(qdq))
    blocks = graph_blocks(model)
    names = [b.name for b in blocks]
    assert len(set(names)) == len(names)
    graph_inputs = [i.name for i in model.graph.input]
    wanted = sorted({t for b in blocks for t in b.inputs + b.outputs} - set(graph_inputs))
    whole = {**feeds, **run_onnx(extract_prefix(qdq, graph_inputs, wanted, tmp_path / "whole.onnx"), feeds, wanted)}
    made = set(graph_inputs)
    for block in blocks:
        assert set(block.inputs) <= made, (block.name, set(block.inputs) - made)
        path = extract_prefix(qdq, block.inputs, block.outputs, tmp_path / f"{block.name}.onnx")
        alone = run_onnx(path, {t: whole[t] for t in block.inputs}, block.outputs)
        for tensor in block.outputs:
            assert np.array_equal(alone[tensor], whole[tensor]), (block.name, tensor)
        made |= {o for node in onnx.load(str(path)).graph.node for o in node.output}
    return blocks


@pytest.mark.parametrize("kind, expected", [
    ("text-encoder", ["embeddings", "encoder.layers.0", "encoder.layers.1", "final_layer_norm"]),
    ("vae-decoder", ["post_quant_conv", "decoder.conv_in", "decoder.mid_block", "decoder.up_blocks.0",
                     "decoder.up_blocks.1", "decoder.up_blocks.2", "decoder.up_blocks.3", "decoder.conv_out"]),
])
def test_the_other_networks_are_localized_by_their_own_blocks(tmp_path, kind, expected):
    """The text encoder's layers and the VAE half's blocks (one level down, under encoder./decoder.) are the blocks
    a disagreement is looked for in, in data-flow order, and cut out they recompute the whole QDQ graph."""
    model, graph, feeds = _graph_and_feeds(kind, "sha", (2, 2))
    export_float(graph, feeds, tmp_path / "model.onnx")
    (tmp_path / "aimet").mkdir()
    sim = quantization_sim(tmp_path / "model.onnx", [_numpy(feeds)], workdir=tmp_path / "aimet")
    paths = export_quantized(sim, tmp_path, large=False)
    blocks = _blocks_recompute_the_graph(paths["qdq"], _numpy(feeds), tmp_path)
    assert [b.name for b in blocks] == expected


def test_sqnr_and_relative_error_are_what_they_say():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(1000)
    noise = rng.standard_normal(1000) * 0.01
    assert sqnr_db(a, a) == float("inf")
    expected = 10 * np.log10((a ** 2).sum() / (noise ** 2).sum())
    assert sqnr_db(a, a + noise) == pytest.approx(expected)
    assert relative_error(a, a + noise) == pytest.approx(np.abs(noise).max() / np.abs(a).max())


@pytest.mark.parametrize("flag,value,field", [
    ("--soc-model", "-1", "soc_model"), ("--htp-threshold-db", "nan", "htp_threshold_db"),
    ("--param-bw", "33", "param_bw"), ("--param-bw", "1", "param_bw"), ("--act-bw", "3", "act_bw"),
    ("--samples", "0", "samples")])
def test_an_export_option_out_of_range_is_refused_before_any_work(tmp_path, capsys, flag, value, field):
    """ExportConfig checks itself when made, before a model is built: exit 2 naming the option, nothing written
    (an --soc-model of -1 used to fail the compile and be reported as an HTP disagreement; a NaN threshold could
    never pass and sent the export into localization; a 33-bit weight was refused after the float export)."""
    from pasd_verify.cli import main

    out = tmp_path / "out"
    assert main(["export", "--preset", "tiny", "--kind", "unet", flag, value, "--out", str(out)]) == 2
    assert f"error: {field} must be" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("kind, form", [("text-encoder", "mha"), ("text-encoder", "sha"), ("unet", "sha")])
def test_mask_floor_raises_only_the_masks_and_leaves_the_float_graph_bit_identical(tmp_path, kind, form):
    """The text encoder's causal masks (one constant per layer, both forms) are raised to the floor and nothing else
    changes: every output bit-identical (float32's exp of a score 1000 below the row's largest is exactly 0, as
    of -3.4e38). A graph without a mask (the UNet) is left as it was."""
    from pasd_verify.export.rewrites import MASK_FLOOR, MASKED

    _, graph, feeds = _graph_and_feeds(kind, form, (8, 8))
    path = export_float(graph, feeds, tmp_path / "model.onnx")
    model = onnx.load(str(path))
    before = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    masks = [name for name, a in before.items() if a.dtype.kind == "f" and a.size and a.min() <= MASKED]
    assert len(masks) == (2 if kind == "text-encoder" else 0)  # the tiny text encoder has 2 layers
    assert apply_onnx_rewrites(model, ["mask-floor"]) == {"mask-floor": len(masks)}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, values in before.items():
        if name in masks:
            assert after[name].min() == MASK_FLOOR and np.array_equal(after[name] == MASK_FLOOR, values <= MASKED)
        else:
            assert np.array_equal(after[name], values), name
    onnx.save(model, str(tmp_path / "rewritten.onnx"))
    ours, original = run_onnx(tmp_path / "rewritten.onnx", _numpy(feeds)), run_onnx(path, _numpy(feeds))
    for name in graph.output_names:
        assert np.array_equal(ours[name], original[name]), name


def test_the_float_export_floors_masks_of_a_graph_with_its_weights_outside_it(tmp_path):
    """A model over 2 GB is written with its weights in model.data and its graph re-read without them for the
    ONNX rewrites: the mask floor must read those constants from the graph's folder (the SD1.5-size ControlNet and
    UNet exports failed here with 'should be stored in model.data, but it is not regular file'). The tiny text
    encoder is written the same way here: its causal masks lie in model.data too, and come back floored."""
    from pasd_verify.export.rewrites import MASK_FLOOR, MASKED, REWRITES

    _, graph, feeds = _graph_and_feeds("text-encoder", "sha", (8, 8))
    arrays = {k: v.numpy() for k, v in feeds.items()}
    result = pipeline.float_export(graph, feeds, arrays, tmp_path, pipeline.ExportConfig(rewrites=REWRITES),
                                   large=True)
    assert result.result.passed, result.result
    assert result.result.numbers["rewrites"]["mask-floor"] == 2  # one causal mask per layer of the tiny encoder
    stored = onnx.load(str(result.path), load_external_data=False)
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in stored.graph.initializer)
    values = [onnx.numpy_helper.to_array(i, str(tmp_path)) for i in stored.graph.initializer]
    floats = [v for v in values if v.dtype.kind == "f" and v.size]
    assert min(v.min() for v in floats) == MASK_FLOOR and not any(v.min() <= MASKED for v in floats)
