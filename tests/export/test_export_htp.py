"""The HTP steps of the export, on Qualcomm's real QNN HTP backend (onnxruntime-qnn, emulated on x86_64).

These compile and run graphs on the HTP, which takes seconds per graph; they are the ``htp`` tier.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch

from pasd_verify.kinds import ExportGraph, preset_model
from pasd_verify.kinds import graph_of as export_graph
from pasd_verify.export.htp import htp_available, run_on_htp
from pasd_verify.export.agreement import HTP_SQNR_DB, sqnr_db
from pasd_verify.export.onnx_io import export_float, run_onnx
from pasd_verify.export.pipeline import ExportConfig, export_files
from pasd_verify.export.quantize import export_quantized, quantization_sim
from pasd_verify.export.rewrites import apply_onnx_rewrites, apply_rewrites
from pasd_verify.quant.calibration import seeded_samples
from pasd_verify.sha import convert_to_sha

pytestmark = [pytest.mark.htp, pytest.mark.skipif(htp_available() is not None, reason=str(htp_available()))]


def _export(tmp_path, kind="unet", form="mha", **kwargs):
    loaded = preset_model("tiny", kind)
    model, controlnet = loaded.model, loaded.partner
    if form == "sha":
        convert_to_sha(model)
    report = export_files(model, tmp_path, ExportConfig(samples=2, **kwargs), partner=controlnet)
    # report.json writes a non-finite figure as the string JSON.parse reads; json.dumps writes the bare word
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report), parse_constant=str)
    return report


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """The tiny UNet exported as it is, every rewrite turned off: the graph the HTP miscomputes."""
    folder = tmp_path_factory.mktemp("mha")
    return folder, _export(folder, rewrites=())


def test_export_writes_a_context_binary_that_ran_wholly_on_the_htp(diverged):
    folder, report = diverged
    htp = report["stages"]["htp"]
    assert htp["htp"]["status"] == "passed" and htp["all_nodes_on_htp"]
    for name in ("model.onnx", "model.encodings", "model.qdq.onnx", "model_ctx.onnx", "model_ctx_qnn.bin"):
        assert (folder / name).is_file(), name
    assert (folder / "model_ctx_qnn.bin").stat().st_size == htp["context_binary_bytes"] > 0
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "staging left behind"
    # the EPContext model points at the binary instead of holding the graph
    ctx = onnx.load(str(folder / "model_ctx.onnx"))
    assert any(n.op_type == "EPContext" for n in ctx.graph.node)


def test_the_groupnorm_silu_conv_divergence_is_localized_with_a_reproducer(diverged):
    """The HTP breaks GroupNorm -> SiLU -> Conv at 16-bit activations (REFERENCE section 8); the export must not
    pass, and must name a resnet op behind a normalisation and SiLU, with a reproducer that reproduces."""
    folder, report = diverged
    htp = report["stages"]["htp"]
    assert htp["passed"] is False and report["passed"] is False
    assert htp["cpu_vs_htp_sqnr_db"] < HTP_SQNR_DB
    found = htp["divergence"]
    # block first: every block before the bad one agreed alone on its captured inputs, and the op is in it
    judged = found["blocks"]
    assert [b["block"] for b in judged][-1] == found["block"] and judged[-1]["bad"]
    assert not any(b["bad"] for b in judged[:-1]) and len(judged) >= 2, judged
    assert found["module"].startswith(found["block"]) or found["block"] == "conv_out"
    assert (folder / "divergences" / f"{found['block'].replace('.', '_')}.block.qdq.onnx").is_file()
    assert "resnets" in found["module"] or "conv_norm_out" in found["module"] or "conv_act" in found["module"]
    pattern = found["op_pattern"]
    assert pattern[-1] in ("Conv", "Mul") and "Mul" in pattern, pattern  # SiLU is Sigmoid * x
    # every probe said what it measured; the answer's own inputs were probed good or are graph inputs
    assert all(p["bad"] == (p["htp"] != "passed" or p["sqnr_db"] < HTP_SQNR_DB) for p in found["probes"])
    reproducer = folder / found["reproducer"]
    inputs = dict(np.load(str(reproducer).replace(".qdq.onnx", ".inputs.npz")))
    cpu = run_onnx(reproducer, inputs)[found["tensor"]]
    again = run_on_htp(reproducer, inputs)
    assert again.status != "passed" or sqnr_db(cpu, again.outputs[found["tensor"]]) < HTP_SQNR_DB


class _NormSiLUConv(torch.nn.Module):
    """A diffusers resnet's first half: GroupNorm -> SiLU -> 3x3 Conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.act, self.conv = torch.nn.GroupNorm(8, 32), torch.nn.SiLU(), torch.nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x):
        return self.conv(self.act(self.norm(x)))


class _NormLinear(torch.nn.Module):
    """An MHA attention's key projection: LayerNorm -> Linear without bias, over 16 tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.to_k = torch.nn.LayerNorm(64), torch.nn.Linear(64, 64, bias=False)

    def forward(self, x):
        return self.to_k(self.norm(x))


def _cpu_vs_htp(module, folder, shape=(1, 32, 8, 8), onnx_rewrites=()):
    """Export ``module`` as this package exports a model (float ONNX, aimet-onnx W8A16, QDQ) and compare the HTP
    with the CPU on the QDQ graph."""
    graph = ExportGraph(module.eval(), ["x"], ["y"])
    feeds = {"x": torch.randn(*shape, generator=torch.Generator().manual_seed(1))}
    export_float(graph, feeds, folder / "model.onnx")
    if onnx_rewrites:
        model = onnx.load(str(folder / "model.onnx"))
        assert apply_onnx_rewrites(model, onnx_rewrites)
        onnx.save(model, str(folder / "model.onnx"))
    (folder / "aimet").mkdir()
    sim = quantization_sim(folder / "model.onnx", [{"x": feeds["x"].numpy()}], workdir=folder / "aimet")
    qdq = export_quantized(sim, folder, large=False)["qdq"]
    cpu = run_onnx(qdq, {"x": feeds["x"].numpy()})["y"]
    htp = run_on_htp(qdq, {"x": feeds["x"].numpy()})
    assert htp.status == "passed", htp
    return sqnr_db(cpu, htp.outputs["y"])


def test_silu_as_division_restores_htp_agreement_on_groupnorm_silu_conv(tmp_path):
    """The divergence reproduced on the bare pattern, and gone with the exact rewrite applied to the same module."""
    module = _NormSiLUConv()
    (tmp_path / "before").mkdir(), (tmp_path / "after").mkdir()
    before = _cpu_vs_htp(module, tmp_path / "before")
    assert apply_rewrites(module, ["silu-as-division"]) == {"silu-as-division": 1}
    after = _cpu_vs_htp(module, tmp_path / "after")
    assert before < HTP_SQNR_DB <= after, (before, after)


def test_layernorm_identity_mul_restores_htp_agreement_on_layernorm_matmul(tmp_path):
    (tmp_path / "before").mkdir(), (tmp_path / "after").mkdir()
    before = _cpu_vs_htp(_NormLinear(), tmp_path / "before", shape=(1, 16, 64))
    after = _cpu_vs_htp(_NormLinear(), tmp_path / "after", shape=(1, 16, 64), onnx_rewrites=["layernorm-identity-mul"])
    assert before < HTP_SQNR_DB <= after, (before, after)


@pytest.mark.parametrize("form", ["mha", "sha"])
def test_with_both_rewrites_the_tiny_unet_passes_on_the_htp(tmp_path, form):
    """With the two exact rewrites the whole tiny UNet agrees with the CPU on the HTP (the SHA form, which the
    backend otherwise kills with SIGSEGV, included), and fp32 vs HTP is the quantization error fp32 vs QDQ shows."""
    report = _export(tmp_path, form=form, rewrites=("silu-as-division", "layernorm-identity-mul"))
    float_stage, htp = report["stages"]["float_export"], report["stages"]["htp"]
    assert float_stage["rewrites"]["silu-as-division"] > 0 and float_stage["rewrites"]["layernorm-identity-mul"] > 0
    assert float_stage["rewrite_relative_error"] <= 1e-4 and float_stage["passed"]
    assert htp["htp"]["status"] == "passed" and htp["cpu_vs_htp_sqnr_db"] >= HTP_SQNR_DB, htp
    fp32_vs_qdq = report["stages"]["encodings_and_qdq"]["fp32_vs_qdq_sqnr_db"]
    assert htp["fp32_vs_htp_sqnr_db"] >= fp32_vs_qdq - 1.0
    assert report["passed"] is True and "divergence" not in htp


def test_without_the_backend_the_htp_steps_are_skipped_not_passed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # import now raises ImportError, as off x86_64
    assert "onnxruntime-qnn is not installed" in htp_available()
    report = _export(tmp_path, localize=False)
    htp = report["stages"]["htp"]
    assert htp["htp"]["status"] == "skipped" and htp["passed"] is None
    assert report["htp_skipped"] is True
    assert not (tmp_path / "model_ctx_qnn.bin").exists()


def test_release_model_frees_the_weights_and_changes_no_output(tmp_path, monkeypatch):
    """``release_model`` (what the command uses, for SD1.5-size calibration to have the memory) moves both models'
    weights to the meta device after the float stage, and every file the export writes is the same as without."""
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # the HTP steps are not what this is about
    written = {}
    for release in (False, True):
        loaded = preset_model("tiny", "pasd-unet")
        model, controlnet = loaded.model, loaded.partner
        export_files(model, tmp_path / str(release), ExportConfig(samples=2, localize=False, release_model=release),
                     partner=controlnet)
        on_meta = [p.is_meta for m in (model, controlnet) for p in m.parameters()]
        assert all(on_meta) if release else not any(on_meta)
        folder = tmp_path / str(release)
        # the graphs, not the model headers: aimet lists its custom opset domains in no fixed order
        written[release] = [onnx.load(str(folder / name)).graph.SerializeToString()
                            for name in ("model.onnx", "model.qdq.onnx")] + [(folder / "model.encodings").read_bytes()]
    assert written[True] == written[False]


@pytest.mark.parametrize("kind", ["unet", "text-encoder"])
def test_mha_and_sha_agree_on_the_htp_and_their_context_binaries_load(tmp_path, kind):
    """Both forms of the tiny UNet and of the tiny text encoder (4 heads per layer), compiled: their context binaries
    load without compiling and agree with each other and with the CPU; the profile counts the SHA's per-head ops."""
    reports, outputs = {}, {}
    model = preset_model("tiny", kind).model
    graph = export_graph(model)
    [output] = graph.output_names
    # the export's own held-out check input (seed + 7919), rebuilt here
    feeds = {k: v.numpy() for k, v in graph.feeds(seeded_samples(model, 1, latent=(8, 8), seed=7919)[0]).items()}
    for form in ("mha", "sha"):
        (tmp_path / form).mkdir()
        reports[form] = _export(tmp_path / form, kind=kind, form=form)
        loaded = run_on_htp(tmp_path / form / "model_ctx.onnx", feeds)
        assert loaded.status == "passed", loaded
        cpu = run_onnx(tmp_path / form / "model.qdq.onnx", feeds)[output]
        assert sqnr_db(cpu, loaded.outputs[output]) >= HTP_SQNR_DB
        outputs[form] = loaded.outputs[output]
    assert sqnr_db(outputs["mha"], outputs["sha"]) >= HTP_SQNR_DB
    profiles = {form: r["stages"]["htp"]["htp"]["profile"] for form, r in reports.items()}
    assert all(p["htp_ops"] > 0 and p["execute_cycles"] > 0 and p["finalize_ms"] > 0 for p in profiles.values())
    assert profiles["sha"]["htp_ops"] > profiles["mha"]["htp_ops"]


@pytest.mark.parametrize("kind", ["text-encoder", "vae-encoder", "vae-decoder"])
def test_the_other_networks_of_a_pasd_app_pass_on_the_htp_with_the_default_rewrites(tmp_path, kind):
    """The text encoder and the VAE's two halves, tiny, in SHA form, as ``pasd-verify export`` runs them: every node on
    the HTP, the HTP agreeing with the CPU on the QDQ graph, and the HTP's distance from float no worse than the QDQ
    graph's own (the HTP adds no error of its own beyond it)."""
    report = _export(tmp_path, kind=kind, form="sha")
    float_stage, qdq, htp = (report["stages"][s] for s in ("float_export", "encodings_and_qdq", "htp"))
    assert float_stage["passed"] and float_stage["rewrites"].keys() == {"silu-as-division", "layernorm-identity-mul",
                                                                        "mask-floor"}
    assert htp["htp"]["status"] == "passed" and htp["all_nodes_on_htp"], htp
    assert htp["cpu_vs_htp_sqnr_db"] >= HTP_SQNR_DB, htp
    assert htp["fp32_vs_htp_sqnr_db"] >= qdq["fp32_vs_qdq_sqnr_db"] - 1.0
    assert report["passed"] is True


def test_the_mask_floor_is_what_keeps_the_text_encoders_scores_through_16_bit_quantization(tmp_path):
    """With the causal mask's -3.4e38 in the graph, the scores-plus-mask tensor's 16-bit grid has steps of ~1e34,
    and every real score falls into one: the QDQ graph loses the text (an order of magnitude more error than with
    the floor, which changes the float graph not at all)."""
    reports = {}
    for rewrites in [("mask-floor",), ()]:
        folder = tmp_path / (rewrites[0] if rewrites else "none")
        folder.mkdir()
        reports[rewrites] = _export(folder, kind="text-encoder", form="sha", rewrites=rewrites, localize=False)
    floored, raw = reports[("mask-floor",)], reports[()]
    assert floored["stages"]["float_export"]["rewrites"] == {"mask-floor": 2}  # one mask per layer of the tiny one
    assert floored["stages"]["float_export"]["relative_error"] == raw["stages"]["float_export"]["relative_error"]
    gain = floored["stages"]["encodings_and_qdq"]["fp32_vs_qdq_sqnr_db"] - \
        raw["stages"]["encodings_and_qdq"]["fp32_vs_qdq_sqnr_db"]
    assert gain >= 10.0, gain


def test_a_plain_unet_folder_exports_and_passes_with_the_defaults(tmp_path, capsys):
    """As a new user runs it: ``pasd-verify export`` on a UNet folder, no flag about rewrites. The defaults apply
    every rewrite (the graph without them is the one the HTP miscomputes, the ``diverged`` fixture above), list
    them in the report, and the export passes on the HTP."""
    from pasd_verify.cli import main
    from pasd_verify.presets import build_unet

    build_unet("tiny", seed=11).save_pretrained(tmp_path / "unet")
    code = main(["export", "--model-config", str(tmp_path / "unet"), "--state-dict",
                 str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"), "--samples", "2", "--latent", "8", "8",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["rewrites"] == ["silu-as-division", "layernorm-identity-mul", "mask-floor"]
    assert report["stages"]["float_export"]["rewrites"]["silu-as-division"] > 0
    assert report["stages"]["htp"]["htp"]["status"] == "passed" and report["passed"] is True
