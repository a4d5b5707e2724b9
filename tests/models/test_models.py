"""PASD's UNet and ControlNet: wiring, shape invariants at any resolution, forwards equal to diffusers' own,
checkpoint names. (SHA equivalence and the other rewrite laws: the battery in ``test_laws.py``.)

References are independent of the code under test: a stock diffusers UNet or ControlNet of the same config, PASD's
wiring as REFERENCE.md section 3 tabulates it, and hand computation of the time-embedding broadcast.
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_same_state_dict
from pasd_verify import PasdVerifyError, convert_to_sha
from pasd_verify.models import pasd_forward
from pasd_verify.kinds.loading import model_from_config
from pasd_verify.presets import UNET_PRESETS, build_pasd, pasd_inputs
from strategies import latent_shapes, pasd_shapes


@pytest.fixture(scope="module")
def tiny_pasd():
    return build_pasd("tiny", seed=0)


def _inputs(unet, shape, dtype=torch.float32):
    return pasd_inputs(unet, batch=shape["batch"], latent=(shape["height"], shape["width"]), seed=shape["seed"],
                       dtype=dtype)


class _Shapes:
    """Records output shapes of modules by name through forward hooks."""

    def __init__(self, model, names):
        self.shapes = {}
        self._handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.shapes[name] = (tuple(args[0].shape) if args else None, tuple(out.shape))
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def _stock_skip_shapes(config, sample, timestep, text):
    """The skip shapes a stock diffusers UNet of the same config produces: conv_in, then each down block's states."""
    stock = UNet2DConditionModel(**config).eval()
    shapes = []
    hooks = [stock.conv_in.register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))]
    for block in stock.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, a, o: shapes.extend(tuple(s.shape) for s in o[1])))
    with torch.no_grad():
        stock(sample, timestep, text)
    for h in hooks:
        h.remove()
    return stock, shapes


@given(shape=pasd_shapes())
def test_shape_invariants_at_any_resolution(tiny_pasd, shape):
    unet, controlnet = tiny_pasd
    inputs = _inputs(unet, shape)
    b, h, w = shape["batch"], shape["height"], shape["width"]
    stock, skip_shapes = _stock_skip_shapes(UNET_PRESETS["tiny"], inputs["sample"], inputs["timestep"],
                                            inputs["encoder_hidden_states"])
    pixel_names = [n for n, _ in unet.named_modules() if n.split(".")[-2:-1] == ["pixel_attentions"]]
    up_names = [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    with torch.no_grad():
        rgbs, down, mid = controlnet(**inputs)
        with _Shapes(unet, pixel_names + up_names) as seen:
            out = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                       down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        with _Shapes(stock, up_names) as stock_seen:
            stock(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                  down_block_additional_residuals=down, mid_block_additional_residual=mid)

    assert [tuple(r.shape) for r in down] == skip_shapes
    assert len(pixel_names) == sum(len(block.resnets) for block in unet.up_blocks)
    for name in pixel_names:
        given_shape, out_shape = seen.shapes[name]
        assert out_shape == given_shape, name
    for name in up_names:
        assert seen.shapes[name][1] == stock_seen.shapes[name][1], name
    assert out.shape == inputs["sample"].shape
    assert [tuple(r.shape) for r in rgbs] == [(b, 3, 8 * h // 2**k, 8 * w // 2**k) for k in (1, 2, 3)]


def test_every_resnet_of_the_pasd_unet_gets_the_steps_time_embedding():
    """Our PASD UNet's forward (its pixel-aware up blocks included) hands every resnet the time embedding of the
    step, as diffusers' UNet does: the embedding of each step is computed here by hand from the UNet's own
    sinusoidal projection and time MLP, and each resnet's ``temb`` is caught on its way in."""
    unet, controlnet = build_pasd("tiny")
    inputs = pasd_inputs(unet)
    resnets = {name: m for name, m in unet.named_modules() if isinstance(m, ResnetBlock2D)}
    assert any(name.startswith("up_blocks.") for name in resnets) and any(".pixel_attentions." in n for n, _ in
                                                                        unet.named_modules())
    for step in (1, 900):
        timestep = torch.tensor([step])
        seen = {}
        hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[1]}))
                 for name, m in resnets.items()]
        with torch.no_grad():
            pasd_forward(unet, controlnet, inputs["sample"], timestep, inputs["encoder_hidden_states"],
                         inputs["controlnet_cond"])
            expected = unet.time_embedding(unet.time_proj(timestep).to(inputs["sample"].dtype))
        for hook in hooks:
            hook.remove()
        assert sorted(seen) == sorted(resnets)
        for name, temb in seen.items():
            torch.testing.assert_close(temb, expected, rtol=0, atol=0, msg=f"{name} at step {step}")


def test_pixel_attention_wiring_matches_pasd_at_sd15_size():
    unet = model_from_config({**UNET_PRESETS["sd15"], "_class_name": "PASDUNet2DConditionModel"})
    # REFERENCE.md section 3: residual channels 320 x4, 640 x3, 1280 x5 (indices 0..11); up block b uses
    # residuals 11-3b, 10-3b, 9-3b.
    residual_channels = [320] * 4 + [640] * 3 + [1280] * 5
    expected = {f"up_blocks.{b}.pixel_attentions.{j}": residual_channels[11 - 3 * b - j] for b in range(4) for j in range(3)}
    found = {
        name.rsplit(".transformer_blocks", 1)[0]: module.to_k.in_features
        for name, module in unet.named_modules()
        if ".pixel_attentions." in name and name.endswith("attn2")
    }
    assert found == expected
    heads = {m.heads for n, m in unet.named_modules() if ".pixel_attentions." in n and isinstance(m, Attention)}
    assert heads == {8}


def test_stock_unet_state_dict_loads_with_only_pixel_attentions_missing(tiny_pasd):
    unet, _ = tiny_pasd
    stock = UNet2DConditionModel(**UNET_PRESETS["tiny"])
    pasd = copy.deepcopy(unet)
    result = pasd.load_state_dict(stock.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".pixel_attentions." in k for k in result.missing_keys)
    assert set(result.missing_keys) == {k for k in unet.state_dict() if ".pixel_attentions." in k}


def test_pasd_state_dict_round_trips_strictly_through_save_pretrained(tiny_pasd, tmp_path):
    unet, controlnet = tiny_pasd
    unet.save_pretrained(tmp_path / "unet")
    controlnet.save_pretrained(tmp_path / "controlnet")
    for model, folder in ((unet, "unet"), (controlnet, "controlnet")):
        loaded = type(model).from_pretrained(tmp_path / folder)
        as_json = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))
        assert as_json(loaded.config) == as_json(model.config)
        sd = model.state_dict()
        assert_same_state_dict(loaded.state_dict(), sd)


def test_unet_without_controlnet_residuals_is_a_clear_error(tiny_pasd):
    unet, _ = tiny_pasd
    inputs = pasd_inputs(unet)
    with pytest.raises(PasdVerifyError, match="needs the ControlNet outputs"):
        unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])


def test_controlnet_options_off_give_no_rgbs_and_no_rrdb():
    unet, controlnet = build_pasd("tiny", use_rrdb=False, return_rgbs=False)
    assert not hasattr(controlnet.controlnet_cond_embedding, "preprocesser")
    assert len(controlnet.controlnet_cond_embedding.to_rgbs) == 0
    with torch.no_grad():
        out, rgbs = pasd_forward(unet, controlnet, **pasd_inputs(unet))
    assert rgbs is None and torch.isfinite(out).all()


def test_controlnet_rrdb_blocks_are_basicsrs(tiny_pasd):
    _, controlnet = tiny_pasd
    blocks = list(controlnet.controlnet_cond_embedding.preprocesser)
    assert len(blocks) == 2
    assert all(type(b).__module__ == "basicsr.archs.rrdbnet_arch" and type(b).__name__ == "RRDB" for b in blocks)


def test_sha_covers_text_self_and_pixel_attentions(tiny_pasd):
    all_names = []
    for model in tiny_pasd:
        converted = copy.deepcopy(model)
        attention_names = [n for n, m in model.named_modules() if isinstance(m, Attention)]
        all_names += attention_names
        name_map = convert_to_sha(converted)
        assert not any(isinstance(m, Attention) for m in converted.modules())
        assert {k.rsplit(".", 2)[0] for k in name_map} == set(attention_names)
    kinds = {n.rsplit(".", 1)[-1] + (" pixel" if ".pixel_attentions." in n else "") for n in all_names}
    assert kinds == {"attn1", "attn2", "attn1 pixel", "attn2 pixel"}


# The next two laws take diffusers' own forwards as the reference: PASD's forwards re-state them to hand per-call
# data through arguments (the up blocks' pixelwise_hidden_states, the ControlNet's RGB side outputs), and must
# compute exactly what diffusers computes apart from that.

@pytest.fixture(scope="module")
def zeroed_pixel_attentions(tiny_pasd):
    """The tiny PASD UNet with every pixel attention's output projection zeroed, and diffusers' own UNet of the same
    config holding the same weights."""
    unet, _ = tiny_pasd
    pasd = copy.deepcopy(unet)
    with torch.no_grad():
        for block in pasd.up_blocks:
            for attention in block.pixel_attentions:
                attention.proj_out.weight.zero_()
                attention.proj_out.bias.zero_()
    stock = UNet2DConditionModel(**UNET_PRESETS["tiny"]).eval()
    missing, unexpected = stock.load_state_dict(pasd.state_dict(), strict=False)
    assert not missing and all(".pixel_attentions." in k for k in unexpected)
    return pasd, stock


@given(shape=latent_shapes(multiple=1, max_side=13, max_batch=2))
def test_pasd_unet_with_zeroed_pixel_attentions_is_diffusers_unet(tiny_pasd, zeroed_pixel_attentions, shape):
    """Each pixel attention is a residual block: with its output projection zeroed it adds exactly 0, and what is
    left is diffusers' UNet with ControlNet residuals, bit for bit (odd latents exercise the upsample sizes)."""
    unet, controlnet = tiny_pasd
    pasd, stock = zeroed_pixel_attentions
    inputs = _inputs(unet, shape)
    with torch.no_grad():
        _, down, mid = controlnet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                                  inputs["controlnet_cond"])
        ours = pasd(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        reference = stock(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                          down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert torch.equal(ours, reference)


@pytest.fixture(scope="module")
def plain_controlnets():
    """PASD's ControlNet without RRDB (diffusers has none) and diffusers' own with the same weights."""
    _, pasd = build_pasd("tiny", seed=0, use_rrdb=False)
    accepted = inspect.signature(ControlNetModel.__init__).parameters
    stock = ControlNetModel(**{k: v for k, v in pasd.config.items() if k in accepted}).eval()
    missing, unexpected = stock.load_state_dict(pasd.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("controlnet_cond_embedding.to_rgbs.") for k in unexpected)
    return pasd, stock


@given(shape=pasd_shapes(max_latent=16), guess_mode=st.booleans(), scale=st.sampled_from([1.0, 0.5, 1.75]))
def test_pasd_controlnet_is_diffusers_controlnet_plus_rgb_side_outputs(plain_controlnets, shape, guess_mode, scale):
    """Residuals bit-identical to diffusers' ControlNet (conditioning scale and guess mode included); each RGB
    output is PASD's to_rgbs conv applied to the activated output of a stride-2 conv of diffusers' embedding."""
    pasd, stock = plain_controlnets
    inputs = _inputs(pasd, shape)
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["controlnet_cond"])
    stride_two = [stock.controlnet_cond_embedding.blocks[i] for i in range(1, len(stock.controlnet_cond_embedding.blocks), 2)]
    activated = []
    hooks = [b.register_forward_hook(lambda m, a, o: activated.append(torch.nn.functional.silu(o))) for b in stride_two]
    try:
        with torch.no_grad():
            down_ref, mid_ref = stock(*args, conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
            rgbs, down, mid = pasd(*args, conditioning_scale=scale, guess_mode=guess_mode)
            rgbs_ref = [conv(a) for conv, a in zip(pasd.controlnet_cond_embedding.to_rgbs, activated)]
    finally:
        for h in hooks:
            h.remove()
    assert len(down) == len(down_ref) and all(torch.equal(a, b) for a, b in zip(down, down_ref))
    assert torch.equal(mid, mid_ref)
    assert len(rgbs) == len(stride_two) == 3
    assert all(torch.equal(a, b) for a, b in zip(rgbs, rgbs_ref))


def test_forward_arguments_pasd_does_not_implement_are_refused_by_name(tiny_pasd):
    unet, controlnet = tiny_pasd
    inputs = pasd_inputs(unet)
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    with torch.no_grad():
        _, down, mid = controlnet(*args, inputs["controlnet_cond"])
        with pytest.raises(PasdVerifyError, match="PASDUNet2DConditionModel.forward does not support class_labels"):
            unet(*args, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                 class_labels=torch.zeros(1))
        with pytest.raises(PasdVerifyError, match="PASDControlNetModel.forward does not support attention_mask"):
            controlnet(*args, inputs["controlnet_cond"], attention_mask=torch.ones(1, 77))
        # None is what diffusers' pipelines pass for an unused argument: accepted
        unet(*args, down_block_additional_residuals=down, mid_block_additional_residual=mid, class_labels=None)
