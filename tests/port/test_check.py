"""``pasd-verify check`` on ports made by other tools' conventions (tests/other_tools.py writes them from their
documented behaviour) and by our own conversion: a correct port passes whatever it is named, each defect of
Qualcomm's reference note is reported by law and key, and any one-key corruption of a correct port is named."""

from __future__ import annotations

import copy
import json
import math
import xml.etree.ElementTree as ET

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from other_tools import (ai_hub_checkpoint, ai_hub_name, attention_heads, mha2sha_checkpoint,
                         reference_note_checkpoint, sha_encodings, weight_encodings)
from pasd_verify.checkpoint import save_state_dict_file
from pasd_verify.cli import main
from pasd_verify.convert import convert_files
from pasd_verify.encodings import save_encodings
from pasd_verify.kinds.loading import MODEL_CLASSES, resolve_class
from pasd_verify.port import LAWS, Port, PortArtifacts, check_port
from pasd_verify.port.laws import select_laws
from pasd_verify.presets import build_unet
from strategies import small_model_configs

CHECKPOINT_LAWS = ("sha-checkpoint.names-matched", "sha-checkpoint.no-mha-keys", "sha-checkpoint.heads-split",
                   "sha-checkpoint.rest-unchanged", "sha-checkpoint.loads-strict", "sha-model.equals-mha")
ENCODINGS_LAWS = ("mha-encodings.consistent", "sha-encodings.implied", "sha-encodings.consistent")


def our_heads(module: str, proj: str, head: int) -> str:
    return f"{module}.{proj}_convs.{head}"


def _folder(tmp_path, model):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return folder


def _port_files(tmp_path, model, checkpoint: dict, encodings: dict | None = None, mha_encodings: dict | None = None):
    """The model folder, the port's SHA checkpoint and (given) its SHA encodings and the MHA ones, on disk."""
    files = {"model": _folder(tmp_path, model), "sha": tmp_path / "sha.safetensors"}
    save_state_dict_file(checkpoint, files["sha"])
    if encodings is not None:
        files["sha_encodings"] = tmp_path / "sha.encodings"
        files["mha_encodings"] = tmp_path / "mha.encodings"
        save_encodings(encodings, files["sha_encodings"])
        save_encodings(mha_encodings, files["mha_encodings"])
    return files


def _results(files, laws=LAWS, **extra):
    return {r.law: r for r in check_port(Port(PortArtifacts.of(**files, **extra)), laws)}


def _failed_keys(result) -> set[str]:
    return {f.key for f in result.failures}


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny", seed=0)


def test_our_conversion_passes_every_law_its_files_allow(tmp_path, unet):
    folder = _folder(tmp_path, unet)
    mha_encodings = tmp_path / "mha.encodings"
    save_encodings(weight_encodings(unet.state_dict()), mha_encodings)
    out = convert_files(folder, folder / "diffusion_pytorch_model.safetensors", tmp_path / "sha", encodings=mha_encodings)
    results = _results({"model": folder, "sha": out["outputs"]["state_dict"], "mha_encodings": mha_encodings,
                        "sha_encodings": out["outputs"]["encodings"]})
    for law in ("mha-checkpoint.fits-model", *CHECKPOINT_LAWS, *ENCODINGS_LAWS):
        assert results[law].status == "passed", (law, results[law].failures[:3])
    assert results["onnx.equals-torch"].status == "unchecked" and "--onnx" in results["onnx.equals-torch"].reason
    assert results["sha-model.equals-mha"].figures["unet_fp64_relative_error"] <= 1e-12


def test_ai_hub_models_naming_passes_when_its_port_is_right(tmp_path, unet):
    """ai-hub-models names heads q_proj_sha.{i}: matched by the heads' names under each attention, every law holds."""
    heads = attention_heads(unet)
    state = unet.state_dict()
    mha_encodings = weight_encodings(state)
    files = _port_files(tmp_path, unet, ai_hub_checkpoint(state, heads),
                        sha_encodings(mha_encodings, heads, ai_hub_name), mha_encodings)
    results = _results(files)
    for law in (*CHECKPOINT_LAWS, *ENCODINGS_LAWS):
        assert results[law].status == "passed", (law, results[law].failures[:3])
    assert results["sha-checkpoint.names-matched"].figures["patterns"] == [
        "k_proj_sha.{}.weight", "q_proj_sha.{}.weight", "v_proj_sha.{}.weight"]


@pytest.mark.parametrize("layout", ["adaround", "adaround-flat"])
def test_aimets_adaround_files_are_judged_and_their_layout_reported(tmp_path, unet, capsys, layout):
    """AIMET's AdaRound writes its parameter encodings without a version: check reads them, and its report says which
    layout it read, so a user knows the file was understood as what it is."""
    heads = attention_heads(unet)
    state = unet.state_dict()
    mha_encodings = weight_encodings(state)
    files = _port_files(tmp_path, unet, ai_hub_checkpoint(state, heads))
    for name, encodings in (("mha_encodings", mha_encodings),
                            ("sha_encodings", sha_encodings(mha_encodings, heads, ai_hub_name))):
        files[name] = tmp_path / f"{name}.encodings"
        save_encodings(encodings, files[name], layout)
        assert "version" not in json.loads(files[name].read_text())
    args = [arg for name, path in files.items() for arg in (f"--{name.replace('_', '-')}", str(path))]
    assert main(["check", *args, "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    laws = {law["law"]: law for law in report["laws"]}
    for law in ENCODINGS_LAWS:
        assert laws[law]["status"] == "passed", (law, laws[law])
    assert laws["mha-encodings.consistent"]["figures"]["layout"] == layout
    assert laws["sha-encodings.consistent"]["figures"]["layout"] == layout


def test_each_defect_of_the_reference_note_is_reported_by_law_and_key(tmp_path, unet):
    """The reference note keeps every MHA key in the SHA checkpoint and encodings, and copies a per-channel
    encoding whole to every head."""
    heads = attention_heads(unet)
    state = unet.state_dict()
    mha_encodings = weight_encodings(state)
    files = _port_files(tmp_path, unet, reference_note_checkpoint(state, heads),
                        sha_encodings(mha_encodings, heads, our_heads, split=False, keep_mha=True), mha_encodings)
    results = _results(files)
    module = next(iter(heads))
    kept, head0 = f"{module}.to_q.weight", f"{module}.to_q_convs.0.weight"
    assert kept in _failed_keys(results["sha-checkpoint.no-mha-keys"])
    assert kept in _failed_keys(results["sha-checkpoint.loads-strict"])
    implied = {f.key: f.message for f in results["sha-encodings.implied"].failures}
    assert "channel encodings where the MHA file implies" in implied[head0]
    assert "still in the SHA file" in implied[kept]
    assert head0 in _failed_keys(results["sha-encodings.consistent"])
    # what the note does right is not blamed: its heads are the right rows, the rest is unchanged
    assert results["sha-checkpoint.heads-split"].status == "passed"
    assert results["sha-checkpoint.rest-unchanged"].status == "passed"
    # a model it cannot load is not compared: the law says which one failed first
    assert results["sha-model.equals-mha"].status == "unchecked"
    assert "sha-checkpoint.loads-strict" in results["sha-model.equals-mha"].reason


def _one_element(tensor: torch.Tensor, change) -> torch.Tensor:
    """A copy of ``tensor`` with its element [1, 2, ...] replaced by ``change`` of it."""
    out = tensor.clone()
    at = (1, 2) + (0,) * (tensor.dim() - 2)
    out[at] = change(out[at])
    return out


TINY_CHANGES = {
    "one ulp up": lambda v: torch.nextafter(v, torch.tensor(math.inf)),
    "one ulp down": lambda v: torch.nextafter(v, torch.tensor(-math.inf)),
    "1e-7 relative": lambda v: (v.double() * (1 + 1e-7)).float(),
    "a zero's sign": lambda v: torch.tensor(-0.0),
}


@pytest.mark.parametrize("change", TINY_CHANGES)
@pytest.mark.parametrize("law, replaced", [("sha-checkpoint.heads-split", "head"),
                                           ("sha-checkpoint.rest-unchanged", "kept")])
def test_a_tensor_off_by_the_least_amount_breaks_bit_for_bit(tmp_path, unet, change, law, replaced):
    """One element of one head (or of a weight the port must keep) one ulp or 1e-7 off, or a zero's sign flipped:
    "bit for bit" holds no tolerance, so the law names that key and no other."""
    heads = attention_heads(unet)
    module = next(iter(heads))
    state = dict(unet.state_dict())
    head = f"{module}.to_k_convs.1.weight"
    kept = next(k for k in state if k.endswith(".weight") and state[k].dim() >= 2 and not any(
        f"{m}.{p}." in k for m in heads for p in ("to_q", "to_k", "to_v")))
    target = head if replaced == "head" else kept
    if change == "a zero's sign":  # the MHA file holds +0.0 there, the port -0.0
        source, at = (f"{module}.to_k.weight", state[f"{module}.to_k.weight"].shape[0] // heads[module] + 1) \
            if replaced == "head" else (kept, 1)
        state[source] = state[source].clone()
        state[source][at, 2] = 0.0
        unet = copy.deepcopy(unet)
        unet.load_state_dict(state)
    checkpoint = {k: v for k, v in reference_note_checkpoint(state, heads).items()
                  if k not in {f"{m}.{p}.weight" for m in heads for p in ("to_q", "to_k", "to_v")}}
    before = checkpoint[target]
    checkpoint[target] = _one_element(before, TINY_CHANGES[change])
    assert not torch.equal(checkpoint[target].view(torch.int32), before.view(torch.int32))
    assert (checkpoint[target] - before).abs().max() <= 1e-7 * before.abs().max()
    results = _results(_port_files(tmp_path, unet, checkpoint), select_laws([law]))
    assert results[law].status == "failed" and _failed_keys(results[law]) == {target}
    if replaced == "head":
        assert "is not rows" in results[law].failures[0].message and "bit for bit" in results[law].failures[0].message


def test_a_hard_coded_eight_heads_on_a_five_head_model_is_named(tmp_path):
    unet = build_unet("tiny", seed=0, block_out_channels=(40, 40), attention_head_dim=5, norm_num_groups=8)
    heads = attention_heads(unet)
    assert set(heads.values()) == {5}
    state = unet.state_dict()
    checkpoint = {k: v for k, v in reference_note_checkpoint(state, heads, assumed_heads=8).items()
                  if k not in {f"{m}.{p}.weight" for m in heads for p in ("to_q", "to_k", "to_v")}}
    results = _results(_port_files(tmp_path, unet, checkpoint))
    module = next(iter(heads))
    split = {f.key: f.message for f in results["sha-checkpoint.heads-split"].failures}
    assert "split into 8 heads; the model's attention has 5" in split[f"{module}.to_q_convs.0.weight"]
    assert f"{module}.to_q_convs.5.weight" in _failed_keys(results["sha-checkpoint.loads-strict"])


def test_mha2sha_numbered_attentions_are_matched_by_their_shapes_or_named(tmp_path):
    """mha2sha numbers attentions instead of naming them: a PASD ControlNet whose four attentions differ in width or
    in what they attend to is matched whatever the numbering; the tiny UNet, whose attentions of one width look
    alike, is not guessed: the keys are named, and a names file settles them."""
    from pasd_verify.models import PASDControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        controlnet = PASDControlNetModel(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24,
                                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                         attention_head_dim=(2, 4), norm_num_groups=8,
                                         conditioning_embedding_out_channels=(8, 8, 16, 16), use_rrdb=False).eval()
    heads = attention_heads(controlnet)
    order = sorted(heads, reverse=True)  # not the module order: the numbering must not matter
    results = _results(_port_files(tmp_path / "controlnet", controlnet,
                                   mha2sha_checkpoint(controlnet.state_dict(), heads, order)))
    for law in CHECKPOINT_LAWS:
        assert results[law].status == "passed", (law, results[law].failures[:3])

    unet = build_unet("tiny", seed=0)
    heads = attention_heads(unet)
    files = _port_files(tmp_path / "unet", unet, mha2sha_checkpoint(unet.state_dict(), heads, list(heads)))
    unmatched = {f.key: f.message for f in _results(files)["sha-checkpoint.names-matched"].failures}
    assert unmatched and all("give --names" in why for why in unmatched.values())
    names = {f"{module}.{proj}.weight": [f"attn_{n}_head_{i}_{word}.weight" for i in range(heads[module])]
             for n, module in enumerate(heads)
             for proj, word in zip(("to_q", "to_k", "to_v"), ("query", "key", "value"))}
    (tmp_path / "names.json").write_text(json.dumps(names))
    results = _results(files, names=tmp_path / "names.json")
    for law in CHECKPOINT_LAWS:
        assert results[law].status == "passed", (law, results[law].failures[:3])


# --- any one-key corruption of a correct port is named ------------------------------------------------------

def _build(config: dict, seed: int) -> torch.nn.Module:
    cls = resolve_class(config["_class_name"]) if config["_class_name"] in MODEL_CLASSES else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls.from_config({k: v for k, v in config.items() if k != "_class_name"}).eval()
    for p in model.parameters():  # zero-initialised layers would make row swaps invisible
        torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(seed))
    return model


@settings(max_examples=min(settings().max_examples, 20), suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                  HealthCheck.too_slow])
@given(config=small_model_configs(), seed=st.integers(0, 2**16), naming=st.sampled_from(["ours", "ai-hub"]),
       corruption=st.sampled_from(["swap heads", "rows off by one", "channel moved"]), data=st.data())
def test_any_one_key_corruption_of_a_correct_port_is_named(tmp_path_factory, config, seed, naming, corruption, data):
    model = _build(config, seed)
    heads = attention_heads(model)
    assume(heads)
    state = {k: v for k, v in model.state_dict().items()}
    head_name = our_heads if naming == "ours" else ai_hub_name
    if naming == "ours":
        checkpoint = {k: v for k, v in reference_note_checkpoint(state, heads).items()
                      if k not in {f"{m}.{p}.weight" for m in heads for p in ("to_q", "to_k", "to_v")}}
    else:
        checkpoint = ai_hub_checkpoint(state, heads)
    mha_encodings = weight_encodings(state)
    encodings = sha_encodings(mha_encodings, heads, head_name)
    module = data.draw(st.sampled_from(sorted(heads)), label="module")
    proj = data.draw(st.sampled_from(["to_q", "to_k", "to_v"]), label="projection")
    count = heads[module]
    head = data.draw(st.integers(0, count - 1), label="head")
    key = f"{head_name(module, proj, head)}.weight"
    if corruption == "swap heads":
        assume(count >= 2)
        other = f"{head_name(module, proj, (head + 1) % count)}.weight"
        checkpoint[key], checkpoint[other] = checkpoint[other], checkpoint[key]
    elif corruption == "rows off by one":
        whole = state[f"{module}.{proj}.weight"]
        rows = whole.shape[0] // count
        shifted = torch.roll(whole, -1, dims=0)[head * rows:(head + 1) * rows]
        checkpoint[key] = shifted[:, :, None, None].clone()
    else:
        entry = next(e for e in encodings["param_encodings"] if e["name"] == key)
        assume(len(set(entry["scale"])) > 1)
        entry["scale"] = entry["scale"][1:] + entry["scale"][:1]
    files = _port_files(tmp_path_factory.mktemp("port"), model, checkpoint, encodings, mha_encodings)
    # every law but the model comparison (a corrupted head changes the outputs, but which key did it says only the
    # laws that read the files key by key)
    results = _results(files, select_laws([law.name for law in LAWS if law.name != "sha-model.equals-mha"]))
    named = {f.key for r in results.values() if r.status == "failed" for f in r.failures}
    assert key in named, (corruption, key, {law: r.status for law, r in results.items()})


# --- the command: exit codes, report.json, junit.xml, unreadable input --------------------------------------

def test_command_exit_codes_and_reports(tmp_path, unet, capsys):
    heads = attention_heads(unet)
    state = unet.state_dict()
    good = _port_files(tmp_path / "good", unet, ai_hub_checkpoint(state, heads))
    assert main(["check", "--model", str(good["model"]), "--sha", str(good["sha"]), "--out", str(tmp_path / "ok")]) == 0
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["verdict"]["failed"] == 0 and report["verdict"]["passed"] >= 6
    assert report["head_names"]["patterns"] == ["k_proj_sha.{}.weight", "q_proj_sha.{}.weight", "v_proj_sha.{}.weight"]

    bad = _port_files(tmp_path / "bad", unet, reference_note_checkpoint(state, heads))
    assert main(["check", "--model", str(bad["model"]), "--sha", str(bad["sha"]), "--out", str(tmp_path / "ko")]) == 1
    suite = ET.parse(tmp_path / "ko" / "junit.xml").getroot().find("testsuite")
    failed = {case.get("name"): case.find("failure").text for case in suite.iter("testcase")
              if case.find("failure") is not None}
    module = next(iter(heads))
    assert f"{module}.to_q.weight" in failed["sha-checkpoint.no-mha-keys"]
    skipped = {case.get("name") for case in suite.iter("testcase") if case.find("skipped") is not None}
    assert "sha-encodings.implied" in skipped
    out = capsys.readouterr().out
    assert "FAILED" in out and "sha-checkpoint.no-mha-keys" in out


@pytest.mark.parametrize("damage", ["truncated checkpoint", "names not JSON", "unknown law", "nothing given",
                                    "names a key the model lacks"])
def test_unreadable_input_exits_2_naming_it_and_writes_nothing(tmp_path, unet, capsys, damage):
    heads = attention_heads(unet)
    files = _port_files(tmp_path, unet, ai_hub_checkpoint(unet.state_dict(), heads))
    args = ["check", "--model", str(files["model"]), "--sha", str(files["sha"]), "--out", str(tmp_path / "out")]
    named = str(files["sha"])
    if damage == "truncated checkpoint":
        data = files["sha"].read_bytes()
        files["sha"].write_bytes(data[: len(data) // 2])
    elif damage == "names not JSON":
        (tmp_path / "names.json").write_text("{not json")
        args += ["--names", str(tmp_path / "names.json")]
        named = "names.json"
    elif damage == "names a key the model lacks":
        (tmp_path / "names.json").write_text(json.dumps({"no.such.to_q.weight": ["a", "b"]}))
        args += ["--names", str(tmp_path / "names.json")]
        named = "no.such.to_q.weight"
    elif damage == "unknown law":
        args += ["--law", "no-such-law"]
        named = "no-such-law"
    else:
        args = ["check", "--out", str(tmp_path / "out")]
        named = "--model"
    assert main(args) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- an ONNX export and its encodings ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported_port(tmp_path_factory):
    from write_port import write_port

    folder = tmp_path_factory.mktemp("exported")
    write_port(folder)
    return folder


def test_an_exported_port_passes_every_law(exported_port, tmp_path):
    f = exported_port
    args = ["check", "--model", str(f / "model"), "--sha", str(f / "sha.safetensors"), "--mha-encodings",
            str(f / "mha.encodings"), "--sha-encodings", str(f / "sha.encodings"), "--onnx", str(f / "model.onnx"),
            "--onnx-encodings", str(f / "model.encodings"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # every law but the HTP one, which needs the quantized graph (tests/port/test_check_htp.py)
    assert report["verdict"] == {"holds": True, "passed": len(LAWS) - 1, "failed": 0, "unchecked": 1}
    names = next(law for law in report["laws"] if law["law"] == "onnx.encodings-names")
    assert names["figures"]["param_encodings"] > 0


def test_an_encoding_in_the_wrong_section_of_the_export_is_named(exported_port, tmp_path):
    encodings = json.loads((exported_port / "model.encodings").read_text())
    moved = encodings["param_encodings"].pop(0)
    encodings["activation_encodings"].append(moved)
    (tmp_path / "moved.encodings").write_text(json.dumps(encodings))
    results = _results({"onnx": exported_port / "model.onnx", "onnx_encodings": tmp_path / "moved.encodings"})
    assert moved["name"] in _failed_keys(results["onnx.encodings-names"])


# --- input no law can judge: exit 2 before any work, naming the file or flag -----------------------------------

def _graph(path, inputs: list[str], op: str = "Identity", **attributes):
    """A one-node ONNX graph taking ``inputs`` (another network's, or a context model's EPContext node)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(op, inputs[:1] if op == "Identity" else inputs, ["out"],
                            domain="com.microsoft" if op == "EPContext" else "", **attributes)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph), str(path))
    return path


UNET_INPUTS = ["sample", "timestep", "encoder_hidden_states"]


@pytest.mark.parametrize("case", ["a seed beyond the draw", "another network's graph as --onnx",
                                  "another network's graph as --qdq", "a zero-byte graph",
                                  "a context model without its binary", "a kind the folder does not hold",
                                  "a law without its files", "no law with its files", "a class the config cannot name"])
def test_input_no_law_can_judge_exits_2_naming_it_before_any_work(tmp_path, unet, capsys, case):
    model = _folder(tmp_path, unet)
    out = tmp_path / "out"
    args = ["--model", str(model)]
    if case == "a seed beyond the draw":
        args += ["--seed", "99999999999999999999999"]
        named = ["seed 99999999999999999999999", "from 0 to 4294967295"]
    elif case.startswith("another network's graph"):
        flag = case.rpartition(" ")[2]
        args += [flag, str(_graph(tmp_path / "decoder.onnx", ["latent"]))]
        named = [str(tmp_path / "decoder.onnx"), "'latent'", "a unet takes ['sample', 'timestep'"]
    elif case == "a zero-byte graph":
        (tmp_path / "model.onnx").write_bytes(b"")
        args += ["--onnx", str(tmp_path / "model.onnx")]
        named = [str(tmp_path / "model.onnx"), "empty (0 bytes)"]
    elif case == "a context model without its binary":
        qdq = _graph(tmp_path / "model.qdq.onnx", UNET_INPUTS)
        context = _graph(tmp_path / "model_ctx.onnx", UNET_INPUTS, "EPContext", embed_mode=0,
                         ep_cache_context="model_ctx_qnn.bin")
        args += ["--qdq", str(qdq), "--context", str(context)]
        named = [f"{tmp_path / 'model_ctx_qnn.bin'}: no such file", str(context)]
    elif case == "a kind the folder does not hold":
        args += ["--kind", "vae-decoder"]
        named = [str(model), "the kind given is vae-decoder", "holds a unet"]
    elif case == "a law without its files":
        args += ["--law", "mha-checkpoint.fits-model", "--law", "sha-checkpoint.no-mha-keys"]
        named = ["--law sha-checkpoint.no-mha-keys needs --sha"]
    elif case == "no law with its files":
        args = ["--onnx", str(_graph(tmp_path / "model.onnx", UNET_INPUTS))]
        named = ["no law can be checked on the files given", "onnx.encodings-names, needs --onnx-encodings"]
    else:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "_class_name": "NotAModel"}))
        named = ["_class_name 'NotAModel'", "set _class_name in the model's config.json"]
    assert main(["check", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in named) and "--model-class" not in err, err
    assert not out.exists()


def test_control_characters_of_a_key_reach_neither_terminal_nor_xml_raw(tmp_path, unet, capsys):
    """A key is the other tool's: a NUL made junit.xml not well-formed, an escape sequence rewrote the terminal."""
    key = "extra\x00key\x1b[2J\u202e"
    state = {**ai_hub_checkpoint(unet.state_dict(), attention_heads(unet)), key: torch.zeros(1)}
    files = _port_files(tmp_path, unet, state)
    out = tmp_path / "out"
    assert main(["check", "--model", str(files["model"]), "--sha", str(files["sha"]), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "extra\\x00key\\x1b[2J\\u202e: is not a parameter of the SHA model" in printed
    assert not {"\x00", "\x1b", "\u202e"} & set(printed)
    failures = [case.find("failure").text for case in ET.parse(out / "junit.xml").getroot().iter("testcase")
                if case.find("failure") is not None]
    assert any("extra\\x00key\\x1b[2J" in text for text in failures), failures
    # report.json keeps the key as it is, in strict JSON
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda word: pytest.fail(word))
    assert key in {f["key"] for law in report["laws"] for f in law["failures"]}
