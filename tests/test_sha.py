"""The SHA attention module itself: its head convs are slices of the MHA weights, ``to_out`` is shared, undo
gives back the same module, and what it refuses it refuses by name. The laws every model kind obeys (SHA equals
MHA, undo, checkpoints, name map, files) are the battery in ``test_laws.py``.

Every property compares against an independent reference: the original MHA module (never converted), its
Linear weights sliced by hand, or the same computation in float64.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, AttnAddedKVProcessor
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_same_state_dict
from pasd_verify import (
    AttentionInputError,
    SHAAttention,
    UnsupportedAttentionError,
    convert_to_mha,
    convert_to_sha,
)
from pasd_verify.sha import unsupported_reasons
from strategies import attention_cases, sha_tolerance

DTYPES = [torch.float32, torch.float64]


def assert_within_tolerance(reference: torch.Tensor, candidate: torch.Tensor, dtype: torch.dtype) -> None:
    assert candidate.shape == reference.shape
    assert torch.isfinite(reference).all()
    error = (candidate - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert error <= sha_tolerance(dtype) * scale, f"max abs error {error:.3g} vs max |output| {scale:.3g}"


@given(case=attention_cases())
def test_head_convs_are_disjoint_row_slices_covering_every_row(case):
    attn = case.build()
    sha = SHAAttention(attn)
    for proj in ("to_q", "to_k", "to_v"):
        linear, convs = getattr(attn, proj), getattr(sha, f"{proj}_convs")
        assert len(convs) == case.heads
        covered = torch.zeros(linear.out_features, dtype=torch.int64)
        for i, conv in enumerate(convs):
            rows = torch.arange(i * case.dim_head, (i + 1) * case.dim_head)
            covered[rows] += 1
            assert conv.kernel_size == (1, 1)
            assert torch.equal(conv.weight[:, :, 0, 0], linear.weight[rows])
            if case.bias:
                assert torch.equal(conv.bias, linear.bias[rows])
            else:
                assert conv.bias is None
        assert torch.equal(covered, torch.ones_like(covered))


@given(case=attention_cases())
def test_to_out_is_untouched(case):
    attn = case.build()
    before = copy.deepcopy(attn.to_out.state_dict())
    sha = SHAAttention(attn)
    assert sha.to_out is attn.to_out
    assert_same_state_dict(sha.to_out.state_dict(), before)


@given(case=attention_cases())
def test_rewrite_then_undo_is_identical(case):
    attn = case.build()
    original = copy.deepcopy(attn)
    restored = SHAAttention(attn).to_attention()
    assert type(restored.processor) is type(original.processor)
    assert restored.scale == original.scale and restored.heads == original.heads
    assert_same_state_dict(restored.state_dict(), original.state_dict())
    inputs = case.inputs()
    with torch.no_grad():
        assert torch.equal(original(**inputs), restored(**inputs))


def _custom_processor_attention():
    return Attention(16, heads=2, dim_head=8, processor=AttnAddedKVProcessor())


class _OverridingAttention(Attention):
    def forward(self, hidden_states, **kwargs):
        return super().forward(hidden_states, **kwargs) * 2


def _scaled_sdpa_attention():
    attn = Attention(16, heads=2, dim_head=8, processor=AttnProcessor2_0())
    attn.scale = 0.5
    return attn


def _changed(change):
    """A plain two-head Attention after ``change(attn)``: one supported part taken away or swapped."""
    attn = Attention(16, heads=2, dim_head=8)
    change(attn)
    return attn


def _without(attr: str):
    return _changed(lambda attn: setattr(attn, attr, None))


def _fused_attention():
    return _changed(lambda attn: attn.fuse_projections())


def _to_out(first_and_rest):
    """An Attention whose to_out is rebuilt from its own [Linear, Dropout] by ``first_and_rest``."""
    return _changed(lambda attn: setattr(attn, "to_out", nn.ModuleList(first_and_rest(*attn.to_out))))


def _narrow_to_v_attention():
    # to_k stays as wide as to_q: one of the two differing is enough; unbiased as to_q is, so that it is refused for its
    # width alone
    return _changed(lambda attn: setattr(attn, "to_v", nn.Linear(16, 8, bias=False)))


# kind -> (a module refused for that reason alone, the exact reasons unsupported_reasons gives: they are what a
# user of --skip-unsupported reads in the log, so their wording is part of the contract)
REFUSALS = {
    "spatial norm": (lambda: Attention(32, heads=2, dim_head=16, spatial_norm_dim=4), ["it has a spatial norm"]),
    "qk norm": (lambda: Attention(16, heads=2, dim_head=8, qk_norm="layer_norm"),
                ["it has query/key norms (qk_norm)"]),
    "cross norm": (lambda: Attention(16, cross_attention_dim=8, heads=2, dim_head=8, cross_attention_norm="layer_norm"),
                   ["it has a cross-attention norm"]),
    "added kv": (lambda: Attention(16, heads=2, dim_head=8, added_kv_proj_dim=12),
                 ["it has added projections (added_kv_proj_dim)"]),
    "no key projection": (lambda: _without("to_k"), ["it has no key/value projections (only_cross_attention)"]),
    "no value projection": (lambda: _without("to_v"), ["it has no key/value projections (only_cross_attention)"]),
    "no output projection": (lambda: Attention(16, heads=2, dim_head=8, pre_only=True),
                             ["it has no output projection (pre_only)"]),
    "to_out without dropout": (lambda: _to_out(lambda linear, dropout: [linear]), ["its to_out is not [Linear, Dropout]"]),
    "to_out not linear first": (lambda: _to_out(lambda linear, dropout: [nn.Identity(), dropout]), ["its to_out is not [Linear, Dropout]"]),
    "fused projections": (_fused_attention, ["its q/k/v projections are fused"]),
    "uneven heads": (lambda: Attention(16, heads=3, dim_head=4, out_dim=18),
                     ["to_q has 18 output features, which 4 heads do not divide evenly"]),
    "grouped kv heads": (lambda: Attention(16, heads=4, kv_heads=2, dim_head=4),
                         ["to_k/to_v have 8/8 output features, to_q 16 (grouped key/value heads)"]),
    "narrow value heads": (_narrow_to_v_attention,
                           ["to_k/to_v have 16/8 output features, to_q 16 (grouped key/value heads)"]),
    "custom processor": (_custom_processor_attention,
                         ["its processor AttnAddedKVProcessor is not AttnProcessor or AttnProcessor2_0"]),
    "overridden forward": (lambda: _OverridingAttention(16, heads=2, dim_head=8),
                           ["_OverridingAttention overrides Attention.forward"]),
    "sdpa with own scale": (_scaled_sdpa_attention,
                            ["AttnProcessor2_0 ignores its scale 0.5, which is not 1/sqrt(dim_head)"]),
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_unsupported_attention_is_refused_by_name_and_nothing_changes(kind):
    make, reasons = REFUSALS[kind]
    model = nn.ModuleDict({"fine": Attention(16, heads=2, dim_head=8), "odd": make()})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedAttentionError) as info:
        convert_to_sha(model)
    assert list(info.value.problems) == ["odd"]
    assert "odd" in str(info.value) and all(reason in str(info.value) for reason in reasons)
    assert isinstance(model["fine"], Attention)
    assert list(model.state_dict()) == list(before)


@given(layout=st.lists(st.tuples(st.sampled_from([None, *sorted(REFUSALS)]), st.booleans()), min_size=1, max_size=6))
def test_skip_unsupported_converts_every_supported_module_whatever_the_order(layout):
    """``layout``: per entry, a refusal kind (None: a supported module) and whether it sits one level deeper,
    in a container of its own, so refused and supported modules interleave at any depth and in any order."""
    model = nn.ModuleDict()
    for i, (refusal, nested) in enumerate(layout):
        module = Attention(16, heads=2, dim_head=8) if refusal is None else REFUSALS[refusal][0]()
        model[f"m{i}"] = nn.ModuleDict({"inner": module}) if nested else module
    names = {f"m{i}.inner" if nested else f"m{i}": refusal for i, (refusal, nested) in enumerate(layout)}
    refused_before = {n: copy.deepcopy(model.get_submodule(n).state_dict()) for n, r in names.items() if r}
    name_map = convert_to_sha(model, skip_unsupported=True)
    for name, refusal in names.items():
        module = model.get_submodule(name)
        if refusal is None:
            assert isinstance(module, SHAAttention), name
        else:
            assert not isinstance(module, SHAAttention), name
            assert_same_state_dict(module.state_dict(), refused_before[name])
    expected = {f"{n}.{p}.weight" for n, r in names.items() if r is None for p in ("to_q", "to_k", "to_v")}
    assert set(name_map) == expected


_BAD_LAYOUTS = {
    # argument -> shapes of the wrong rank, and the words the error must use for the accepted layout
    "hidden_states": ([(16,), (2, 16), (1, 2, 16, 4, 4)], "(B, N, C) or (B, C, H, W)"),
    "encoder_hidden_states": ([(2, 16), (1, 2, 16, 4)], "(B, N, C)"),
}


@given(argument=st.sampled_from(sorted(_BAD_LAYOUTS)), data=st.data())
def test_sha_refuses_inputs_of_a_rank_it_does_not_accept_and_names_the_layout(argument, data):
    shapes, expected = _BAD_LAYOUTS[argument]
    shape = data.draw(st.sampled_from(shapes))
    sha = SHAAttention(Attention(16, cross_attention_dim=16, heads=2, dim_head=8))
    inputs = {"hidden_states": torch.randn(1, 4, 16), "encoder_hidden_states": torch.randn(1, 3, 16)}
    inputs[argument] = torch.randn(*shape)
    with pytest.raises(AttentionInputError) as info:
        sha(**inputs)
    assert expected in str(info.value) and str(tuple(shape)) in str(info.value)


@given(batch=st.integers(1, 3), heads=st.integers(1, 4), mask_rank=st.sampled_from([1, 2, 3, 4]),
       mask_batch=st.integers(1, 12), as_bool=st.booleans())
def test_sha_accepts_exactly_the_mask_layouts_mha_lays_out(batch, heads, mask_rank, mask_batch, as_bool):
    """A mask is (B or B*heads, Nk) or (B or B*heads, Nq or 1, Nk); anything else raises, naming those."""
    keys = 3
    sha = SHAAttention(Attention(8, cross_attention_dim=8, heads=heads, dim_head=4, processor=AttnProcessor2_0()))
    shape = {1: (keys,), 2: (mask_batch, keys), 3: (mask_batch, 1, keys), 4: (mask_batch, 1, 1, keys)}[mask_rank]
    mask = torch.ones(shape, dtype=torch.bool) if as_bool else torch.zeros(shape)
    inputs = {"hidden_states": torch.randn(batch, 5, 8), "encoder_hidden_states": torch.randn(batch, keys, 8)}
    accepted = mask_rank in (2, 3) and mask_batch in (batch, batch * heads)
    if accepted:
        assert sha(**inputs, attention_mask=mask).shape == (batch, 5, 8)
    else:
        with pytest.raises(AttentionInputError, match=r"neither \(B, \[Nq,\] Nk\) nor \(B\*heads, Nq, Nk\)"):
            sha(**inputs, attention_mask=mask)


def test_sha_refuses_a_mask_of_the_wrong_key_length():
    sha = SHAAttention(Attention(16, heads=2, dim_head=8, processor=AttnProcessor()))
    with pytest.raises(AttentionInputError, match="covers 5 keys, the keys number 4"):
        sha(torch.randn(1, 4, 16), attention_mask=torch.zeros(1, 1, 5))


def test_sha_refuses_arguments_the_mha_processor_would_drop():
    sha = SHAAttention(Attention(16, heads=2, dim_head=8))
    with pytest.raises(AttentionInputError, match="ip_adapter_masks"):
        sha(torch.randn(1, 4, 16), ip_adapter_masks=torch.ones(1))


@given(heads=st.integers(1, 8), dim_head=st.integers(1, 8), bias=st.booleans())
def test_name_map_entries_name_real_parameters_in_head_order(heads, dim_head, bias):
    model = nn.ModuleDict({"attn": Attention(8, heads=heads, dim_head=dim_head, bias=bias)})
    mha_params = dict(model.named_parameters())
    name_map = convert_to_sha(model)
    sha_params = dict(model.named_parameters())
    for mha_name, sha_names in name_map.items():
        assert mha_name in mha_params and len(sha_names) == heads
        joined = torch.cat([sha_params[n].flatten(1) if sha_params[n].ndim == 4 else sha_params[n] for n in sha_names])
        assert torch.equal(joined, mha_params[mha_name])


class _OutputDtypes(TorchDispatchMode):
    """Records the dtype of every floating-point tensor each aten op produces."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.seen.setdefault(str(func), set()).add(t.dtype)
        return out


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=attention_cases())
def test_sha_computes_in_its_input_dtype_outside_half_precision(case, dtype):
    """Whatever the upcast flags and the processor: no op of SHA's forward yields another floating dtype than
    its input's in float32 and float64 (a classic MHA processor's upcast would drop float64 to float32)."""
    sha = SHAAttention(case.build(dtype))
    inputs = case.inputs(dtype)
    with torch.no_grad(), _OutputDtypes() as recorded:
        sha(**inputs)
    assert recorded.seen
    assert {op: dtypes for op, dtypes in recorded.seen.items() if dtypes != {dtype}} == {}


@pytest.mark.parametrize("upcast", ["upcast_attention", "upcast_softmax"])
def test_half_precision_keeps_the_classic_processors_float32_upcast(upcast):
    torch.manual_seed(0)
    attn = Attention(64, heads=4, dim_head=16, processor=AttnProcessor(), **{upcast: True}).half().eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)  # large logits: fp16 scores and softmax would lose the tail
    x = torch.randn(2, 24, 64).half()
    with torch.no_grad():
        reference = attn(x)
        candidate = SHAAttention(attn)(x)
        # what SHA would give without the upcast: the same module with the flags cleared
        plain = copy.deepcopy(attn)
        plain.upcast_attention = plain.upcast_softmax = False
        without_sha = SHAAttention(plain)
        without = without_sha(x)
    # without the flags the classic processor computes scores and softmax in fp16, and so must SHA
    assert not without_sha.upcast_attention and not without_sha.upcast_softmax
    assert candidate.dtype == torch.float16
    error = (candidate.float() - reference.float()).abs().max().item()
    assert error <= 2e-3 * reference.float().abs().max().item()
    if upcast == "upcast_attention":  # fp16 scores visibly lose precision here; the upcast must avoid that
        assert error < (without.float() - reference.float()).abs().max().item()


def test_a_lone_attention_is_refused_with_the_way_to_wrap_it():
    attn = Attention(16, heads=2, dim_head=8)
    with pytest.raises(TypeError) as info:
        convert_to_sha(attn)
    assert str(info.value) == ("convert_to_sha rewrites the modules inside a model; wrap a lone Attention as "
                               "SHAAttention(attn)")
    assert isinstance(attn.to_q, nn.Linear)
    clip = _clip_attention("sdpa", width=16, heads=2)
    with pytest.raises(TypeError, match=r"wrap a lone CLIPAttention as SHACLIPAttention\(attn\)$"):
        convert_to_sha(clip)


# Each attribute a diffusers Attention may carry that SHA has no counterpart for, and the reason it gives. diffusers
# sets some only in pairs or fours (qk_norm: norm_q and norm_k); each must refuse on its own all the same.
_UNSUPPORTED_PARTS = {
    "spatial_norm": "it has a spatial norm",
    "norm_q": "it has query/key norms (qk_norm)",
    "norm_k": "it has query/key norms (qk_norm)",
    "norm_cross": "it has a cross-attention norm",
    "add_q_proj": "it has added projections (added_kv_proj_dim)",
    "add_k_proj": "it has added projections (added_kv_proj_dim)",
    "add_v_proj": "it has added projections (added_kv_proj_dim)",
    "to_add_out": "it has added projections (added_kv_proj_dim)",
}


@pytest.mark.parametrize("part", sorted(_UNSUPPORTED_PARTS))
def test_any_one_unsupported_part_alone_refuses_the_module(part):
    attn = Attention(16, heads=2, dim_head=8)
    assert unsupported_reasons(attn) == []
    setattr(attn, part, nn.Identity())
    assert unsupported_reasons(attn) == [_UNSUPPORTED_PARTS[part]]


@pytest.mark.parametrize("biased", [True, False])
@pytest.mark.parametrize("projection", range(3))
def test_q_k_v_that_differ_in_having_a_bias_are_refused_naming_each(biased, projection):
    """The name map gives q, k and v one bias rule; a module whose three disagree (a bias added to or dropped from one
    of them) would be renamed wrongly, so it is refused, each projection's bias named."""
    for attn, names in ((Attention(16, heads=2, dim_head=8, bias=biased), ("to_q", "to_k", "to_v")),
                        (_clip_attention("sdpa", width=16, heads=2), ("q_proj", "k_proj", "v_proj"))):
        linear = getattr(attn, names[projection])
        if linear.bias is not None and not biased:
            continue  # CLIP's projections are always biased: there, drop one
        linear.bias = None if linear.bias is not None else nn.Parameter(torch.zeros(linear.out_features))
        expected = ", ".join(f"{n}: {(getattr(attn, n).bias is not None)}" for n in names)
        model = nn.ModuleDict({"attn": attn})
        with pytest.raises(UnsupportedAttentionError, match=re.escape(f"differ in having a bias ({expected})")):
            convert_to_sha(model)
        assert model["attn"] is attn


def test_an_attention_without_the_fused_projections_flag_is_converted():
    """Older diffusers Attention classes have no ``fused_projections`` attribute: absent means not fused."""
    attn = Attention(16, heads=2, dim_head=8)
    del attn.fused_projections
    assert unsupported_reasons(attn) == []
    assert isinstance(SHAAttention(attn), SHAAttention)


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_sha_attention_itself_refuses_what_convert_to_sha_refuses_naming_the_class(kind):
    make, reasons = REFUSALS[kind]
    attn = make()
    assert unsupported_reasons(attn) == reasons
    with pytest.raises(UnsupportedAttentionError) as info:
        SHAAttention(attn)
    assert info.value.problems == {type(attn).__name__: reasons}


def test_skipping_logs_each_module_left_as_mha_and_the_count_converted(caplog):
    """The log is how a user of ``--skip-unsupported`` learns what stayed MHA: the module, every reason, and how
    many were converted (counted here from the model, not from the code's own count)."""
    odd = Attention(16, heads=2, dim_head=8, cross_attention_dim=8, cross_attention_norm="layer_norm",
                    qk_norm="layer_norm")  # two reasons, joined
    model = nn.ModuleDict({"a": Attention(16, heads=2, dim_head=8), "odd": odd,
                           "b": Attention(16, heads=4, dim_head=4), "c": Attention(16, heads=2, dim_head=8)})
    reasons = "; ".join(unsupported_reasons(model["odd"]))
    assert "cross-attention norm" in reasons and "query/key norms" in reasons and "; " in reasons
    with caplog.at_level("INFO", logger="pasd_verify.sha"):
        convert_to_sha(model, skip_unsupported=True)
    converted = sum(isinstance(m, SHAAttention) for m in model.modules())
    assert converted == 3
    assert caplog.messages == [f"left odd as MHA: {reasons}", "converted 3 attention module(s) to SHA"]
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


def test_undo_refuses_a_config_that_rebuilds_a_different_head_layout():
    """``mha_config`` edited to the same width with other heads (2 x 16 for 4 x 8): undoing would regroup the
    head rows, so it is refused, naming the module kind and the config."""
    sha = SHAAttention(Attention(32, heads=4, dim_head=8))
    assert type(sha.dim_head) is int and sha.dim_head == 8
    sha.mha_config.update(heads=2, dim_head=16)
    with pytest.raises(UnsupportedAttentionError) as info:
        sha.to_attention()
    assert list(info.value.problems) == ["SHAAttention"]
    expected = f"rebuilding Attention from {sha.mha_config} gives a different shape"
    assert info.value.problems["SHAAttention"] == [expected]


def test_rewrite_forward_and_undo_keep_the_device():
    """On the meta device (CI has no GPU): every tensor the rewrite, a masked forward and the undo make must be on
    the module's device; one made on the default device fails to mix with the rest."""
    attn = Attention(16, heads=2, dim_head=8).to("meta")
    sha = SHAAttention(attn)
    hidden = torch.empty(2, 5, 16, device="meta")
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    out = sha(hidden, attention_mask=mask)
    assert out.device.type == "meta" and out.shape == (2, 5, 16)
    restored = sha.to_attention()
    assert {p.device.type for p in restored.parameters()} == {"meta"}


@pytest.mark.parametrize("mask", ["causal_flag", "bool"])
def test_clip_sha_keeps_the_device_of_its_inputs_in_every_mask_it_builds(mask):
    """The same on the meta device for SHACLIPAttention: the causal mask it builds (sdpa's is_causal) and the
    additive one it makes of a boolean mask are on the inputs' device, and undo rebuilds on the module's."""
    from pasd_verify.sha import SHACLIPAttention

    sha = SHACLIPAttention(_clip_attention("sdpa", width=16, heads=2).to("meta"))
    hidden = torch.empty(2, 5, 16, device="meta")
    if mask == "causal_flag":
        out, _ = sha(hidden, None, is_causal=True)
    else:
        out, _ = sha(hidden, torch.ones(2, 1, 5, 5, dtype=torch.bool, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 5, 16)
    assert {p.device.type for p in sha.to_attention().parameters()} == {"meta"}


@pytest.mark.parametrize("make", [
    lambda: Attention(16, heads=2, dim_head=8),
    lambda: Attention(16, cross_attention_dim=12, heads=2, dim_head=8),
    lambda: Attention(16, heads=2, dim_head=8, out_dim=24, out_bias=False),
], ids=["self", "cross", "out_dim"])
def test_undo_restores_the_attributes_code_reads_off_an_attention(make):
    """Beyond weights and outputs: ``is_cross_attention``, the widths and the out projection's bias are read by
    diffusers and by our own refusals, so the undone module must carry the original's."""
    original = make()
    restored = SHAAttention(copy.deepcopy(original)).to_attention()
    for attribute in ("is_cross_attention", "cross_attention_dim", "query_dim", "inner_dim", "out_dim", "heads"):
        assert getattr(restored, attribute) == getattr(original, attribute), attribute
    assert (restored.to_out[0].bias is None) == (original.to_out[0].bias is None)


def test_a_vae_attention_with_its_group_norm_converts_and_undoes_exactly():
    """SD1.5's VAE mid-block attention: one head, a group norm before the projections (eps 1e-6), biases, a residual
    connection, upcast_softmax. SHA equals the untouched module; undo gives back its parameters in their order and
    its group norm with its own eps."""
    torch.manual_seed(0)
    attn = Attention(64, heads=1, dim_head=64, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=32,
                     spatial_norm_dim=None, residual_connection=True, bias=True, upcast_softmax=True,
                     _from_deprecated_attn_block=True, processor=AttnProcessor2_0())
    with torch.no_grad():
        attn.group_norm.weight.uniform_(0.5, 1.5)
        attn.group_norm.bias.uniform_(-0.5, 0.5)
    model = nn.ModuleDict({"attn": attn})
    reference = copy.deepcopy(model)
    original = copy.deepcopy(model.state_dict())
    image = torch.randn(2, 64, 5, 7, dtype=torch.float64)
    convert_to_sha(model.double())
    reference.double()
    with torch.no_grad():
        torch.testing.assert_close(model["attn"](image), reference["attn"](image), rtol=0, atol=1e-12)
    convert_to_mha(model.float())
    undone = model["attn"]
    assert isinstance(undone, Attention) and undone.group_norm.eps == 1e-6 and undone.group_norm.num_groups == 32
    assert undone._from_deprecated_attn_block is True
    assert_same_state_dict(model.state_dict(), original)


# --- transformers' CLIPAttention (the text encoder's) ----------------------------------------------------------

def _clip_attention(implementation: str, width: int = 768, heads: int = 12, seed: int = 0, **config):
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPAttention

    config = CLIPTextConfig(hidden_size=width, num_attention_heads=heads, **config)
    config._attn_implementation = implementation
    torch.manual_seed(seed)
    return CLIPAttention(config).eval()


def _clip_mask(kind: str, batch: int, length: int, dtype: torch.dtype, g: torch.Generator):
    """What transformers hands CLIPAttention: nothing (sdpa asks for causality with is_causal, or with none falls back
    on the module's own is_causal), an additive causal
    mask with the dtype's lowest value (eager), or a boolean (B, 1, N, N) mask of causality and padding."""
    if kind in ("none", "causal_flag", "module_flag"):
        return None
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    keep = torch.arange(length) < torch.randint(1, length + 1, (batch, 1), generator=g)  # padding after each prompt
    allowed = causal & keep[:, None, :] if kind == "padded_bool" else causal.expand(batch, length, length)
    if kind == "padded_bool":
        allowed = allowed | torch.eye(length, dtype=torch.bool)  # no row without a key, as transformers ensures
        return allowed[:, None]
    return torch.zeros(batch, 1, length, length, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)


# eager is never given a boolean mask (it would add it): transformers builds eager's masks additive
@pytest.mark.parametrize("implementation, mask", [(i, m) for i in ("eager", "sdpa")
                                                  for m in ("none", "causal_flag", "module_flag", "additive_causal",
                                                            "padded_bool")
                                                  if (i, m) != ("eager", "padded_bool")])
@given(batch=st.integers(1, 3), length=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_clip_attention_at_sd15s_width_equals_the_untouched_module_in_float64(implementation, mask, batch, length,
                                                                              seed):
    """SD1.5's text attention shape (768 wide, 12 heads, biases) in float64, against the MHA module itself under the
    same implementation and mask: within 1e-12 of the output's scale."""
    from pasd_verify.sha import SHACLIPAttention

    mha = _clip_attention(implementation, seed=seed % 7).double()
    if mask == "module_flag":  # no mask and no is_causal: sdpa falls back on the module's own flag, eager ignores it
        mha.is_causal = True
    sha = SHACLIPAttention(copy.deepcopy(mha))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 768, generator=g, dtype=torch.float64)
    attention_mask = _clip_mask(mask, batch, length, torch.float64, g)
    causal = {"is_causal": True} if mask == "causal_flag" else {}
    with torch.no_grad():
        reference, weights = mha(x, attention_mask, **causal)
        candidate, no_weights = sha(x, attention_mask, **causal)
    assert no_weights is None
    assert_within_tolerance(reference, candidate, torch.float64)


def test_clip_head_convs_are_hand_sliced_rows_and_undo_gives_back_the_module():
    from transformers.models.clip.modeling_clip import CLIPAttention

    from pasd_verify.sha import SHACLIPAttention

    mha = _clip_attention("eager", width=48, heads=4, seed=3)
    original = copy.deepcopy(mha.state_dict())
    model = nn.ModuleDict({"self_attn": mha})
    name_map = convert_to_sha(model)
    sha = model["self_attn"]
    assert isinstance(sha, SHACLIPAttention) and sha.out_proj is mha.out_proj
    for proj in ("q_proj", "k_proj", "v_proj"):
        convs = getattr(sha, f"{proj}_convs")
        assert len(convs) == 4
        for i, conv in enumerate(convs):
            assert torch.equal(conv.weight[:, :, 0, 0], original[f"{proj}.weight"][i * 12:(i + 1) * 12])
            assert torch.equal(conv.bias, original[f"{proj}.bias"][i * 12:(i + 1) * 12])
        assert name_map[f"self_attn.{proj}.weight"] == [f"self_attn.{proj}_convs.{i}.weight" for i in range(4)]
    model.train()
    assert convert_to_mha(model) == name_map
    undone = model["self_attn"]
    assert type(undone) is CLIPAttention and undone.config is mha.config and undone.training
    assert_same_state_dict(undone.state_dict(), original)
    assert list(undone.state_dict()) == list(original)


@pytest.mark.parametrize("part, reason", [
    ("dropout", "attention dropout"),
    ("implementation", "attention implementation 'flash_attention_2'"),
    ("subclass", "PatchedCLIPAttention overrides CLIPAttention.forward"),
    ("wrapped_projection", r"its v_proj is not a plain Linear \(Sequential\)"),
    ("missing_projection", r"its k_proj is not a plain Linear \(NoneType\)"),
    ("heads", "4 heads of 8 do not make q_proj's 16 output features"),
])
def test_a_clip_attention_the_rewrite_cannot_keep_exact_is_refused_by_name_and_reason(part, reason):
    from transformers.models.clip.modeling_clip import CLIPAttention

    attn = _clip_attention("eager", width=16, heads=2, attention_dropout=0.1 if part == "dropout" else 0.0)
    if part == "implementation":
        attn.config._attn_implementation = "flash_attention_2"
    if part == "subclass":
        attn.__class__ = type("PatchedCLIPAttention", (CLIPAttention,), {"forward": lambda self, *a, **k: None})
    if part == "wrapped_projection":
        attn.v_proj = nn.Sequential(attn.v_proj)
    if part == "missing_projection":
        del attn.k_proj
    if part == "heads":  # a head count changed after construction: 16 divides by 4, but 4 heads of 8 are not 16
        attn.num_heads = 4
    model = nn.ModuleDict({"text": nn.ModuleDict({"attn": attn})})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedAttentionError, match=rf"text\.attn: .*{reason}"):
        convert_to_sha(model)
    assert model["text"]["attn"] is attn
    assert_same_state_dict(model.state_dict(), before)


@pytest.mark.parametrize("call, message", [
    (lambda sha, x: sha(x, None, output_attentions=True), r"does not take \['output_attentions'\]"),
    (lambda sha, x: sha(x[0]), r"must be \(B, N, C\)"),
    (lambda sha, x: sha(x, torch.zeros(2, 3, 5, 5)), r"not \(B, 1 or heads, Nq, Nk\)"),
    (lambda sha, x: sha(x, torch.zeros(2, 1, 5, 4)), r"not \(B, 1 or heads, Nq, Nk\)"),
    (lambda sha, x: sha(x, torch.zeros(2, 1, 5)), r"not \(B, 1 or heads, Nq, Nk\)"),  # 3-D, however it broadcasts
    (lambda sha, x: sha(x, torch.zeros(3, 1, 5, 5)), r"not \(B, 1 or heads, Nq, Nk\) for B=2"),
    (lambda sha, x: sha(x, [[0.0] * 5] * 5), r"attention_mask is a list, not a tensor"),
])
def test_clip_sha_refuses_what_it_would_compute_differently(call, message):
    from pasd_verify.sha import SHACLIPAttention

    sha = SHACLIPAttention(_clip_attention("sdpa", width=16, heads=2))
    with pytest.raises(AttentionInputError, match=message):
        call(sha, torch.randn(2, 5, 16))


def _clip_forms(implementation: str | None) -> tuple[nn.Module, nn.Module]:
    """A small float64 CLIPAttention (16 wide, 2 heads) under ``implementation`` and its single-head form."""
    from pasd_verify.sha import SHACLIPAttention

    mha = _clip_attention(implementation, width=16, heads=2).double()
    return mha, SHACLIPAttention(copy.deepcopy(mha))


def test_a_clip_mask_of_batch_one_is_broadcast_over_the_batch_as_by_the_module():
    """transformers' masks may come with a batch of 1 for every prompt; the single-head form takes them as the MHA
    module does."""
    mha, sha = _clip_forms("eager")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    mask = _clip_mask("additive_causal", 1, 5, torch.float64, g)
    assert mask.shape == (1, 1, 5, 5)
    with torch.no_grad():
        assert_within_tolerance(mha(x, mask)[0], sha(x, mask)[0], torch.float64)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_clip_mask_per_head_gives_each_head_its_own(implementation):
    """A (B, heads, Nq, Nk) mask, different for each head (two heads: the smallest count where a head could be given
    another's), against the MHA module under the same implementation."""
    mha, sha = _clip_forms(implementation)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    mask = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64) * 4
    assert not torch.equal(mask[:, 0], mask[:, 1])
    with torch.no_grad():
        assert_within_tolerance(mha(x, mask)[0], sha(x, mask)[0], torch.float64)


def test_a_clip_attention_built_alone_with_no_implementation_set_is_eager_as_transformers_runs_it():
    """A CLIPAttention made outside a model has ``_attn_implementation`` None, which transformers runs as eager (no
    causality from is_causal, softmax in float32): the single-head form does the same."""
    mha, sha = _clip_forms(None)
    assert mha.config._attn_implementation is None
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        for causal in ({}, {"is_causal": True}):
            assert_within_tolerance(mha(x, None, **causal)[0], sha(x, None, **causal)[0], torch.float64)


def test_sha_clip_attention_built_directly_refuses_what_convert_to_sha_refuses_naming_the_class():
    from pasd_verify.sha import SHACLIPAttention

    attn = _clip_attention("eager", width=16, heads=2, attention_dropout=0.1)
    with pytest.raises(UnsupportedAttentionError, match=r"\n  CLIPAttention: its attention dropout is 0\.1"):
        SHACLIPAttention(attn)


def test_a_boolean_mask_keeps_what_is_true_as_sdpa_does():
    """SDPA's boolean mask: True attends, False is masked. The property draws boolean masks among others; this one
    always runs, with keys masked in each row, because a mask read the other way round changes every output."""
    mha = Attention(16, heads=2, dim_head=8, processor=AttnProcessor2_0()).double().eval()
    sha = SHAAttention(copy.deepcopy(mha))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    keep = torch.tensor([[True, False, True, True, False, True], [True, True, False, True, True, False]])[:, None]
    with torch.no_grad():
        reference, candidate = mha(x, attention_mask=keep), sha(x, attention_mask=keep)
    assert_within_tolerance(reference, candidate, torch.float64)
    with torch.no_grad():  # and the mask matters: read inverted, the output is another
        assert not torch.allclose(reference, mha(x, attention_mask=~keep))


def test_a_model_without_clip_converts_without_loading_transformers_clip():
    """convert_to_sha looks for CLIP attentions only where transformers' CLIP is loaded: a diffusers UNet converts
    in a process that never imported it, and it stays unimported (a fresh interpreter: this one has it loaded)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from pasd_verify.presets import build_unet\n"
            "from pasd_verify.sha import convert_to_sha\n"
            "clip = 'transformers.models.clip.modeling_clip'\n"
            "assert clip not in sys.modules, 'building the UNet loaded CLIP: the test proves nothing'\n"
            "names = convert_to_sha(build_unet('tiny'))\n"
            "assert clip not in sys.modules, 'convert_to_sha loaded CLIP'\n"
            "print(len(names))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 0
