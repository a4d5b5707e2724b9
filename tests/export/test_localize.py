"""Localizing a divergence without an HTP: the block and op search of ``export/localize.py`` on tiny 16-bit QDQ
graphs built here with ``onnx.helper``, named as the exporter names nodes (``/unet/down_blocks.0/resnets.0/act2/Mul``),
run on onnxruntime's CPU. The device is the search's ``run`` input: each test passes a stand-in that runs the graph it
is handed on the CPU after breaking one named op (a Neg after it: with a zero point of 0 the op's quantized result
is then 0, so its own SQNR is exactly 0 dB while an untouched prefix agrees at inf dB), or that reports a crash,
failure or timeout for graphs holding given nodes. Every expected block, tensor, probe order and file is written
out by hand from the graph below (these tests are the mutation gate's for ``export/localize.py``); the real HTP's
localization is proven in the htp tier (test_export_htp.py, tests/pipeline/test_planted.py)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper

from pasd_verify.export.htp import HtpResult
from pasd_verify.export.localize import (Block, Divergence, _captured, _depths, _entering, _scope, _used_feeds,
                                         activation_points, block_of, extract_prefix, graph_blocks, judge_blocks,
                                         localize, localize_op, module_of, op_pattern, producers, tensor_blocks,
                                         upstream_points)
from pasd_verify.export.onnx_io import run_onnx

INF = math.inf
SHAPE = [1, 4, 2, 2]


# --- graphs ---------------------------------------------------------------------------------------------------

class Graph:
    """A QDQ graph under construction: uint16 activations with scale 1/256 and zero point 0, weights 0.5."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def qdq(self, tensor: str, q_name: str | None = None, dq_name: str | None = None, out: str | None = None) -> str:
        scale, zero = f"{tensor}_s", f"{tensor}_z"
        self.inits += [numpy_helper.from_array(np.array(1 / 256, np.float32), scale),
                       numpy_helper.from_array(np.array(0, np.uint16), zero)]
        out = out or f"{tensor}_dq"
        self.nodes += [oh.make_node("QuantizeLinear", [tensor, scale, zero], [f"{tensor}_q"],
                                    name=q_name or f"{tensor}_QuantizeLinear"),
                       oh.make_node("DequantizeLinear", [f"{tensor}_q", scale, zero], [out],
                                    name=dq_name or f"{tensor}_DequantizeLinear")]
        return out

    def weight(self, name: str, value: float = 0.5) -> str:
        self.inits.append(numpy_helper.from_array(np.full([1, 4, 1, 1], value, np.float32), name))
        return self.qdq(name)

    def op(self, name: str, op_type: str, inputs: list[str], out: str) -> str:
        """``out`` made by the op named ``name``, then quantized: returns its DequantizeLinear's output."""
        self.nodes.append(oh.make_node(op_type, inputs, [out], name=name))
        return self.qdq(out)

    def model(self, inputs: list[str], outputs: list[str], quantized: tuple[str, ...] = ()) -> onnx.ModelProto:
        """The graph, its float ``inputs`` and the ``quantized`` (uint16) ones, checked by onnx's checker."""
        graph = oh.make_graph(self.nodes, "g",
                              [oh.make_tensor_value_info(i, TensorProto.FLOAT, SHAPE) for i in inputs]
                              + [oh.make_tensor_value_info(i, TensorProto.UINT16, SHAPE) for i in quantized],
                              [oh.make_tensor_value_info(o, TensorProto.FLOAT, SHAPE) for o in outputs], self.inits)
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])
        onnx.checker.check_model(model)
        return model

    def save(self, path: Path, inputs: list[str], outputs: list[str]) -> Path:
        onnx.save(self.model(inputs, outputs), str(path))
        return path


# The search's graph: a UNet in miniature. The text keys' branch is computed first (as the exporter can order it);
# down_blocks.0 has two outputs that up_blocks.0 reads; the trunk from x to noise has 9 activations:
#   x_dq a_dq s_dq m_dq r_dq d_dq u_dq v_dq noise       (depths 2 5 8 11 14 17 20 23 26; text_dq 2, k_dq 5)
CONV_IN = "/unet/conv_in/Mul"
ACT = "/unet/down_blocks.0/resnets.0/act/Sigmoid"
ACT2 = "/unet/down_blocks.0/resnets.0/act2/Mul"
CONV1 = "/unet/down_blocks.0/resnets.0/conv1/Add"
DOWN = "/unet/down_blocks.0/downsamplers.0/conv/Add"
UP = "/unet/up_blocks.0/resnets.0/Sum"
TO_K = "/unet/up_blocks.0/attentions.0/to_k/Mul"
ATTN = "/unet/up_blocks.0/attentions.0/Add"
CONV_OUT = "/unet/conv_out/Mul"


def unet(path: Path) -> Path:
    g = Graph()
    text = g.qdq("text")
    w = g.weight("w")
    k = g.op(TO_K, "Mul", [text, w], "k")
    x = g.qdq("x")
    a = g.op(CONV_IN, "Mul", [x, w], "a")
    s = g.op(ACT, "Sigmoid", [a], "s")
    m = g.op(ACT2, "Mul", [a, s], "m")
    r = g.op(CONV1, "Add", [m, w], "r")
    d = g.op(DOWN, "Add", [r, w], "d")
    u = g.op(UP, "Sum", [d, r], "u")
    v = g.op(ATTN, "Add", [u, k], "v")
    g.nodes.append(oh.make_node("Mul", [v, w], ["o"], name=CONV_OUT))
    g.qdq("o", q_name="oq", dq_name="odq", out="noise")  # quantizers AIMET adds are not named by scope
    return g.save(path, ["text", "x"], ["noise"])


def on_grid(seed: int) -> np.ndarray:
    """Values in [0.5, 2) on the quantization grid, so that x_dq == x and a == x / 2 exactly."""
    return (np.random.default_rng(seed).integers(128, 512, SHAPE) / 256).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def own_folder(tmp_path_factory):
    """The tests run in a folder of their own: a graph saved at a relative path by mistake (``str(None)``) is not
    left in the working directory for a later run to read."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture
def graph(tmp_path):
    return unet(tmp_path / "unet.qdq.onnx")


@pytest.fixture
def feeds():
    # "unused" is no input of the graph: a device is handed the graph's own inputs only
    return {"text": on_grid(1), "x": on_grid(2), "unused": np.zeros(3, np.float32)}


# --- the device -----------------------------------------------------------------------------------------------

class Device:
    """A stand-in for :func:`~pasd_verify.export.htp.run_on_htp`, keeping what it was handed: it reports ``status``
    (with ``error``) for every graph that holds all the nodes named in ``refuse``, and otherwise runs the graph on
    onnxruntime's CPU with the op named ``negate`` computing the negation of its result."""

    def __init__(self, tmp_path: Path, *, negate: str | None = None, refuse: set[str] | None = None,
                 status: str = "crashed", error: str = "SIGSEGV while compiling", shift: dict[str, float] | None = None,
                 nan: str | None = None):
        self.folder, self.negate, self.refuse, self.status, self.error = tmp_path, negate, refuse, status, error
        self.shift, self.nan = shift or {}, nan  # ops whose result is moved by a constant; an output read as NaN
        self.calls: list[dict] = []

    def __call__(self, graph, feeds, *, soc_model, timeout):
        model = onnx.load(str(graph))
        self.calls.append({"graph": Path(graph).name, "feeds": sorted(feeds), "soc_model": soc_model,
                           "timeout": timeout, "outputs": [o.name for o in model.graph.output]})
        if self.refuse and self.refuse <= {n.name for n in model.graph.node}:
            return HtpResult(self.status, error=self.error)
        for i, node in enumerate(list(model.graph.node)):
            if node.name == self.negate or node.name in self.shift:
                out = node.output[0]
                node.output[0] = f"{out}_raw"
                at = list(model.graph.node).index(node) + 1
                if node.name == self.negate:
                    model.graph.node.insert(at, oh.make_node("Neg", [f"{out}_raw"], [out]))
                else:
                    model.graph.initializer.append(
                        numpy_helper.from_array(np.array(self.shift[node.name], np.float32), f"{out}_shift"))
                    model.graph.node.insert(at, oh.make_node("Add", [f"{out}_raw", f"{out}_shift"], [out]))
        path = self.folder / f"device{len(self.calls)}.onnx"
        onnx.save(model, str(path))
        outputs = run_onnx(path, feeds)
        if self.nan in outputs:
            outputs[self.nan] = np.full_like(outputs[self.nan], np.nan)
        return HtpResult("passed", 0.0, 0.0, outputs=outputs)

    def graphs(self) -> list[tuple[str, list[str]]]:
        return [(c["graph"], c["outputs"]) for c in self.calls]


def probe(tensor: str, sqnr: float | None, status: str = "passed") -> dict:
    """A probe as the search records it, bad below 30 dB or when the device did not pass."""
    return {"tensor": tensor, "htp": status, "sqnr_db": sqnr, "bad": sqnr is None or sqnr < 30.0}


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def npz_keys(path: Path) -> set[str]:
    with np.load(path) as data:
        return set(data.files)


# --- the pure helpers: expectations written from the names ---------------------------------------------------

@pytest.mark.parametrize("module, block", [
    ("down_blocks.1.resnets.0.conv1", "down_blocks.1"),
    ("up_blocks.3", "up_blocks.3"),
    ("mid_block.attentions.0.proj_in", "mid_block"),
    ("controlnet_down_blocks.3", "controlnet_down_blocks.3"),
    ("controlnet_cond_embedding.conv_in", "controlnet_cond_embedding"),
    ("time_proj", "time_embedding"),
    ("time_embedding.linear_1", "time_embedding"),
    ("conv_norm_out", "conv_out"),
    ("conv_act", "conv_out"),
    ("conv_out", "conv_out"),
    ("conv_in", "conv_in"),
    ("down_blocks.x", "down_blocks"),
    ("decoder.up_blocks.2.resnets.1", "decoder.up_blocks.2"),
    ("encoder.mid_block.attentions.0", "encoder.mid_block"),
    ("encoder.layers.7.mlp.fc1", "encoder.layers.7"),
    ("encoder.conv_norm_out", "encoder.conv_out"),
    ("decoder.conv_in", "decoder.conv_in"),
    ("encoder", "encoder"),
    ("", ""),
])
def test_block_of_names_the_diffusers_block(module, block):
    assert block_of(module) == block


identifiers = st.from_regex(r"[a-z][a-z_]{0,8}[a-z]", fullmatch=True)


@given(st.sampled_from(["", "encoder.", "decoder."]), st.sampled_from(["down_blocks", "up_blocks", "layers"]),
       st.integers(0, 30), st.lists(st.one_of(identifiers, st.integers(0, 9).map(str)), max_size=4))
def test_a_numbered_block_is_its_first_two_names_in_either_half(half, kind, index, rest):
    assert block_of(".".join([f"{half}{kind}", str(index), *rest])) == f"{half}{kind}.{index}"


def _named(name: str) -> onnx.NodeProto:
    return oh.make_node("Relu", ["i"], ["o"], name=name)


@pytest.mark.parametrize("name, scope", [
    ("/unet/down_blocks.0/resnets.0/conv1/Conv", "down_blocks.0.resnets.0.conv1"),
    ("/unet/conv_in/Conv", "conv_in"),
    ("/text_encoder/encoder/layers.7/mlp/fc1/MatMul", "encoder.layers.7.mlp.fc1"),
    ("//unet//mid_block///Softmax", "mid_block"),
    ("unet/mid_block/attentions.0/Softmax", "mid_block.attentions.0"),
    ("/unet/Mul", ""),
    ("Mul_12", ""),
    ("", ""),
])
def test_scope_is_the_dotted_path_between_the_wrapper_and_the_op(name, scope):
    assert _scope(_named(name)) == scope


def test_op_pattern_follows_first_inputs_past_quantizers_oldest_first():
    g = Graph()
    g.nodes.append(oh.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(SHAPE, np.float32))))
    g.nodes.append(oh.make_node("Cast", ["k"], ["kc"], to=TensorProto.FLOAT))
    c = g.op("/unet/conv_in/Relu", "Relu", ["x"], "c")
    g.nodes.append(oh.make_node("Relu", [c], ["r"], name="/unet/down_blocks.0/Relu"))
    g.nodes.append(oh.make_node("Reshape", ["r", "shape"], ["rs"], name="/unet/down_blocks.0/Reshape"))
    rs = g.qdq("rs")
    ad = g.op("/unet/down_blocks.0/Add", "Add", [rs, "kc"], "ad")
    sg = g.op("/unet/down_blocks.0/Sigmoid", "Sigmoid", [ad], "sg")
    mm = g.op("/unet/down_blocks.0/MatMul", "MatMul", [sg, "kc"], "mm")
    producer = producers(g.model(["x", "shape"], [mm]))
    assert op_pattern(producer, "mm_dq") == ["Relu", "Reshape", "Add", "Sigmoid", "MatMul"]
    assert op_pattern(producer, "mm_dq", length=6) == ["Relu", "Relu", "Reshape", "Add", "Sigmoid", "MatMul"]
    assert op_pattern(producer, "mm_dq", length=9) == ["Relu", "Relu", "Reshape", "Add", "Sigmoid", "MatMul"]
    assert op_pattern(producer, "mm_dq", length=1) == ["MatMul"]
    assert op_pattern(producer, "mm_dq", length=0) == []
    assert op_pattern(producer, "c_q") == ["Relu"]
    assert op_pattern(producer, "kc") == ["Constant", "Cast"]
    assert op_pattern(producer, "x") == []


def _points_graph() -> onnx.ModelProto:
    g = Graph()
    x = g.qdq("x")
    w = g.weight("w")  # a float weight behind its own quantizer
    g.inits += [numpy_helper.from_array(np.full([1, 4, 1, 1], 128, np.uint16), "wq"),  # a weight stored quantized
                numpy_helper.from_array(np.array(1 / 256, np.float32), "wq_s"),
                numpy_helper.from_array(np.array(0, np.uint16), "wq_z")]
    g.nodes.append(oh.make_node("DequantizeLinear", ["wq", "wq_s", "wq_z"], ["wq_dq"], name="wq_DequantizeLinear"))
    c = g.op("/unet/conv_in/Mul", "Mul", [x, w], "c")
    # an input that arrives quantized: its DequantizeLinear is an activation, with no quantizer before it
    g.nodes.append(oh.make_node("DequantizeLinear", ["xq", "wq_s", "wq_z"], ["xq_dq"], name="xq_DequantizeLinear"))
    g.op("/unet/down_blocks.0/Sum", "Sum", [c, "wq_dq", "xq_dq"], "b")
    return g.model(["x"], ["b_dq"], quantized=("xq",))


def test_activation_points_are_the_dequantized_activations_in_order_not_weights():
    model = _points_graph()
    assert activation_points(model, producers(model)) == ["x_dq", "c_dq", "xq_dq", "b_dq"]


def test_upstream_points_are_the_nearest_activations_through_unquantized_ops_each_once():
    g = Graph()
    x = g.qdq("x")
    a = g.op("/unet/conv_in/Mul", "Mul", [x, x], "a")
    g.nodes.append(oh.make_node("Relu", [a], ["p"], name="/unet/down_blocks.0/Relu"))  # not quantized
    g.nodes.append(oh.make_node("Clip", ["p", "", "x"], ["pc"], name="/unet/down_blocks.0/Clip"))  # "": no min
    q = g.op("/unet/down_blocks.0/Add", "Add", ["pc", a], "q")
    model = g.model(["x"], [q])
    producer, points = producers(model), {"x_dq", "a_dq", "q_dq"}
    assert upstream_points(producer, "q_dq", points) == ["a_dq"]  # reached along two paths, found once
    assert upstream_points(producer, "q", points) == ["a_dq"]
    assert upstream_points(producer, "a_dq", points) == ["x_dq"]
    assert upstream_points(producer, "x_dq", points) == []  # a graph input's quantizer: no op behind it
    assert upstream_points(producer, "x", points) == []


def test_the_module_of_a_tensor_is_its_ops_scope_else_the_ops_name_else_the_tensor():
    g = Graph()
    x = g.qdq("x")
    a = g.op("/unet/down_blocks.0/resnets.0/conv1/Mul", "Mul", [x, x], "a")
    b = g.op("Relu_7", "Relu", [a], "b")  # a node that AIMET added, named without a scope
    producer = producers(g.model(["x"], [b]))
    assert module_of(producer, "a_dq") == "down_blocks.0.resnets.0.conv1"
    assert module_of(producer, "a") == "down_blocks.0.resnets.0.conv1"
    assert module_of(producer, "b_dq") == "Relu_7"
    assert module_of(producer, "x_dq") == "x_dq"


def test_depths_are_the_longest_path_in_nodes_from_the_inputs():
    g = Graph()
    g.nodes += [oh.make_node("Relu", ["x"], ["a"]),
                oh.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(SHAPE, np.float32))),
                oh.make_node("Add", ["a", "k"], ["b"]),
                oh.make_node("Add", ["x", "w"], ["c"]),
                oh.make_node("Sum", ["b", "c", "a"], ["d"])]
    g.inits.append(numpy_helper.from_array(np.ones(SHAPE, np.float32), "w"))
    assert _depths(g.model(["x"], ["d"])) == {"a": 1, "k": 1, "b": 2, "c": 1, "d": 3}


def test_entering_starts_a_block_before_the_quantizer_of_what_enters_it():
    g = Graph()
    x = g.qdq("x")
    a = g.op("/unet/conv_in/Mul", "Mul", [x, x], "a")
    g.nodes.append(oh.make_node("DequantizeLinear", ["xq", "a_s", "a_z"], ["xq_dq"]))
    g.nodes.append(oh.make_node("Cast", [a], ["ac"], to=TensorProto.UINT16))
    g.nodes.append(oh.make_node("DequantizeLinear", ["ac", "a_s", "a_z"], ["ac_dq"]))
    producer = producers(g.model(["x"], ["ac_dq"], quantized=("xq",)))
    assert _entering(producer, "a_dq") == "a"
    assert _entering(producer, "x_dq") == "x"
    assert _entering(producer, "x") == "x"  # a graph input
    assert _entering(producer, "xq_dq") == "xq_dq"  # quantized before the graph: no quantizer to start before
    assert _entering(producer, "ac_dq") == "ac_dq"  # what feeds the DequantizeLinear is no QuantizeLinear


def test_tensor_blocks_come_from_the_scope_else_from_the_first_input_with_a_block():
    g = Graph()
    x = g.qdq("x")
    w = g.weight("w")
    a = g.op("/unet/conv_in/Mul", "Mul", [x, w], "a")
    g.nodes.append(oh.make_node("Add", [x, a], ["b"], name="Add_1"))  # added by AIMET: x_dq has no block, a_dq has
    g.nodes.append(oh.make_node("Relu", ["b"], ["c"], name="/unet/Relu"))  # scoped by the wrapper alone
    g.nodes.append(oh.make_node("Sigmoid", ["c"], ["e"], name="/unet/time_proj/Sigmoid"))
    g.nodes.append(oh.make_node("Relu", ["e"], ["f"], name="rewrite/down_blocks.9/Relu"))  # not the exporter's scope
    blocks = tensor_blocks(g.model(["x"], ["f"]))
    assert blocks == {"x_q": None, "x_dq": None, "w_q": None, "w_dq": None, "a": "conv_in", "a_q": "conv_in",
                      "a_dq": "conv_in", "b": "conv_in", "c": "conv_in", "e": "time_embedding", "f": "time_embedding"}


def _flow_graph() -> onnx.ModelProto:
    """up_blocks.0 reads down_blocks.0, whose last output (read by conv_out) comes after up_blocks.0's: by position
    up_blocks.0 would come first. x is read by two blocks."""
    g = Graph()
    x = g.qdq("x")
    c = g.op("/unet/conv_in/Relu", "Relu", [x], "c")
    r = g.op("/unet/down_blocks.0/resnets.0/Add", "Add", [c, x], "r")
    v = g.op("/unet/up_blocks.0/resnets.0/Relu", "Relu", [r], "v")
    h = g.op("/unet/down_blocks.0/downsamplers.0/Sigmoid", "Sigmoid", [r], "h")
    o = g.op("/unet/conv_out/Add", "Add", [v, h], "o")
    return g.model(["x"], [o])


def _cycle_graph() -> onnx.ModelProto:
    """down_blocks.0 and down_blocks.1 read each other; down_blocks.1's output comes before down_blocks.0's last."""
    g = Graph()
    x = g.qdq("x")
    a = g.op("/unet/down_blocks.0/Relu", "Relu", [x], "a")
    b = g.op("/unet/down_blocks.1/Sigmoid", "Sigmoid", [a], "b")
    c = g.op("/unet/down_blocks.0/Add", "Add", [b, a], "c")
    return g.model(["x"], [c])


def _dead_branch_graph() -> onnx.ModelProto:
    """conv_in computes an activation that nothing reads."""
    g = Graph()
    c = g.op("/unet/conv_in/Relu", "Relu", [g.qdq("x")], "c")
    g.op("/unet/conv_in/Sigmoid", "Sigmoid", [c], "z")
    o = g.op("/unet/conv_out/Relu", "Relu", [c], "o")
    return g.model(["x"], [o])


@pytest.mark.parametrize("build, expected", [
    (lambda tmp: onnx.load(str(unet(tmp / "unet.onnx"))),
     [Block("conv_in", ["x"], ["a_dq"]), Block("down_blocks.0", ["a"], ["r_dq", "d_dq"]),
      Block("up_blocks.0", ["d", "r", "text"], ["v_dq"]), Block("conv_out", ["v"], ["noise"])]),
    (lambda tmp: _flow_graph(),
     [Block("conv_in", ["x"], ["c_dq"]), Block("down_blocks.0", ["c", "x"], ["r_dq", "h_dq"]),
      Block("up_blocks.0", ["r"], ["v_dq"]), Block("conv_out", ["h", "v"], ["o_dq"])]),
    (lambda tmp: _cycle_graph(),
     [Block("down_blocks.1", ["a"], ["b_dq"]), Block("down_blocks.0", ["b", "x"], ["a_dq", "c_dq"])]),
    (lambda tmp: _dead_branch_graph(), [Block("conv_in", ["x"], ["c_dq"]), Block("conv_out", ["c"], ["o_dq"])]),
], ids=["unet", "data-flow-not-position", "cycle-by-position", "dead-branch"])
def test_graph_blocks_in_data_flow_order(tmp_path, build, expected):
    assert graph_blocks(build(tmp_path)) == expected


@given(st.lists(st.lists(st.sampled_from(["Relu", "Sigmoid", "Abs"]), min_size=1, max_size=3), min_size=1,
                max_size=4))
def test_a_chain_of_blocks_is_cut_at_each_blocks_last_activation(ops):
    g, tensor = Graph(), "x"
    current = g.qdq("x")
    expected = []
    for i, block_ops in enumerate(ops):
        entering = tensor
        for j, op_type in enumerate(block_ops):
            tensor = f"t{i}_{j}"
            current = g.op(f"/unet/down_blocks.{i}/op{j}/{op_type}", op_type, [current], tensor)
        expected.append(Block(f"down_blocks.{i}", [entering], [current]))
    assert graph_blocks(g.model(["x"], [current])) == expected


def test_extract_prefix_saves_what_computes_the_outputs_from_the_inputs(graph, tmp_path):
    one = extract_prefix(graph, ["a"], "r_dq", tmp_path / "one.onnx")
    assert one == tmp_path / "one.onnx"
    model = onnx.load(str(one))
    assert [i.name for i in model.graph.input] == ["a"] and [o.name for o in model.graph.output] == ["r_dq"]
    assert {n.name for n in model.graph.node} == {
        "a_QuantizeLinear", "a_DequantizeLinear", ACT, "s_QuantizeLinear", "s_DequantizeLinear", ACT2,
        "m_QuantizeLinear", "m_DequantizeLinear", "w_QuantizeLinear", "w_DequantizeLinear", CONV1,
        "r_QuantizeLinear", "r_DequantizeLinear"}
    two = extract_prefix(str(graph), ["r"], ["d_dq", "r_dq"], str(tmp_path / "two.onnx"))
    assert two == tmp_path / "two.onnx"
    assert [o.name for o in onnx.load(str(two)).graph.output] == ["d_dq", "r_dq"]


def test_extract_prefix_cuts_a_graph_that_onnxs_checker_refuses(tmp_path):
    """A graph output with no declared type: onnx's checker refuses the graph, onnxruntime runs it, and a prefix is
    cut from it all the same (the search checks no graph, it runs them)."""
    nodes = [oh.make_node("Relu", ["x"], ["t"], name="/unet/conv_in/Relu"),
             oh.make_node("Sigmoid", ["t"], ["y"], name="/unet/conv_out/Sigmoid")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [oh.make_empty_tensor_value_info("y")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]), str(tmp_path / "m.onnx"))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(str(tmp_path / "m.onnx"))
    prefix = extract_prefix(tmp_path / "m.onnx", ["x"], "t", tmp_path / "t.onnx")
    values = run_onnx(prefix, {"x": np.array([-1.0, 2.0], np.float32)})
    assert list(values) == ["t"] and values["t"].tolist() == [0.0, 2.0]


def test_captured_values_are_the_feeds_and_what_the_cpu_computes_from_them(graph, feeds, tmp_path):
    values = _captured(graph, ["text", "x"], feeds, ["a", "x"], tmp_path)
    assert set(values) == {"a", "x"} and values["x"] is feeds["x"]
    assert np.array_equal(values["a"], feeds["x"] * 0.5)  # x is on the grid: a = x_dq * w_dq = x / 2 exactly
    assert listing(tmp_path) == {"unet.qdq.onnx"}  # the capturing graph is not left behind
    assert _captured(graph, ["text", "x"], feeds, ["text"], tmp_path) == {"text": feeds["text"]}


def test_used_feeds_are_the_graphs_inputs_read_without_its_weights(tmp_path, feeds):
    g = Graph()
    a = g.op("/unet/conv_in/Mul", "Mul", [g.qdq("x"), g.weight("w")], "a")
    model = g.model(["x"], [a])
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    (tmp_path / "m.data").unlink()  # a large graph's weights are not read to learn its inputs
    assert _used_feeds(tmp_path / "m.onnx", feeds) == {"x": feeds["x"]}


def test_a_divergence_as_a_dict():
    found = Divergence("m_dq", "down_blocks.0.resnets.0.act2", ["Mul"], "passed", 0.0, "divergences/r.qdq.onnx",
                       [probe("m_dq", 0.0)], "down_blocks.0", [{"block": "conv_in"}])
    assert found.as_dict() == {"tensor": "m_dq", "module": "down_blocks.0.resnets.0.act2", "op_pattern": ["Mul"],
                               "htp_status": "passed", "sqnr_db": 0.0, "reproducer": "divergences/r.qdq.onnx",
                               "probes": [probe("m_dq", 0.0)], "block": "down_blocks.0",
                               "blocks": [{"block": "conv_in"}]}


# --- the search by op -----------------------------------------------------------------------------------------

TRUNK = ["x_dq", "a_dq", "s_dq", "m_dq", "r_dq", "d_dq", "u_dq", "v_dq", "noise"]


@pytest.mark.parametrize("broken, tensor, module, probes, good", [
    # the output first, then the trunk bisected (r_dq, the middle of 9), then the found op's other inputs; good:
    # the probed tensors upstream of the broken op
    (CONV_IN, "a_dq", "conv_in", ["noise", "r_dq", "s_dq", "a_dq", "x_dq"], {"x_dq"}),
    (ACT, "s_dq", "down_blocks.0.resnets.0.act", ["noise", "r_dq", "s_dq", "a_dq"], {"a_dq"}),
    (ACT2, "m_dq", "down_blocks.0.resnets.0.act2", ["noise", "r_dq", "s_dq", "m_dq", "a_dq"], {"s_dq", "a_dq"}),
    (CONV1, "r_dq", "down_blocks.0.resnets.0.conv1", ["noise", "r_dq", "s_dq", "m_dq"], {"s_dq", "m_dq"}),
    (DOWN, "d_dq", "down_blocks.0.downsamplers.0.conv", ["noise", "r_dq", "u_dq", "d_dq"], {"r_dq"}),
    (UP, "u_dq", "up_blocks.0.resnets.0", ["noise", "r_dq", "u_dq", "d_dq"], {"r_dq", "d_dq"}),
    (ATTN, "v_dq", "up_blocks.0.attentions.0", ["noise", "r_dq", "u_dq", "v_dq", "k_dq"], {"r_dq", "u_dq", "k_dq"}),
    (CONV_OUT, "noise", "conv_out", ["noise", "r_dq", "u_dq", "v_dq"], {"r_dq", "u_dq", "v_dq"}),
    # off the trunk: v_dq is the trunk's first bad tensor, its other input k_dq is bad, and the search restarts there
    (TO_K, "k_dq", "up_blocks.0.attentions.0.to_k", ["noise", "r_dq", "u_dq", "v_dq", "k_dq", "text_dq"],
     {"r_dq", "u_dq", "text_dq"}),
])
def test_localize_op_bisects_the_trunk_and_checks_the_other_inputs(graph, feeds, tmp_path, broken, tensor, module,
                                                                   probes, good):
    device = Device(tmp_path, negate=broken)
    found = localize_op(graph, feeds, tmp_path / "out", output="noise", threshold_db=30.0, run=device)
    assert (found.tensor, found.module, found.htp_status, found.sqnr_db) == (tensor, module, "passed", 0.0)
    assert [p["tensor"] for p in found.probes] == probes
    for p in found.probes:  # the broken op's own output is 0 dB, what it feeds is off, an untouched prefix exact
        assert p["htp"] == "passed" and p["bad"] == (p["tensor"] not in good)
        if p["tensor"] in good or p["tensor"] == tensor:
            assert p["sqnr_db"] == (INF if p["tensor"] in good else 0.0)
        else:
            assert p["sqnr_db"] < 30.0
    name = module.replace(".", "_")
    assert found.reproducer == f"divergences/{name}.qdq.onnx"
    assert listing(tmp_path / "out" / "divergences") == {f"{name}.qdq.onnx", f"{name}.inputs.npz"}
    reproducer = onnx.load(str(tmp_path / "out" / found.reproducer))
    assert [o.name for o in reproducer.graph.output] == [tensor]
    assert npz_keys(tmp_path / "out" / "divergences" / f"{name}.inputs.npz") == {"text", "x"}
    assert [c["graph"] for c in device.calls] == ["probe.onnx"] * len(probes)
    assert [c["outputs"] for c in device.calls] == [[t] for t in probes]
    assert all(c["feeds"] == ["text", "x"] for c in device.calls)  # the graph's own inputs, not "unused"


def test_localize_op_writes_the_prefix_of_an_unnamed_op_as_the_graphs_reproducer(tmp_path):
    g = Graph()
    x = g.qdq("x")
    g.nodes.append(oh.make_node("Relu", [x], ["r"]))  # no name, so no module either
    r = g.qdq("r")
    path = g.save(tmp_path / "m.onnx", ["x"], [r])
    device = Device(tmp_path, refuse={""})
    out = tmp_path / "out" / "nested"  # made, parents and all
    found = localize_op(path, {"x": on_grid(0)}, out, output="r_dq", threshold_db=30.0, run=device)
    assert found == Divergence("r_dq", "", ["Relu"], "crashed", None, "divergences/graph.qdq.onnx",
                               [probe("r_dq", None, "crashed"), probe("x_dq", INF)])
    assert listing(out / "divergences") == {"graph.qdq.onnx", "graph.inputs.npz"}


@pytest.mark.parametrize("output", ["a", "w_dq", "nothing"])
def test_localize_op_refuses_an_output_that_is_no_quantized_activation(graph, feeds, tmp_path, output):
    device = Device(tmp_path)
    with pytest.raises(ValueError, match=f"^{re.escape(repr(output))} is not a quantized activation of "
                                         f"{re.escape(str(graph))}$"):
        localize_op(graph, feeds, tmp_path / "out", output=output, threshold_db=30.0, run=device)
    assert device.calls == [] and not (tmp_path / "out").exists()


def test_localize_op_is_none_when_the_outputs_own_prefix_agrees_at_the_threshold_inclusive(graph, feeds, tmp_path):
    """The broken to_k gives k_dq at exactly 0 dB: good at a threshold of 0 dB, bad just above it."""
    device = Device(tmp_path, negate=TO_K)
    lines: list[str] = []
    assert localize_op(graph, feeds, tmp_path / "out", output="k_dq", threshold_db=0.0, run=device,
                       log=lines.append) is None
    assert lines == ["localize: probe 1: k_dq: HTP passed, 0.0 dB"]
    assert listing(tmp_path / "out" / "divergences") == set()  # the probe's graph is not left behind
    found = localize_op(graph, feeds, tmp_path / "out", output="k_dq", threshold_db=0.5, run=device)
    assert (found.tensor, found.probes) == ("k_dq", [probe("k_dq", 0.0), probe("text_dq", INF)])


def test_localize_op_passes_the_soc_model_and_timeout_to_the_device_and_defaults_to_the_htps(graph, feeds, tmp_path):
    device = Device(tmp_path, negate=CONV_OUT)
    localize_op(graph, feeds, tmp_path / "a", output="noise", threshold_db=30.0, soc_model="69", timeout=7.0,
                run=device)
    assert {(c["soc_model"], c["timeout"]) for c in device.calls} == {("69", 7.0)}
    device.calls.clear()
    localize_op(graph, feeds, tmp_path / "b", output="noise", threshold_db=30.0, run=device)
    assert {(c["soc_model"], c["timeout"]) for c in device.calls} == {("57", 3600.0)}


# --- the search by block --------------------------------------------------------------------------------------

def judged(*verdicts: tuple[str, str, float | None]) -> list[dict]:
    return [{"block": b, "htp": status, "sqnr_db": sqnr, "bad": status != "passed" or sqnr < 30.0}
            for b, status, sqnr in verdicts]


def test_localize_finds_the_first_bad_block_and_in_its_graph_the_bad_op(graph, feeds, tmp_path):
    """The broken downsampler makes d_dq 0 dB and leaves r_dq exact: down_blocks.0 is bad by its worst output,
    d_dq, and its own graph (from a, as the CPU computed it) is searched from there."""
    device = Device(tmp_path, negate=DOWN)
    lines: list[str] = []
    out = tmp_path / "out" / "nested"  # made, parents and all
    found = localize(graph, feeds, out, output="noise", threshold_db=30.0, run=device, log=lines.append)
    blocks = judged(("conv_in", "passed", INF), ("down_blocks.0", "passed", 0.0))
    assert found == Divergence("d_dq", "down_blocks.0.downsamplers.0.conv", ["Mul", "Add", "Add"], "passed", 0.0,
                               "divergences/down_blocks_0_downsamplers_0_conv.qdq.onnx",
                               [probe("d_dq", 0.0), probe("m_dq", INF), probe("r_dq", INF)], "down_blocks.0", blocks)
    assert lines == ["localize: block conv_in: HTP passed, inf dB", "localize: block down_blocks.0: HTP passed, 0.0 dB",
                     "localize: probe 1: d_dq: HTP passed, 0.0 dB", "localize: probe 2: m_dq: HTP passed, inf dB",
                     "localize: probe 3: r_dq: HTP passed, inf dB"]
    assert device.graphs() == [("conv_in.block.qdq.onnx", ["a_dq"]), ("down_blocks_0.block.qdq.onnx", ["r_dq", "d_dq"]),
                               ("probe.onnx", ["d_dq"]), ("probe.onnx", ["m_dq"]), ("probe.onnx", ["r_dq"])]
    assert [c["feeds"] for c in device.calls] == [["x"], ["a"], ["a"], ["a"], ["a"]]
    assert {(c["soc_model"], c["timeout"]) for c in device.calls} == {("57", 3600.0)}
    work = out / "divergences"
    assert listing(work) == {"down_blocks_0.block.qdq.onnx", "down_blocks_0.block.inputs.npz",
                             "down_blocks_0_downsamplers_0_conv.qdq.onnx",
                             "down_blocks_0_downsamplers_0_conv.inputs.npz"}
    block = onnx.load(str(work / "down_blocks_0.block.qdq.onnx"))
    assert [i.name for i in block.graph.input] == ["a"] and [o.name for o in block.graph.output] == ["r_dq", "d_dq"]
    reproducer = onnx.load(str(work / "down_blocks_0_downsamplers_0_conv.qdq.onnx"))
    assert [i.name for i in reproducer.graph.input] == ["a"] and [o.name for o in reproducer.graph.output] == ["d_dq"]
    for name in ("down_blocks_0.block.inputs.npz", "down_blocks_0_downsamplers_0_conv.inputs.npz"):
        with np.load(work / name) as inputs:  # a = x_dq * w_dq = x / 2, exactly on the grid
            assert inputs.files == ["a"] and np.array_equal(inputs["a"], feeds["x"] * 0.5)


def test_localize_takes_a_crashed_blocks_first_output(graph, feeds, tmp_path):
    """The HTP crashes on any graph holding act2: down_blocks.0 has no outputs to compare, so its first output, r_dq,
    is searched, and the op whose prefixes crash is the answer."""
    device = Device(tmp_path, refuse={ACT2}, error="SIGSEGV while compiling")
    lines: list[str] = []
    found = localize(graph, feeds, tmp_path / "out", output="noise", threshold_db=30.0, run=device, log=lines.append)
    blocks = judged(("conv_in", "passed", INF), ("down_blocks.0", "crashed", None))
    assert found == Divergence("m_dq", "down_blocks.0.resnets.0.act2", ["Mul"], "crashed", None,
                               "divergences/down_blocks_0_resnets_0_act2.qdq.onnx",
                               [probe("r_dq", None, "crashed"), probe("s_dq", INF), probe("m_dq", None, "crashed"),
                                probe("a_dq", INF)], "down_blocks.0", blocks)
    assert lines == ["localize: block conv_in: HTP passed, inf dB",
                     "localize: block down_blocks.0: HTP crashed (SIGSEGV while compiling)",
                     "localize: probe 1: r_dq: HTP crashed (SIGSEGV while compiling)",
                     "localize: probe 2: s_dq: HTP passed, inf dB",
                     "localize: probe 3: m_dq: HTP crashed (SIGSEGV while compiling)",
                     "localize: probe 4: a_dq: HTP passed, inf dB"]
    assert listing(tmp_path / "out" / "divergences") == {
        "down_blocks_0.block.qdq.onnx", "down_blocks_0.block.inputs.npz", "down_blocks_0_resnets_0_act2.qdq.onnx",
        "down_blocks_0_resnets_0_act2.inputs.npz"}


def test_localize_searches_the_whole_graph_when_every_block_agrees_alone(graph, feeds, tmp_path):
    """A crash that needs conv_in and up_blocks.0's Sum in one graph: no block holds both, so every block agrees
    alone and the prefixes of the whole graph are searched; u_dq's is the first that crashes."""
    device = Device(tmp_path, refuse={CONV_IN, UP})
    lines: list[str] = []
    found = localize(graph, feeds, tmp_path / "out", output="noise", threshold_db=30.0, soc_model="69", timeout=7.0,
                     run=device, log=lines.append)
    blocks = judged(("conv_in", "passed", INF), ("down_blocks.0", "passed", INF), ("up_blocks.0", "passed", INF),
                    ("conv_out", "passed", INF))
    assert found == Divergence("u_dq", "up_blocks.0.resnets.0", ["Mul", "Mul", "Add", "Add", "Sum"], "crashed", None,
                               "divergences/up_blocks_0_resnets_0.qdq.onnx",
                               [probe("noise", None, "crashed"), probe("r_dq", INF), probe("u_dq", None, "crashed"),
                                probe("d_dq", INF)], None, blocks)
    assert lines == [f"localize: block {b}: HTP passed, inf dB" for b in ("conv_in", "down_blocks.0", "up_blocks.0",
                                                                          "conv_out")] + [
        "localize: probe 1: noise: HTP crashed (SIGSEGV while compiling)",
        "localize: probe 2: r_dq: HTP passed, inf dB",
        "localize: probe 3: u_dq: HTP crashed (SIGSEGV while compiling)",
        "localize: probe 4: d_dq: HTP passed, inf dB"]
    assert device.graphs() == [("conv_in.block.qdq.onnx", ["a_dq"]), ("down_blocks_0.block.qdq.onnx", ["r_dq", "d_dq"]),
                               ("up_blocks_0.block.qdq.onnx", ["v_dq"]), ("conv_out.block.qdq.onnx", ["noise"]),
                               ("probe.onnx", ["noise"]), ("probe.onnx", ["r_dq"]), ("probe.onnx", ["u_dq"]),
                               ("probe.onnx", ["d_dq"])]
    assert [c["feeds"] for c in device.calls] == [["x"], ["a"], ["d", "r", "text"], ["v"]] + [["text", "x"]] * 4
    assert {(c["soc_model"], c["timeout"]) for c in device.calls} == {("69", 7.0)}
    work = tmp_path / "out" / "divergences"
    assert listing(work) == {"up_blocks_0_resnets_0.qdq.onnx", "up_blocks_0_resnets_0.inputs.npz"}
    with np.load(work / "up_blocks_0_resnets_0.inputs.npz") as inputs:
        assert sorted(inputs.files) == ["text", "x"] and np.array_equal(inputs["x"], feeds["x"])


def test_localize_is_none_when_every_block_and_the_whole_graph_agree(graph, feeds, tmp_path):
    device = Device(tmp_path)
    lines: list[str] = []
    assert localize(graph, feeds, tmp_path / "out", output="noise", threshold_db=30.0, run=device,
                    log=lines.append) is None
    assert lines == [f"localize: block {b}: HTP passed, inf dB" for b in ("conv_in", "down_blocks.0", "up_blocks.0",
                                                                          "conv_out")] + [
        "localize: probe 1: noise: HTP passed, inf dB"]
    assert listing(tmp_path / "out" / "divergences") == set()
    assert {(c["soc_model"], c["timeout"]) for c in device.calls} == {("57", 3600.0)}


def test_localize_holds_the_threshold_for_blocks_and_the_whole_graph(graph, feeds, tmp_path):
    """The broken to_k puts up_blocks.0's output well below 30 dB but above 0 dB. (The second search goes to the
    folder of the first.)"""
    device = Device(tmp_path, negate=TO_K)
    assert localize(graph, feeds, tmp_path / "out", output="noise", threshold_db=0.0, run=device) is None
    found = localize(graph, feeds, tmp_path / "out", output="noise", threshold_db=30.0, run=device)
    assert (found.tensor, found.block) == ("k_dq", "up_blocks.0")
    assert [b["bad"] for b in found.blocks] == [False, False, True]


@pytest.mark.parametrize("status, error", [("failed", "QNN graph finalize failed (1002)"),
                                           ("timeout", "no result after 7 s")])
def test_localize_reports_a_device_that_fails_or_times_out_with_the_soc_model_and_timeout_given(
        graph, feeds, tmp_path, status, error):
    device = Device(tmp_path, refuse={CONV_OUT}, status=status, error=error)
    lines: list[str] = []
    found = localize(graph, feeds, tmp_path / "out", output="noise", threshold_db=30.0, soc_model="69", timeout=7.0,
                     run=device, log=lines.append)
    blocks = judged(("conv_in", "passed", INF), ("down_blocks.0", "passed", INF), ("up_blocks.0", "passed", INF),
                    ("conv_out", status, None))
    assert found == Divergence("noise", "conv_out", ["Mul"], status, None, "divergences/conv_out.qdq.onnx",
                               [probe("noise", None, status), probe("v_dq", INF)], "conv_out", blocks)
    assert lines[3:] == [f"localize: block conv_out: HTP {status} ({error})",
                         f"localize: probe 1: noise: HTP {status} ({error})",
                         "localize: probe 2: v_dq: HTP passed, inf dB"]
    assert {(c["soc_model"], c["timeout"]) for c in device.calls} == {("69", 7.0)} and len(device.calls) == 6
    assert listing(tmp_path / "out" / "divergences") == {"conv_out.block.qdq.onnx", "conv_out.block.inputs.npz",
                                                         "conv_out.qdq.onnx", "conv_out.inputs.npz"}


def test_judge_blocks_returns_the_first_bad_block_its_graph_inputs_and_worst_output(graph, feeds, tmp_path):
    device, work = Device(tmp_path, negate=DOWN), tmp_path / "work"
    work.mkdir()
    verdicts, bad = judge_blocks(graph, feeds, work, threshold_db=30.0, soc_model="69", timeout=7.0, run=device)
    assert verdicts == judged(("conv_in", "passed", INF), ("down_blocks.0", "passed", 0.0))
    block, path, block_feeds, output = bad
    assert (block, path, output) == (Block("down_blocks.0", ["a"], ["r_dq", "d_dq"]),
                                     work / "down_blocks_0.block.qdq.onnx", "d_dq")
    assert list(block_feeds) == ["a"] and np.array_equal(block_feeds["a"], feeds["x"] * 0.5)
    assert listing(work) == {"down_blocks_0.block.qdq.onnx"}  # the good block's graph and the capture are gone


# --- a block is judged by its worst output --------------------------------------------------------------------

def _down_block_outputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """down_blocks.0's outputs r_dq and d_dq as the CPU computes them, worked by hand from the graph: every
    activation rounded to the 1/256 grid (uint16, zero point 0), w_dq = 0.5."""
    def q(v):
        return np.clip(np.round(np.asarray(v, np.float64) * 256), 0, 65535) / 256

    a = q(x.astype(np.float64) * 0.5)
    m = q(a * q(1 / (1 + np.exp(-a))))
    r = q(m + 0.5)
    return r, q(r + 0.5)


def _sqnr_of_shift(reference: np.ndarray, shift: float) -> float:
    """A tensor on the grid moved by a constant on the grid: noise ``shift`` in every element."""
    return 10 * math.log10(float((reference ** 2).sum()) / (reference.size * shift ** 2))


@pytest.mark.parametrize("shift, worst_output", [
    # conv1 moved by 9/256: r_dq and d_dq (which adds 0.5 to it) off by the same amount, r_dq the smaller signal:
    # r_dq ~28.5 dB, d_dq ~32.2 dB; the block's first output is its worst
    ({CONV1: 9 / 256}, "r_dq"),
    # conv1 by 2/256 and the downsampler by 12/256 more: r_dq ~41.5 dB, d_dq ~28.3 dB; the second is the worst
    ({CONV1: 2 / 256, DOWN: 12 / 256}, "d_dq"),
])
def test_a_block_whose_outputs_disagree_by_different_amounts_is_judged_by_its_worst(graph, feeds, tmp_path, shift,
                                                                                    worst_output):
    """At 30 dB the block's other output agrees: judged by it (the best, or always the first or the last output),
    down_blocks.0 would pass and the search would go on past the block the device breaks."""
    r, d = _down_block_outputs(feeds["x"])
    expected = {"r_dq": _sqnr_of_shift(r, shift[CONV1]), "d_dq": _sqnr_of_shift(d, sum(shift.values()))}
    other = ({"r_dq", "d_dq"} - {worst_output}).pop()
    assert expected[worst_output] < 29.5 and expected[other] > 31.5  # the case is what its comment says
    device = Device(tmp_path, shift=shift)
    found = localize(graph, feeds, tmp_path / "out", output="noise", threshold_db=30.0, run=device)
    assert [(b["block"], b["htp"], b["bad"]) for b in found.blocks] == [("conv_in", "passed", False),
                                                                        ("down_blocks.0", "passed", True)]
    assert found.blocks[1]["sqnr_db"] == pytest.approx(expected[worst_output], abs=1e-3)
    assert found.block == "down_blocks.0"
    assert found.probes[0]["tensor"] == worst_output  # the block's graph is searched from its worst output
    assert (found.tensor, found.htp_status) == (worst_output, "passed")
    assert found.sqnr_db == pytest.approx(expected[worst_output], abs=1e-3)


@pytest.mark.parametrize("nan_output", ["r_dq", "d_dq"])
def test_a_block_with_a_nan_output_is_judged_bad_by_it(graph, feeds, tmp_path, nan_output):
    """The device answers NaN for one of down_blocks.0's outputs and exactly for the other (inf dB): the NaN output
    agrees least of all, whichever of the two it is, so the block is bad."""
    device, work = Device(tmp_path, nan=nan_output), tmp_path / "work"
    work.mkdir()
    verdicts, bad = judge_blocks(graph, feeds, work, threshold_db=30.0, soc_model="57", timeout=1.0, run=device)
    assert [(v["block"], v["bad"]) for v in verdicts] == [("conv_in", False), ("down_blocks.0", True)]
    assert math.isnan(verdicts[1]["sqnr_db"])
    assert bad[0].name == "down_blocks.0" and bad[3] == nan_output
