"""The rewrite laws, one battery for every model kind.

As diffusers' model tester mixins do, each model kind states a small contract (how to draw a seeded MHA model and
its inputs, and how to run it) and inherits the same laws:

- SHA equals MHA: the untouched MHA model is the reference, within the fp32 and fp64 tolerances of
  ``strategies.sha_tolerance``;
- undo (``convert_to_mha``) restores every parameter bit-identically, in the same dtype and on the same device, and
  returns the same name map the rewrite returned;
- the split checkpoint loads strictly into the SHA model and merges back into the MHA one bit-identically;
- the name map covers every q/k/v parameter of every attention and nothing else;
- the SHA state dict round-trips through ``.safetensors`` and ``.pth``.

Each law is a hypothesis property over the kind's drawn models and inputs. The SD1.5-size kinds run the same
battery under the ``slow`` marker, on one fixed input each and in fp32 only (an fp64 copy of an SD1.5 UNet is
7 GB).
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from diffusers import Transformer2DModel
from diffusers.models.attention_processor import Attention
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import assert_same_state_dict
from transformers.models.clip.modeling_clip import CLIPAttention

from pasd_verify import SHAAttention, convert_to_mha, convert_to_sha, merge_state_dict, split_state_dict
from pasd_verify.checkpoint import load_state_dict_file, save_state_dict_file
from pasd_verify.presets import (build_pasd, build_text_encoder, build_unet, build_vae, pasd_inputs, text_tokens,
                                 unet_inputs, vae_image)
from pasd_verify.sha import SHACLIPAttention
from strategies import TEXT_LENGTH, attention_cases, latent_shapes, pasd_shapes, transformer_configs
from strategies import unet_inputs as unet_shapes
from test_sha import DTYPES, assert_within_tolerance

@dataclass(frozen=True)
class Example:
    """One drawn case of a kind: ``build(dtype)`` gives a fresh seeded MHA model, ``run(model, dtype)`` its outputs
    on the drawn inputs (a list of tensors); ``reference(dtype)``, when given, the MHA model SHA's outputs must
    equal where that is not ``build(dtype)`` itself (see ``AttentionCase.reference``)."""

    build: Callable[[torch.dtype], nn.Module]
    run: Callable[[nn.Module, torch.dtype], list[torch.Tensor]]
    reference: Callable[[torch.dtype], nn.Module] | None = None


@dataclass(frozen=True)
class Kind:
    """A model kind's contract: ``examples`` draws models with inputs (for the laws about outputs); ``models``
    draws only what varies in the model itself (for the laws about parameters and names: a fixed preset is one
    example, not one per drawn input)."""

    name: str
    examples: st.SearchStrategy[Example]
    models: st.SearchStrategy[Callable[[torch.dtype], nn.Module]]
    dtypes: tuple[torch.dtype, ...] = tuple(DTYPES)
    marks: tuple = field(default=())
    cost: int = 1  # a kind whose example takes seconds gets 1/cost of the profile's examples for outputs

    def holds(self, law: Callable, strategy: st.SearchStrategy) -> int:
        """Check ``law(self, drawn)`` (which asserts) as a hypothesis property over ``strategy``, under the active
        profile with this kind's share of its examples (a fixed preset's ``models`` is one example whatever the
        share). Returns how many examples the law held for."""
        checked = []

        @settings(max_examples=max(1, settings.default.max_examples // self.cost))
        @given(strategy)
        def check(drawn):
            law(self, drawn)
            checked.append(True)

        check()
        return len(checked)

    @classmethod
    def drawn(cls, name: str, examples: st.SearchStrategy[Example], **kwargs) -> Kind:
        """A kind whose model is drawn with its inputs (its config is part of the example)."""
        return cls(name, examples, examples.map(lambda e: e.build), **kwargs)

    @classmethod
    def preset(cls, name: str, example: Callable[[dict], Example], shapes: st.SearchStrategy[dict],
               **kwargs) -> Kind:
        """A kind with one fixed seeded model, run on drawn input shapes."""
        examples = shapes.map(example)
        return cls(name, examples, st.just(example(_ANY_SHAPE).build), **kwargs)


# --- the kinds ---------------------------------------------------------------------------------------------

def _attention_examples() -> st.SearchStrategy[Example]:
    # a bare Attention has no parent to be replaced in: it sits in a container, as it does in every model
    return attention_cases().map(lambda case: Example(
        build=lambda dtype: nn.ModuleDict({"attn": case.build(dtype)}),
        run=lambda model, dtype: [model["attn"](**case.inputs(dtype))],
        reference=lambda dtype: nn.ModuleDict({"attn": case.reference(dtype)}),
    ))


def _transformer_example(config: dict) -> Example:
    def build(dtype):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"])
            return Transformer2DModel(**config["model"]).to(dtype).eval()

    def run(model, dtype):
        g = torch.Generator().manual_seed(config["seed"])
        x = torch.randn(config["batch"], config["model"]["in_channels"], config["height"], config["width"],
                        generator=g, dtype=dtype)
        text = torch.randn(config["batch"], config["text_length"], config["model"]["cross_attention_dim"],
                           generator=g, dtype=dtype)
        return [model(x, encoder_hidden_states=text).sample]

    return Example(build, run)


def _as_reference(cached: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The cached seeded model itself in float32 (a reference is only run, never changed: one SD1.5 copy less),
    a copy in another dtype."""
    return cached if dtype == torch.float32 else copy.deepcopy(cached).to(dtype)


@functools.lru_cache(maxsize=1)
def _pasd(preset: str) -> tuple[nn.Module, nn.Module]:
    return build_pasd(preset, seed=0)


@functools.lru_cache(maxsize=1)
def _unet(preset: str) -> nn.Module:
    return build_unet(preset, seed=0)


def _unet_example(preset: str, shape: dict) -> Example:
    def run(model, dtype):
        inputs = unet_inputs(model, batch=shape["batch"], latent=(shape["height"], shape["width"]), seed=shape["seed"],
                             dtype=dtype)
        return [model(**inputs).sample]

    return Example(lambda dtype: copy.deepcopy(_unet(preset)).to(dtype), run,
                   reference=lambda dtype: _as_reference(_unet(preset), dtype))


def _pasd_inputs(preset: str, shape: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    unet, _ = _pasd(preset)
    return pasd_inputs(unet, batch=shape["batch"], latent=(shape["height"], shape["width"]), seed=shape["seed"],
                       dtype=dtype)


@functools.lru_cache(maxsize=2)
def _controlnet(preset: str, dtype: torch.dtype) -> nn.Module:
    """The untouched MHA ControlNet in ``dtype``: it gives the PASD UNet's residual inputs."""
    controlnet = _pasd(preset)[1]
    return controlnet if dtype == torch.float32 else copy.deepcopy(controlnet).to(dtype)


def _pasd_unet_example(preset: str, shape: dict) -> Example:
    def run(model, dtype):
        inputs = _pasd_inputs(preset, shape, dtype)
        with torch.no_grad():
            _, down, mid = _controlnet(preset, dtype)(inputs["sample"], inputs["timestep"],
                                                     inputs["encoder_hidden_states"], inputs["controlnet_cond"])
        return [model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                      down_block_additional_residuals=down, mid_block_additional_residual=mid).sample]

    return Example(lambda dtype: copy.deepcopy(_pasd(preset)[0]).to(dtype), run,
                   reference=lambda dtype: _as_reference(_pasd(preset)[0], dtype))


def _pasd_controlnet_example(preset: str, shape: dict) -> Example:
    def run(model, dtype):
        inputs = _pasd_inputs(preset, shape, dtype)
        rgbs, down, mid = model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                                inputs["controlnet_cond"])
        return [*rgbs, *down, mid]

    return Example(lambda dtype: copy.deepcopy(_pasd(preset)[1]).to(dtype), run,
                   reference=lambda dtype: _as_reference(_pasd(preset)[1], dtype))


@functools.lru_cache(maxsize=1)
def _vae(preset: str) -> nn.Module:
    return build_vae(preset, seed=0)


def _vae_example(preset: str, shape: dict) -> Example:
    """The encoder's posterior (mean and log-variance, what PASD samples its starting latent from) and the decoder's
    image of that mean: both mid-block attentions, with their group norms, on the path."""
    def run(model, dtype):
        image = vae_image(model, batch=shape["batch"], size=(shape["height"] * 8, shape["width"] * 8),
                          seed=shape["seed"], dtype=dtype)
        posterior = model.encode(image).latent_dist
        return [posterior.mean, posterior.logvar, model.decode(posterior.mean).sample]

    return Example(lambda dtype: copy.deepcopy(_vae(preset)).to(dtype), run,
                   reference=lambda dtype: _as_reference(_vae(preset), dtype))


@st.composite
def _text_encoder_examples(draw, preset: str) -> Example:
    """CLIP's text encoder under either attention implementation transformers loads it with on a CPU (eager builds an
    additive causal mask, sdpa passes none and asks for causality), with or without a padding mask, on seeded
    tokens."""
    implementation = draw(st.sampled_from(["eager", "sdpa"]))
    batch, seed, padded = draw(st.integers(1, 3)), draw(st.integers(0, 2**16)), draw(st.booleans())

    def build(dtype):
        return build_text_encoder(preset, seed=0, attn_implementation=implementation).to(dtype)

    def run(model, dtype):
        ids = text_tokens(model, batch=batch, seed=seed)
        mask = None
        if padded:  # every token up to the first end token, as a tokenizer's attention mask marks them
            ends = (ids == model.config.eos_token_id).int().argmax(dim=1, keepdim=True)
            mask = (torch.arange(ids.shape[1]) <= ends).long()
        out = model(input_ids=ids, attention_mask=mask)
        return [out.last_hidden_state, out.pooler_output]

    return Example(build, run)


_ANY_SHAPE = {"batch": 1, "height": 8, "width": 8, "seed": 0}  # for building only: the model does not depend on it
_SD15_UNET_SHAPE = {"batch": 1, "height": 64, "width": 64, "seed": 0}
_SD15_PASD_SHAPE = {"batch": 1, "height": 16, "width": 24, "seed": 0}  # a non-square 128 x 192 control image
_SD15_VAE_SHAPE = {"batch": 1, "height": 12, "width": 16, "seed": 0}  # a 96 x 128 image

_fp32_slow = dict(dtypes=(torch.float32,), marks=(pytest.mark.slow,))

KINDS = [
    Kind.drawn("attention", _attention_examples()),
    Kind.drawn("transformer", transformer_configs().map(_transformer_example)),
    Kind.preset("tiny_unet", functools.partial(_unet_example, "tiny"), unet_shapes(), cost=2),
    Kind.preset("tiny_pasd_unet", functools.partial(_pasd_unet_example, "tiny"), pasd_shapes(max_latent=16), cost=5),
    Kind.preset("tiny_pasd_controlnet", functools.partial(_pasd_controlnet_example, "tiny"), pasd_shapes(max_latent=16),
                cost=3),
    Kind.preset("tiny_vae", functools.partial(_vae_example, "tiny"), latent_shapes(multiple=1, max_side=6, max_batch=2),
                cost=2),
    Kind.drawn("tiny_text_encoder", _text_encoder_examples("tiny")),
    # SD1.5's transformers at their widths: 8 heads, 32 norm groups, conv projections, 77 x 768 text
    Kind.drawn("sd15_transformer", transformer_configs(
        channels=st.sampled_from([320, 640, 1280]), heads=st.just(8), norm_groups=st.just(32),
        cross_attention_dim=st.just(768), use_linear_projection=st.just(False), text_length=st.just(TEXT_LENGTH),
        max_side=12).map(_transformer_example), marks=(pytest.mark.slow,)),
    Kind.preset("sd15_unet", functools.partial(_unet_example, "sd15"), st.just(_SD15_UNET_SHAPE), **_fp32_slow),
    Kind.preset("sd15_pasd_unet", functools.partial(_pasd_unet_example, "sd15"), st.just(_SD15_PASD_SHAPE),
                **_fp32_slow),
    Kind.preset("sd15_pasd_controlnet", functools.partial(_pasd_controlnet_example, "sd15"), st.just(_SD15_PASD_SHAPE),
                **_fp32_slow),
    Kind.preset("sd15_vae", functools.partial(_vae_example, "sd15"), st.just(_SD15_VAE_SHAPE), **_fp32_slow),
    Kind.drawn("sd15_text_encoder", _text_encoder_examples("sd15"), dtypes=(torch.float32,), marks=(pytest.mark.slow,),
               cost=16),  # an SD1.5 text encoder is built for each example: a few cover eager and sdpa
]


@pytest.fixture(scope="module", params=[pytest.param(k, id=k.name, marks=k.marks) for k in KINDS])
def kind(request):
    """A module-scoped parameter, so pytest runs every law of one kind before the next kind: the seeded models
    cached for a kind (an SD1.5 PASD pair is 5 GB) are dropped before the next kind builds its own."""
    yield request.param
    for cache in (_pasd, _unet, _controlnet, _vae):
        cache.cache_clear()


# --- the laws ----------------------------------------------------------------------------------------------

_PROJECTIONS = {Attention: ("to_q", "to_k", "to_v"), CLIPAttention: ("q_proj", "k_proj", "v_proj")}


def _qkv_parameters(model: nn.Module) -> set[str]:
    return {f"{module_name}.{proj}.{p}" for module_name, module in model.named_modules()
            for kind, projections in _PROJECTIONS.items() if isinstance(module, kind)
            for proj in projections for p, _ in getattr(module, proj).named_parameters()}




def _sha_equals_mha(kind: Kind, example: Example) -> None:
    for dtype in kind.dtypes:
        mha = (example.reference or example.build)(dtype)
        sha = example.build(dtype)
        convert_to_sha(sha)
        with torch.no_grad():
            reference, candidate = example.run(mha, dtype), example.run(sha, dtype)
        assert len(reference) == len(candidate)
        for r, c in zip(reference, candidate):
            assert r.dtype == c.dtype == dtype
            assert_within_tolerance(r, c, dtype)


def _undo_restores_every_parameter_and_returns_the_same_name_map(kind: Kind, build) -> None:
    for dtype in kind.dtypes:
        model = build(dtype)
        original = copy.deepcopy(model.state_dict())
        forward_map = convert_to_sha(model)
        assert forward_map, "every kind has attention to rewrite"
        assert convert_to_mha(model) == forward_map
        assert_same_state_dict(model.state_dict(), original)
        assert not any(isinstance(m, (SHAAttention, SHACLIPAttention)) for m in model.modules())


def _split_checkpoint_loads_strictly_and_merges_back(kind: Kind, build) -> None:
    mha = build(torch.float32)
    mha_state = mha.state_dict()
    sha = copy.deepcopy(mha)
    name_map = convert_to_sha(sha)
    converted = copy.deepcopy(sha.state_dict())
    split = split_state_dict(mha_state, name_map)
    with torch.no_grad():
        for p in sha.parameters():
            p.zero_()
    sha.load_state_dict(split, strict=True)
    assert_same_state_dict(sha.state_dict(), converted)
    assert_same_state_dict(merge_state_dict(split, name_map), mha_state)


def _name_map_covers_every_qkv_parameter_and_nothing_else(kind: Kind, build) -> None:
    model = build(torch.float32)
    mha_names = set(dict(model.named_parameters()))
    qkv = _qkv_parameters(model)
    name_map = convert_to_sha(model)
    assert set(name_map) == qkv
    sha_names = set(dict(model.named_parameters()))
    assert sha_names == (mha_names - qkv) | {n for names in name_map.values() for n in names}
    assert not any(isinstance(m, (Attention, CLIPAttention)) for m in model.modules())


def _sha_state_dict_round_trips_through_both_file_formats(kind: Kind, build) -> None:
    model = build(torch.float32)
    convert_to_sha(model)
    state = model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in ("safetensors", "pth"):
            path = Path(tmp) / f"state_dict_sha.{suffix}"
            save_state_dict_file(state, path)
            loaded = load_state_dict_file(path)
            assert set(loaded) == set(state)
            assert_same_state_dict({k: loaded[k] for k in state}, state)
            del loaded
            path.unlink()


def test_sha_equals_mha(kind):
    assert kind.holds(_sha_equals_mha, kind.examples) >= 1


def test_undo_restores_every_parameter_and_returns_the_same_name_map(kind):
    assert kind.holds(_undo_restores_every_parameter_and_returns_the_same_name_map, kind.models) >= 1


def test_split_checkpoint_loads_strictly_and_merges_back(kind):
    assert kind.holds(_split_checkpoint_loads_strictly_and_merges_back, kind.models) >= 1


def test_name_map_covers_every_qkv_parameter_and_nothing_else(kind):
    assert kind.holds(_name_map_covers_every_qkv_parameter_and_nothing_else, kind.models) >= 1


def test_sha_state_dict_round_trips_through_both_file_formats(kind):
    assert kind.holds(_sha_state_dict_round_trips_through_both_file_formats, kind.models) >= 1
