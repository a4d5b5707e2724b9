"""aimet tier: pasd-verify's AdaRound against aimet-torch's own ``Adaround.apply_adaround`` on the tiny SHA PASD
UNet, with the same calibration data, quantizer config and iteration count.

AIMET is the reference throughout: its rounded weights, its encodings, its quantization sim for SQNR. With
N = 4 samples every AdaRound minibatch (32) holds all of them, so both runs follow the same optimisation path
up to float rounding, and the differences measured here are what the two implementations do differently.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from aimet_torch.common.defs import QuantScheme
from aimet_torch.quantsim import QuantizationSimModel

from pasd_verify import convert_to_sha
from pasd_verify.encodings import convert_version, load_encodings
from pasd_verify.encodings_check import compare_encodings
from pasd_verify.presets import build_pasd
from pasd_verify.quant import QUANTSIM_CONFIGS
from pasd_verify.quant.adaround import LAYER_TYPES, NEAREST_TYPES, AdaroundConfig, adaround, aimet_act_funcs, aimet_quantizer
from pasd_verify.quant.calibration import model_calls, seeded_samples
from pasd_verify.kinds import graph_of
from pasd_verify.quant import aimet_torch_session
from pasd_verify.quant.reference import aimet_adaround, aimet_rows
from pasd_verify.quant.workflow import param_encodings_file

pytestmark = pytest.mark.aimet

SAMPLES, ITERATIONS, PARAM_BW = 4, 50, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adaround")
    unet, controlnet = build_pasd("tiny", seed=0)
    convert_to_sha(unet)
    samples = seeded_samples(unet, SAMPLES, latent=(8, 8))
    wrapped, rows = aimet_rows(unet, samples, controlnet)
    dummy = tuple(t.unsqueeze(0) for t in rows[0])
    aimet_model, _ = aimet_adaround(wrapped, rows, iterations=ITERATIONS, param_bw=PARAM_BW,
                                    folder=folder)
    aimet_model = aimet_model.unet

    ours = copy.deepcopy(unet)
    acts = aimet_act_funcs(graph_of(ours).module, dummy, prefix="unet.")
    result = adaround(ours, model_calls(ours, samples, partner=controlnet),
                      AdaroundConfig(param_bw=PARAM_BW, iterations=ITERATIONS), act_funcs=acts, progress=False)
    for version in ("0.6.1", "1.0.0"):
        (folder / f"ours_{version}.encodings").write_text(
            json.dumps(param_encodings_file(result, version, prefix="unet.")))
    return {"float": unet, "controlnet": controlnet, "aimet": aimet_model, "ours": ours, "result": result,
            "rows": rows, "dummy": dummy, "folder": folder}


def _layer_mses(float_model, rounded_model, grids, rows) -> dict[str, float]:
    """Each layer's reconstruction MSE as AIMET defines it, for a whole rounded model as AIMET's sim runs it:
    every layer's weight on its grid (to nearest: AIMET returns soft-rounded weights, which its sim snaps to the
    grid), GroupNorm/LayerNorm weights at 4 bits to nearest; the layer's input from that model, its output
    against the float model's output of the layer, over all calibration rows (the data AdaRound optimizes on)."""
    inputs, outputs = {}, {}
    rounded = copy.deepcopy(rounded_model)
    with torch.no_grad():
        for name, m in rounded.named_modules():
            if isinstance(m, NEAREST_TYPES):
                m.weight.copy_(aimet_quantizer(m.weight, PARAM_BW, False, "tf_enhanced")(m.weight))
            elif name in grids:
                g = grids[name]
                m.weight.copy_((torch.clamp(torch.round(m.weight / g.scale - g.offset), g.qmin, g.qmax) + g.offset)
                               * g.scale)
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0]))
             for n, m in rounded.named_modules() if isinstance(m, LAYER_TYPES)]
    hooks += [m.register_forward_hook(lambda m, a, o, n=n: outputs.setdefault(n, []).append(o))
              for n, m in float_model.named_modules() if isinstance(m, LAYER_TYPES)]
    with torch.no_grad():
        for row in rows:
            batch = tuple(t.unsqueeze(0) for t in row)
            graph_of(rounded).module(*batch)
            graph_of(float_model).module(*batch)
    for h in hooks:
        h.remove()
    mses = {}
    with torch.no_grad():
        for name, xs in inputs.items():
            layer = rounded.get_submodule(name)
            mses[name] = torch.nn.functional.mse_loss(torch.cat([layer(x) for x in xs]), torch.cat(outputs[name])).item()
    return mses


def test_per_layer_reconstruction_error_is_within_10_percent_of_aimets(runs):
    grids = runs["result"].grids  # AIMET's own grids: test_our_grids_are_aimets_grids
    ours = _layer_mses(runs["float"], runs["ours"], grids, runs["rows"])
    aimet = _layer_mses(runs["float"], runs["aimet"], grids, runs["rows"])
    ratios = sorted(ours[n] / aimet[n] for n in ours if aimet[n] > 0)
    print(f"\nper-layer MSE ours/AIMET over {len(ratios)} layers: min {ratios[0]:.4f}, median "
          f"{ratios[len(ratios) // 2]:.4f}, max {ratios[-1]:.4f}")
    assert ours.keys() == aimet.keys() and len(ours) == len(runs["result"].layers)
    off = {n: (ours[n], aimet[n]) for n in ours if abs(ours[n] - aimet[n]) > 0.1 * aimet[n]}
    assert not off, f"{len(off)} layer(s) beyond 10% of AIMET's MSE, e.g. {sorted(off.items())[:3]}"


def test_rounding_decisions_agree_with_aimets(runs):
    same = total = 0
    for name, grid in runs["result"].grids.items():
        ours = torch.round(runs["ours"].get_submodule(name).weight / grid.scale - grid.offset)
        aimet = torch.round(runs["aimet"].get_submodule(name).weight / grid.scale - grid.offset)
        same, total = same + (ours == aimet).sum().item(), total + ours.numel()
    print(f"\ninteger codes equal to AIMET's: {same / total:.4%} of {total}")
    assert same / total >= 0.99


def test_our_grids_are_aimets_grids(runs):
    aimet = load_encodings(runs["folder"] / "aimet.encodings")
    ours = load_encodings(runs["folder"] / "ours_0.6.1.encodings")
    assert compare_encodings(ours, aimet, sections=("param_encodings",)) == []


def _sqnr(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return 10 * math.log10(reference.pow(2).sum().item() / (reference - candidate).pow(2).sum().item())


def _sim(model, runs, encodings=None) -> QuantizationSimModel:
    """AIMET's W4A16 sim of ``model``: frozen AdaRound parameter encodings where given, activations calibrated
    on the calibration rows."""
    with aimet_torch_session():
        sim = QuantizationSimModel(graph_of(copy.deepcopy(model)).module, runs["dummy"], default_param_bw=PARAM_BW,
                                   default_output_bw=16, quant_scheme=QuantScheme.post_training_tf_enhanced,
                                   config_file=str(QUANTSIM_CONFIGS["per_channel"]))
    if encodings is not None:
        sim.set_and_freeze_param_encodings(str(encodings))
    batches = [tuple(t.unsqueeze(0) for t in row) for row in runs["rows"]]
    sim.compute_encodings(lambda m, _: [m(*b) for b in batches], None)
    return sim


def test_output_sqnr_matches_aimets_adaround_and_beats_nearest_rounding(runs):
    unet, controlnet = runs["float"], runs["controlnet"]
    _, held_out = aimet_rows(unet, seeded_samples(unet, 2, latent=(8, 8), seed=7), controlnet)
    aimet_file = runs["folder"] / "aimet_full.encodings"
    aimet_file.write_text(json.dumps(load_encodings(runs["folder"] / "aimet.encodings")))
    sims = {"nearest": _sim(unet, runs), "aimet": _sim(runs["aimet"], runs, aimet_file),
            "ours": _sim(runs["ours"], runs, runs["folder"] / "ours_0.6.1.encodings")}
    sqnr = {}
    with torch.no_grad():
        for name, sim in sims.items():
            pairs = [(graph_of(unet).module(*b), sim.model(*b))
                     for b in (tuple(t.unsqueeze(0) for t in row) for row in held_out)]
            sqnr[name] = _sqnr(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))
    print(f"\nW4A16 output SQNR vs fp32: nearest {sqnr['nearest']:.2f} dB, AIMET AdaRound {sqnr['aimet']:.2f} dB, "
          f"ours {sqnr['ours']:.2f} dB")
    assert abs(sqnr["ours"] - sqnr["aimet"]) <= 0.5
    assert sqnr["ours"] > sqnr["nearest"] and sqnr["aimet"] > sqnr["nearest"]


@pytest.mark.parametrize("how", ["load_encodings", "set_and_freeze_param_encodings"])
def test_aimet_loads_our_encodings(runs, how):
    # aimet-torch 2.42 loads parameter encodings keyed by name (the 0.6.1 layout); its loader indexes a 1.0.0
    # file's list by name and fails, so the 1.0.0 file (for the QNN converter) is checked against this one below.
    with aimet_torch_session():
        sim = QuantizationSimModel(graph_of(copy.deepcopy(runs["ours"])).module, runs["dummy"],
                                   default_param_bw=PARAM_BW, config_file=str(QUANTSIM_CONFIGS["per_channel"]))
    path = str(runs["folder"] / "ours_0.6.1.encodings")
    if how == "load_encodings":
        sim.load_encodings(path, strict=False, partial=True)
    else:
        sim.set_and_freeze_param_encodings(path)
    for name, grid in runs["result"].grids.items():
        qmodule = sim.model.get_submodule("unet." + name)
        quantizer = qmodule.param_quantizers["weight"]
        torch.testing.assert_close(quantizer.get_scale().expand_as(grid.scale), grid.scale, rtol=1e-6, atol=0)
        # the loaded grids are ours: AIMET's quantizer maps our rounded weights onto themselves
        weight = qmodule.weight.detach()
        moved = (quantizer(weight).as_subclass(torch.Tensor) - weight).abs() / grid.scale
        assert moved.max() < 1e-3, (name, moved.max())


def test_both_formats_hold_the_same_encodings(runs):
    a = load_encodings(runs["folder"] / "ours_0.6.1.encodings")
    b = load_encodings(runs["folder"] / "ours_1.0.0.encodings")
    assert compare_encodings(a, b, sections=("param_encodings",)) == []
    assert convert_version(b, "0.6.1")["param_encodings"].keys() == a["param_encodings"].keys()
