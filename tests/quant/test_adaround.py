"""AdaRound laws: for any layer the rounded weights lie on the grid the encodings describe, each one step or less
from its float value, and the activation cache gives the same result in memory and on disk; for the PASD UNet,
AdaRound on MHA then convert gives the grids of AdaRound on SHA."""

from __future__ import annotations

import copy

import pytest
import torch
from aimet_torch.adaround.adaround_loss import AdaroundLoss
from hypothesis import given
from hypothesis import strategies as st

from pasd_verify import convert_to_sha
from pasd_verify.convert import convert_files
from pasd_verify.encodings import load_encodings, save_encodings
from pasd_verify.presets import build_pasd
from pasd_verify.quant.adaround import (
    ActivationCache,
    AdaroundError,
    AdaroundConfig,
    adaround,
    initial_alpha,
    plan_layers,
    reconstruction_backward,
    soft_rounded,
    weight_grid,
)
from pasd_verify.quant.calibration import model_calls, seeded_samples
from pasd_verify.quant.workflow import param_encodings_file

from strategies import layer_cases


def _run(case, config):
    model = case.build()
    calls = [lambda m, x=x: m(x) for x in case.inputs()]
    result = adaround(model, calls, config, progress=False)
    return model, result


@given(case=layer_cases(), bitwidth=st.integers(2, 8), weights=st.sampled_from(["per_channel", "per_tensor"]))
def test_rounded_weights_lie_on_the_encoded_grid(case, bitwidth, weights):
    original = case.build()[0].weight.detach().clone()
    model, result = _run(case, AdaroundConfig(param_bw=bitwidth, iterations=3, weights=weights))
    weight = model[0].weight.detach().double()
    # the grid as the written encodings file describes it (AIMET 0.6.1: value = (q + offset) * scale,
    # q in [0, 2^bw - 1]), read back independently of the tensors AdaRound used
    entries = param_encodings_file(result, "0.6.1")["param_encodings"]["0.weight"]
    assert len(entries) == (weight.shape[0] if weights == "per_channel" else 1)
    for channel in range(weight.shape[0]):
        e = entries[channel if weights == "per_channel" else 0]
        assert e["bitwidth"] == bitwidth
        scale, offset = float(e["scale"]), float(e["offset"])
        q = weight[channel] / scale - offset
        assert (q - q.round()).abs().max() < 1e-3, "a rounded weight is off the grid"
        assert q.round().min() >= 0 and q.round().max() <= 2**bitwidth - 1, "a rounded weight is outside the grid"
        # AdaRound only chooses between the two grid points around the float weight (or the clamped end)
        lo, hi = offset * scale, (2**bitwidth - 1 + offset) * scale
        nearest_ends = original[channel].double().clamp(lo, hi)
        assert ((weight[channel] - nearest_ends).abs() <= scale * (1 + 1e-4)).all()


@given(case=layer_cases())
def test_cache_on_disk_gives_the_same_rounding_as_in_memory(case):
    memory, in_memory = _run(case, AdaroundConfig(iterations=5, cache_budget=None))
    disk, on_disk = _run(case, AdaroundConfig(iterations=5, cache_budget=0))
    assert in_memory.layers[0].cache_bytes_on_disk == 0 and on_disk.layers[0].cache_bytes_in_memory == 0
    assert on_disk.layers[0].cache_bytes_on_disk > 0
    assert torch.equal(memory[0].weight, disk[0].weight)


# --- AdaRound on MHA, then convert, against AdaRound on SHA ------------------------------------------------
#
# The law: a per-channel weight grid depends on that output channel's weights alone, and the SHA rewrite moves
# the rows of q/k/v unchanged into the heads' convs, so AIMET's grid of SHA head i, channel c is computed from the
# very numbers of MHA channel i * dim_head + c: converting the MHA AdaRound encodings must give exactly the SHA
# AdaRound encodings. A per-tensor grid spans the whole tensor: converting copies the MHA grid to every head, while
# each head's own min-max grid spans only its rows, so it is never coarser (scale <= the MHA scale) and the head
# holding the MHA's extreme value gets exactly the MHA grid. (TF-enhanced grids come from an SQNR search over a
# histogram, not from the extremes, so the per-tensor law is stated for min-max, "tf".)

@pytest.fixture(scope="module")
def tiny_pasd_folder(tmp_path_factory):
    unet, controlnet = build_pasd("tiny", seed=0)
    folder = tmp_path_factory.mktemp("adaround-law") / "unet"
    unet.save_pretrained(folder)
    return unet, controlnet, folder


def _adaround_encodings(unet, controlnet, form: str, config: AdaroundConfig) -> dict:
    model = copy.deepcopy(unet)
    if form == "sha":
        convert_to_sha(model)
    samples = seeded_samples(model, 1, latent=(8, 8))
    result = adaround(model, model_calls(model, samples, partner=controlnet), config, progress=False)
    return param_encodings_file(result, "1.0.0")


@pytest.mark.parametrize("weights,scheme", [("per_channel", "tf_enhanced"), ("per_tensor", "tf")])
def test_adaround_on_mha_then_convert_gives_the_sha_grids(tiny_pasd_folder, tmp_path, weights, scheme):
    unet, controlnet, folder = tiny_pasd_folder
    config = AdaroundConfig(iterations=1, weights=weights, quant_scheme=scheme)
    save_encodings(_adaround_encodings(unet, controlnet, "mha", config), tmp_path / "mha.encodings")
    convert_files(folder, folder / "diffusion_pytorch_model.safetensors", tmp_path / "out",
                  encodings=tmp_path / "mha.encodings")
    converted = {e["name"]: e for e in load_encodings(tmp_path / "out" / "parameters_sha.encodings")["param_encodings"]}
    direct = {e["name"]: e for e in _adaround_encodings(unet, controlnet, "sha", config)["param_encodings"]}
    assert converted.keys() == direct.keys()
    heads = [n for n in direct if "_convs." in n]
    assert heads, "the tiny PASD UNet has SHA heads"
    if weights == "per_channel":
        assert all(converted[n] == direct[n] for n in direct)
        return
    assert all(converted[n] == direct[n] for n in direct if n not in heads)
    by_module: dict[str, list[str]] = {}
    for n in heads:
        by_module.setdefault(n.rsplit(".", 2)[0], []).append(n)
    for module, names in by_module.items():
        mha_scale = converted[names[0]]["scale"][0]
        own = [direct[n]["scale"][0] for n in names]
        assert max(own) <= mha_scale * (1 + 1e-6), module
        assert max(own) == pytest.approx(mha_scale, rel=1e-6), module


@given(case=layer_cases(), chunk=st.integers(1, 4))
def test_chunked_minibatch_gradient_is_aimets_minibatch_gradient(case, chunk):
    """In float64, where summation order cannot hide a wrong weighting of the chunks."""
    layer = case.build()[0].double()
    x = torch.cat(case.inputs() * 2).double()  # more rows than one chunk
    with torch.no_grad():
        y = layer(x)
        y += 0.01 * torch.randn(y.shape, generator=torch.Generator().manual_seed(case.seed), dtype=y.dtype)
    weight = layer.weight.detach()
    grid = weight_grid(weight.float(), AdaroundConfig())
    cache = ActivationCache(torch.float64, None, None)
    inputs, targets = cache.buffer(len(x), x.shape[1:]), cache.buffer(len(y), y.shape[1:])
    for i in range(len(x)):
        inputs.write(i, x[i])
        targets.write(i, y[i])
    indices = list(range(len(x)))[::-1]

    chunked = torch.nn.Parameter(initial_alpha(weight, grid).double())
    reconstruction_backward(layer, weight, chunked, grid, inputs, targets, indices, lambda t: t, chunk,
                            torch.device("cpu"))
    # the reference: AIMET's own loss on the whole minibatch at once
    whole = torch.nn.Parameter(initial_alpha(weight, grid).double())
    soft = soft_rounded(weight, whole, grid)
    out = (layer._conv_forward(x.flip(0), soft, layer.bias) if isinstance(layer, torch.nn.Conv2d)
           else torch.nn.functional.linear(x.flip(0), soft, layer.bias))
    AdaroundLoss.compute_recon_loss(out, y.flip(0)).backward()
    torch.testing.assert_close(chunked.grad, whole.grad, rtol=1e-9, atol=1e-12 * whole.grad.abs().max().item())


def test_only_rounds_the_named_modules_and_leaves_the_rest_float():
    unet, controlnet = build_pasd("tiny", seed=0)
    convert_to_sha(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    samples = seeded_samples(unet, 1, latent=(8, 8))
    result = adaround(unet, model_calls(unet, samples, partner=controlnet),
                      AdaroundConfig(iterations=1, only=("up_blocks.1", "conv_out")), progress=False)
    rounded = {r.name for r in result.layers}
    assert rounded and all(n == "conv_out" or n.startswith("up_blocks.1.") for n in rounded)
    assert "conv_out" in rounded
    for key, value in unet.state_dict().items():
        layer = key.rsplit(".", 1)[0]
        if layer not in rounded or not key.endswith(".weight"):
            assert torch.equal(value, before[key]), key
    with pytest.raises(AdaroundError, match="no Conv2d or Linear layer under"):
        adaround(unet, model_calls(unet, samples, partner=controlnet),
                 AdaroundConfig(iterations=1, only=("no_such_block",)), progress=False)


def test_layers_sharing_an_input_capture_it_once_and_round_exactly_as_alone():
    """The laws behind capturing: layers called on the same tensor (every SHA head's q/k/v conv, the k/v convs of
    all heads reading the text embedding) cannot change each other's input, so capturing it once and optimising
    them together rounds every weight bit-identically to capturing it per layer; and replaying the innermost
    module around a group from its cached inputs gives what replaying the whole top-level block gives."""
    unet, controlnet = build_pasd("tiny", seed=0)
    convert_to_sha(unet)
    samples = seeded_samples(unet, 2, latent=(8, 8))
    plans, rounded = {}, {}
    for share, nested in ((True, True), (False, True), (True, False)):
        model = copy.deepcopy(unet)
        calls = model_calls(model, samples, partner=controlnet)
        plans[share, nested] = plan_layers(model, calls[0], share_inputs=share, nested=nested)
        adaround(model, calls, AdaroundConfig(iterations=3, share_inputs=share, nested_replay=nested), progress=False)
        rounded[share, nested] = model.state_dict()
    shared, alone, flat = plans[True, True], plans[False, True], plans[True, False]
    assert shared.layers == alone.layers == len(alone.groups)
    assert len(shared.groups) < len(alone.groups) / 2  # SHA heads do share their inputs
    kv = [[n for n, _ in g.layers] for g in shared.groups if any(".attn2.to_k_convs." in n for n, _ in g.layers)]
    assert kv and all(any(".to_k_convs." in n for n in g) and any(".to_v_convs." in n for n in g) for g in kv)
    assert all(len(g.path) == 1 for g in flat.groups)
    assert any(len(g.path) > 2 for g in shared.groups)  # attentions are replayed on their own
    for g in shared.groups:
        assert all(n.startswith(unit + ".") for unit in g.path[1:] for n, _ in g.layers)
    for key, value in rounded[True, True].items():
        assert torch.equal(rounded[False, True][key], value), key
        assert torch.equal(rounded[True, False][key], value), key
