"""The basicsr compatibility shim yields basicsr's own RRDB, and that RRDB runs."""

import importlib
import importlib.metadata
from pathlib import Path

import torch

from pasd_verify.compat import rrdb_class
from pasd_verify.presets import build_pasd


def test_rrdb_is_basicsrs_own_class():
    rrdb = rrdb_class()
    assert rrdb.__module__ == "basicsr.archs.rrdbnet_arch"
    source = Path(importlib.import_module(rrdb.__module__).__file__).resolve()
    installed = {
        Path(importlib.metadata.distribution("basicsr").locate_file(f)).resolve()
        for f in importlib.metadata.distribution("basicsr").files
    }
    assert source in installed


def test_rrdb_is_shape_preserving_and_residual():
    # the RRDB blocks our PASD ControlNet builds (use_rrdb), as its conditioning embedding runs them
    block = build_pasd("tiny", use_rrdb=True)[1].controlnet_cond_embedding.preprocesser[0]
    assert type(block) is rrdb_class()
    torch.manual_seed(0)
    x = torch.randn(2, block.rdb1.conv1.in_channels, 12, 20)
    with torch.no_grad():
        out = block(x)
        # RRDB's documented form, from its three dense blocks called by hand: 0.2 * rdb3(rdb2(rdb1(x))) + x.
        expected = 0.2 * block.rdb3(block.rdb2(block.rdb1(x))) + x
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
