"""Slow tier: the rewrite at Stable Diffusion 1.5's real widths, and a whole SD1.5 UNet at a 64x64 latent."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import Transformer2DModel
from hypothesis import given
from hypothesis import strategies as st

from pasd_verify import convert_to_sha, split_state_dict
from pasd_verify.presets import build_unet, unet_inputs
from strategies import TEXT_LENGTH, transformer_configs
from test_sha import DTYPES, assert_within_tolerance

pytestmark = pytest.mark.slow

SD15_TEXT_DIM = 768


@pytest.mark.parametrize("dtype", DTYPES)
@given(config=transformer_configs(channels=st.sampled_from([320, 640, 1280]), max_side=12))
def test_sd15_width_transformer_sha_matches_mha(config, dtype):
    # SD1.5's transformers: 8 heads, linear projections, 77 x 768 text.
    channels = config["model"]["in_channels"]
    config["model"].update(num_attention_heads=8, attention_head_dim=channels // 8, norm_num_groups=32,
                           cross_attention_dim=SD15_TEXT_DIM, use_linear_projection=False)
    torch.manual_seed(config["seed"])
    mha = Transformer2DModel(**config["model"]).to(dtype).eval()
    sha = copy.deepcopy(mha)
    convert_to_sha(sha)
    g = torch.Generator().manual_seed(config["seed"])
    x = torch.randn(config["batch"], channels, config["height"], config["width"], generator=g, dtype=dtype)
    text = torch.randn(config["batch"], TEXT_LENGTH, SD15_TEXT_DIM, generator=g, dtype=dtype)
    with torch.no_grad():
        assert_within_tolerance(mha(x, encoder_hidden_states=text).sample,
                                sha(x, encoder_hidden_states=text).sample, dtype)


@pytest.fixture(scope="module")
def sd15_unet():
    return build_unet("sd15", seed=0)


def test_sd15_unet_sha_matches_mha_at_64x64(sd15_unet):
    sha = copy.deepcopy(sd15_unet)
    name_map = convert_to_sha(sha)
    assert len(name_map) == 16 * 2 * 3  # 16 transformers, attn1 + attn2, q/k/v
    inputs = unet_inputs(sd15_unet, batch=1, latent=(64, 64), seed=0)
    with torch.no_grad():
        reference = sd15_unet(**inputs).sample
        candidate = sha(**inputs).sample
    assert_within_tolerance(reference, candidate, torch.float32)


def test_sd15_unet_state_dict_split_loads_strictly(sd15_unet):
    sha = copy.deepcopy(sd15_unet)
    name_map = convert_to_sha(sha)
    expected = sha.state_dict()
    sha.load_state_dict(split_state_dict(sd15_unet.state_dict(), name_map), strict=True)
    assert all(torch.equal(expected[k], v) for k, v in sha.state_dict().items())
