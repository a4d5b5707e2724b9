"""Slow tier: the PASD pair at SD1.5 size (preset ``sd15``): attention counts and output shapes. Its rewrite laws
(SHA equals MHA included) are the ``sd15_*`` kinds of the battery in ``test_laws.py``."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from pasd_verify.models import pasd_forward
from pasd_verify.presets import build_pasd, pasd_inputs

pytestmark = pytest.mark.slow


def test_sd15_pasd_pair_attentions_and_output_shapes():
    unet, controlnet = build_pasd("sd15", seed=0)
    # UNet: 16 text transformers + 12 pixel attentions; ControlNet: 6 down + 1 mid; each attn1 + attn2.
    assert sum(isinstance(m, Attention) for m in unet.modules()) == (16 + 12) * 2
    assert sum(isinstance(m, Attention) for m in controlnet.modules()) == 7 * 2
    inputs = pasd_inputs(unet, batch=1, latent=(16, 24), seed=0)  # a non-square 128 x 192 control image
    with torch.no_grad():
        out, rgbs = pasd_forward(unet, controlnet, **inputs)
    assert out.shape == inputs["sample"].shape and torch.isfinite(out).all()
    assert [tuple(r.shape) for r in rgbs] == [(1, 3, 128 // 2**k, 192 // 2**k) for k in (1, 2, 3)]
