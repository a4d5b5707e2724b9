"""Planted failures the pipeline check must catch and name (users' reports: a clipped text embedding, a guidance
difference erased by a coarse UNet output grid, a wrongly clamped VAE decoder, a timestep fed in the wrong form).

The networks are the tiny seeded ones, exported by the pipeline itself (SHA, W8A16, calibrated on the fp32 run) at
a 64 x 64 working size; each plant edits a copy of one export (:mod:`plants`) and runs with that network on the QDQ
graph, the rest fp32. The export's own checks stayed green for every one of them: the plants change the encodings
(the QDQ graph and AIMET's simulation of it agree), or the app's feeding (the graph is untouched).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pasd_verify.export.htp import htp_available
from pasd_verify.pipeline import NETWORKS, StartNoise, pasd_prompt, preset_components, to_tensor
from pasd_verify.pipeline import networks as networks_module
from pasd_verify.pipeline.check import RunSettings, build_pipeline, check_pipeline, run
from pasd_verify.pipeline.exports import export_networks

from plants import TimestepAsFraction, copy_exports, output_range, plant_output_grid

pytestmark = [pytest.mark.htp, pytest.mark.skipif(htp_available() is not None, reason=str(htp_available()))]

SETTINGS = RunSettings(prompt=pasd_prompt("a portrait of an astronaut"), steps=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from skimage import data

    components = preset_components("tiny", seed=0)
    image = to_tensor(Image.fromarray(data.astronaut()).resize((64, 64), Image.BICUBIC))
    noise = StartNoise.draw("photo", (1, 4, 8, 8), torch.Generator().manual_seed(0))
    reference = run(build_pipeline(components, dict.fromkeys(NETWORKS, "fp32")), image, noise, SETTINGS)
    exports = tmp_path_factory.mktemp("exports")
    reports = export_networks(["text_encoder", "unet", "vae_decoder"], components, reference, image,
                              (SETTINGS.negative_prompt, SETTINGS.prompt), exports)
    return components, image, noise, exports, reports


def _check(setup, tmp_path, network, exports):
    components, image, noise, _, _ = setup
    backends = {**dict.fromkeys(NETWORKS, "fp32"), network: "qdq"}
    return check_pipeline(components, image, noise, SETTINGS, backends, export_dir=exports,
                          jobs_dir=tmp_path / "steps").report


def test_the_unplanted_exports_pass_their_own_checks_and_the_pipeline_check(setup, tmp_path):
    *_, exports, reports = setup
    assert all(r["passed"] for r in reports.values()), {n: r["passed"] for n, r in reports.items()}
    for network in reports:
        report = _check(setup, tmp_path / network, network, exports)
        assert report["passed"], (network, report["checks"], report["teacher_forced_faults"][:3])
        assert report["localized"] is None


@pytest.mark.parametrize("network, output, plant, figure", [
    # the embedding's grid cut to the middle quarter of its calibrated range: large features clip
    ("text_encoder", "last_hidden_state", lambda lo, hi: {"low": lo / 4, "high": hi / 4}, "embeddings_sqnr_db"),
    # the noise prediction on a grid 1024 times coarser: the noise itself survives it, the (cond - uncond) difference
    # guidance multiplies by 9 falls between its steps (ai-hub-apps #155)
    ("unet", "noise", lambda lo, hi: {"coarser": 1024}, "guidance_sqnr_db"),
    # the decoder's image clamped to [0, 1] where it spans [-1, 1]: every dark pixel becomes mid-grey
    ("vae_decoder", "image", lambda lo, hi: {"low": 0.0, "high": 1.0}, "psnr_db"),
])
def test_a_planted_output_grid_fails_the_check_and_is_named(setup, tmp_path, network, output, plant, figure):
    *_, exports, _ = setup
    planted = copy_exports(exports, tmp_path / "exports")
    import onnx

    low, high = output_range(onnx.load(str(planted / network / "model.qdq.onnx"), load_external_data=False), output)
    plant_output_grid(planted / network, output, **plant(low, high))
    report = _check(setup, tmp_path, network, planted)
    assert not report["passed"]
    assert report["culprit"]["network"] == network, report["culprit"]
    assert any(f["figure"] == figure for f in report["teacher_forced_faults"]), report["teacher_forced_faults"]
    # on qdq there is no HTP to localize against: the report says so, naming the network, rather than nothing
    assert report["localized"]["network"] == network, report["localized"]
    assert report["localized"]["verdict"].startswith("not localized: the network runs its QDQ graph on the CPU")


def test_a_timestep_fed_as_a_fraction_fails_the_check_and_names_the_unet(setup, tmp_path, monkeypatch):
    *_, exports, reports = setup
    assert reports["unet"]["passed"], "the export itself is sound: the fault is in how the app feeds it"
    monkeypatch.setitem(networks_module._GRAPH_MODULES, "unet", TimestepAsFraction)
    report = _check(setup, tmp_path, "unet", exports)
    assert not report["passed"]
    culprit = report["culprit"]
    assert (culprit["network"], culprit["step"], culprit["figure"]) == ("unet", 0, "noise_sqnr_db"), culprit


def test_a_planted_grid_passes_the_exports_cpu_against_htp_check(setup, tmp_path):
    """What the export checks on the HTP (the same QDQ graph on the CPU and on the HTP) cannot see a bad grid:
    both run it alike."""
    from pasd_verify.export.agreement import HTP_SQNR_DB, sqnr_db
    from pasd_verify.export.htp import run_on_htp
    from pasd_verify.export.onnx_io import run_onnx

    *_, exports, _ = setup
    planted = copy_exports(exports, tmp_path / "exports")
    plant_output_grid(planted / "vae_decoder", "image", low=0.0, high=1.0)
    feeds = {"latent": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    graph = planted / "vae_decoder" / "model.qdq.onnx"
    cpu = run_onnx(graph, feeds)
    htp = run_on_htp(graph, feeds)
    assert htp.status == "passed", htp.error
    assert cpu["image"].min() >= -1e-6, "the plant did not clamp"
    assert sqnr_db(cpu["image"], htp.outputs["image"]) >= HTP_SQNR_DB



def test_an_htp_divergence_is_named_and_handed_to_the_exports_localization(setup, tmp_path):
    """The HTP's GroupNorm -> SiLU -> Conv divergence (README: export), left in by exporting the VAE encoder without
    the silu-as-division rewrite: the export's own CPU-against-HTP check catches it too; the pipeline check names
    the VAE encoder by its encoded latent (the start latent, noised to 7% of the photo's amplitude, hides it) and
    hands its captured input to the block and op localization."""
    components, image, noise, _, _ = setup
    exports = tmp_path / "exports"
    reference = run(build_pipeline(components, dict.fromkeys(NETWORKS, "fp32")), image, noise, SETTINGS)
    reports = export_networks(["vae_encoder"], components, reference, image, (SETTINGS.negative_prompt,
                                                                              SETTINGS.prompt), exports,
                              rewrites={"vae_encoder": ()})
    assert not reports["vae_encoder"]["passed"], "the export's own check no longer sees the divergence"
    backends = {**dict.fromkeys(NETWORKS, "fp32"), "vae_encoder": "htp"}
    report = check_pipeline(components, image, noise, SETTINGS, backends, export_dir=exports,
                            jobs_dir=tmp_path / "steps", localize_dir=tmp_path / "localized").report
    assert not report["passed"]
    assert report["culprit"]["network"] == "vae_encoder" and report["culprit"]["figure"] == "encoded_latent_sqnr_db"
    localized = report["localized"]
    assert localized["verdict"] == "the HTP miscomputes the graph", localized
    divergence = localized["divergence"]
    # the convolution a resnet runs on GroupNorm -> SiLU: where the HTP's divergence shows (README: export)
    assert divergence["block"].startswith("encoder.down_blocks."), divergence
    assert ".resnets." in divergence["module"] and divergence["op_pattern"][-1] == "Conv", divergence
    assert (tmp_path / "localized" / divergence["reproducer"]).is_file()


def test_an_htp_child_that_dies_is_a_reported_result(setup, tmp_path, monkeypatch):
    """The HTP backend can kill its process; the pipeline check reports the run as not done, naming the graph and
    the signal, and goes on with the networks it can still judge."""
    import os
    import signal

    from pasd_verify.export.htp import HtpSession

    *_, exports, _ = setup
    started = HtpSession.__init__

    def dies_after_loading(self, *args, **kwargs):  # as a backend crash would end it: SIGKILL
        started(self, *args, **kwargs)
        os.kill(self._child.pid, signal.SIGKILL)

    monkeypatch.setattr(HtpSession, "__init__", dies_after_loading)
    components, image, noise, _, _ = setup
    backends = {**dict.fromkeys(NETWORKS, "fp32"), "text_encoder": "htp"}
    report = check_pipeline(components, image, noise, SETTINGS, backends, export_dir=exports,
                            jobs_dir=tmp_path / "steps").report
    assert not report["passed"] and report["checks"] == {"candidate_ran": False, "networks_teacher_forced": False}
    assert "the HTP child died (SIGKILL) while running call 1 of" in report["candidate_error"]
    assert "text_encoder/model_ctx.onnx" in report["candidate_error"]
    assert report["culprit"]["network"] == "text_encoder" and report["culprit"]["figure"] == "error"
