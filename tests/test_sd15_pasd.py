"""Slow tier: the PASD pair at SD1.5 size (preset ``sd15``): shapes and SHA equivalence."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention

from pasd_verify import convert_to_sha
from pasd_verify.models import pasd_forward
from pasd_verify.presets import build_pasd, pasd_inputs
from test_sha import assert_within_tolerance

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15_pasd():
    return build_pasd("sd15", seed=0)


def test_sd15_pasd_pair_sha_matches_mha(sd15_pasd):
    unet, controlnet = sd15_pasd
    sha_unet, sha_controlnet = copy.deepcopy(unet), copy.deepcopy(controlnet)
    unet_map, controlnet_map = convert_to_sha(sha_unet), convert_to_sha(sha_controlnet)
    # UNet: 16 text transformers + 12 pixel attentions; ControlNet: 6 down + 1 mid; each attn1 + attn2, q/k/v.
    assert len(unet_map) == (16 + 12) * 2 * 3 and len(controlnet_map) == 7 * 2 * 3
    assert not any(isinstance(m, Attention) for m in (*sha_unet.modules(), *sha_controlnet.modules()))
    inputs = pasd_inputs(unet, batch=1, latent=(16, 24), seed=0)  # a non-square 128 x 192 control image
    with torch.no_grad():
        reference, rgbs = pasd_forward(unet, controlnet, **inputs)
        candidate, _ = pasd_forward(sha_unet, sha_controlnet, **inputs)
    assert reference.shape == inputs["sample"].shape
    assert [tuple(r.shape) for r in rgbs] == [(1, 3, 128 // 2**k, 192 // 2**k) for k in (1, 2, 3)]
    assert_within_tolerance(reference, candidate, torch.float32)
