"""The name map object: what the module rewrite records, derived names, JSON round trip, malformed maps."""

from __future__ import annotations

import json

import pytest
from diffusers.models.attention_processor import Attention
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from pasd_verify import NameMap, NameMapError, convert_to_sha
from pasd_verify.name_map import CLIP_PROJECTIONS, PROJECTIONS, holds_sha_projections, is_projection_key
from pasd_verify.sha import SHAAttention
from pasd_verify.presets import build_pasd

_SEGMENT = st.sampled_from(["down_blocks", "attn1", "attn2", "transformer_blocks", "mid_block", "a_b"])
_PATH = st.lists(st.one_of(_SEGMENT, st.integers(0, 3).map(str)), min_size=1, max_size=5).map(".".join).filter(
    lambda p: not p[0].isdigit())


_SCHEME = st.sampled_from([PROJECTIONS, CLIP_PROJECTIONS])  # diffusers' to_q, transformers' q_proj


@st.composite
def name_maps(draw) -> tuple[NameMap, dict[str, tuple[int, bool, tuple[str, str, str]]]]:
    modules = draw(st.dictionaries(_PATH, st.tuples(st.integers(1, 16), st.booleans(), _SCHEME), min_size=1,
                                   max_size=5))
    name_map = NameMap()
    for module, (heads, bias, scheme) in modules.items():
        name_map.add(module, heads, bias, scheme)
    return name_map, modules


@given(drawn=name_maps())
def test_json_round_trip_gives_an_equal_name_map(drawn):
    name_map, _ = drawn
    text = name_map.to_json()
    back = NameMap.from_json(text)
    assert type(back) is NameMap and back == name_map and list(back) == list(name_map)
    assert json.loads(text) == name_map  # the file users read is the plain mapping


@given(drawn=name_maps())
def test_derived_names_follow_from_the_modules_and_their_heads(drawn):
    name_map, modules = drawn
    assert name_map.modules == {m: heads for m, (heads, _, _) in modules.items()}
    assert len(name_map) == sum(3 * (2 if bias else 1) for _, bias, _ in modules.values())
    assert name_map.sha_names() == [n for names in name_map.values() for n in names]
    assert {name_map.first_heads()[names[0]] for names in name_map.values()} == set(name_map)
    renames = name_map.activation_names("unet.")
    for module, (heads, _, (_, _, v)) in modules.items():
        assert name_map.projections(module)[2] == v
        assert renames[f"unet.{module}.{v}"] == [f"unet.{module}.{v}_convs.{i}" for i in range(heads)]


def test_the_rewrite_records_every_attention_with_its_heads():
    unet, controlnet = build_pasd("tiny", seed=0)
    for model in (unet, controlnet):
        heads = {name: m.heads for name, m in model.named_modules() if isinstance(m, Attention)}
        name_map = convert_to_sha(model)
        assert isinstance(name_map, NameMap) and name_map.modules == heads
        assert NameMap.of(dict(name_map)) == name_map


def _plain(name_map: NameMap) -> dict:
    return {k: list(v) for k, v in name_map.items()}


_MALFORMED = {
    "not a projection": (lambda m: {**m, "a.proj_in.weight": ["a.proj_in_convs.0.weight"]}, "'a.proj_in.weight'"),
    "heads out of order": (lambda m: {**m, "a.to_q.weight": m["a.to_q.weight"][::-1]}, "'a.to_q.weight'"),
    "no head names": (lambda m: {**m, "a.to_k.weight": []}, "'a.to_k.weight'"),
    "missing projection": (lambda m: {k: v for k, v in m.items() if k != "a.to_v.weight"}, "module 'a'"),
    "head counts differ": (lambda m: {**m, "a.to_v.weight": ["a.to_v_convs.0.weight"]}, "module 'a'"),
    "not a weight or bias": (lambda m: {**m, "a.to_q.scale": ["a.to_q_convs.0.scale", "a.to_q_convs.1.scale"]},
                             "'a.to_q.scale'"),
    "not an object": (lambda m: list(m), "expected an object of MHA name -> SHA names, got list"),
    "two naming schemes": (lambda m: {**m, "a.q_proj.weight": ["a.q_proj_convs.0.weight", "a.q_proj_convs.1.weight"]},
                           "module 'a'"),
}


@pytest.mark.parametrize("defect", sorted(_MALFORMED))
def test_malformed_name_maps_are_refused_naming_the_key(defect):
    name_map = NameMap()
    name_map.add("a", 2, has_bias=False)
    make, words = _MALFORMED[defect]
    with pytest.raises(NameMapError) as info:
        NameMap.from_json(json.dumps(make(_plain(name_map))), source="name_map.json")
    assert "name_map.json" in str(info.value) and words in str(info.value)


def test_a_lone_module_tree_converts_to_the_same_map_as_the_object_built_by_hand():
    model = nn.ModuleDict({"x": nn.ModuleDict({"attn": Attention(8, heads=4, dim_head=2, bias=True)})})
    expected = NameMap()
    expected.add("x.attn", 4, has_bias=True)
    assert convert_to_sha(model) == expected


def test_a_model_that_is_one_attention_maps_its_own_parameters():
    """A lone attention is the module at the root (path ``""``): the map must name exactly the parameters the
    converted module has, without a leading dot, and survive its own check and a JSON round trip."""
    sha = SHAAttention(Attention(8, heads=2, dim_head=4, bias=True))
    name_map = NameMap()
    name_map.add("", 2, has_bias=True)
    per_head = sorted(k for k in sha.state_dict() if "_convs." in k)  # the converted module's real names
    assert sorted(name_map.sha_names()) == per_head
    assert name_map["to_q.weight"] == ["to_q_convs.0.weight", "to_q_convs.1.weight"]
    assert name_map.modules == {"": 2}
    assert NameMap.of(dict(name_map)) == name_map == NameMap.from_json(name_map.to_json())


def test_without_a_prefix_scopes_and_activations_are_the_models_own():
    """AIMET's export names a module's ops under its ONNX scope (a ModuleList child by the list, then by the list
    and its index) and the free ops inside it under the flat path (the docstrings' examples, written out)."""
    name_map = NameMap()
    name_map.add("blocks.0.attn1", 2, has_bias=False)
    assert name_map.attention_scopes() == ["/blocks/blocks.0/attn1", "/blocks.0/attn1"]
    renames = name_map.activation_names()
    assert renames["blocks.0.attn1.to_k"] == ["blocks.0.attn1.to_k_convs.0", "blocks.0.attn1.to_k_convs.1"]
    assert renames["/blocks/blocks.0/attn1/to_k"] == [
        f"/blocks/blocks.0/attn1/to_k_convs/to_k_convs.{i}/Conv_output_0" for i in range(2)]


def test_a_name_map_that_is_not_json_is_refused_naming_the_source():
    with pytest.raises(NameMapError, match=r"^name_map\.json: not JSON"):
        NameMap.from_json('{"to_q.weight": [', source="name_map.json")


@given(heads=st.integers(1, 4), module=st.sampled_from(["", "a.attn1", "down_blocks.0.attentions.1.t.attn2",
                                                      "text_model.encoder.layers.11.self_attn"]),
       has_bias=st.booleans(), scheme=_SCHEME)
def test_projection_keys_are_read_in_the_form_the_name_map_writes(heads, module, has_bias, scheme):
    """Every MHA key a map splits is an MHA projection key and every SHA name it gives is an SHA one, never both; a
    checkpoint holds SHA projections exactly when it has one of those SHA names."""
    name_map = NameMap()
    name_map.add(module, heads, has_bias, scheme)
    for mha, shas in name_map.items():
        assert is_projection_key(mha, "mha") and not is_projection_key(mha, "sha")
        for sha in shas:
            assert is_projection_key(sha, "sha") and not is_projection_key(sha, "mha")
    others = ["x.to_out.0.weight", "x.to_q_convs.weight", "x.to_qq.weight", "x.to_q.weight.extra", "to_k_convs.1.gain",
              "x.out_proj.weight", "x.q_proj_convs.weight", "x.qq_proj.weight", "x.fc1.weight"]
    assert not any(is_projection_key(k, form) for k in others for form in ("mha", "sha"))
    assert not holds_sha_projections(list(name_map) + others)
    assert holds_sha_projections(list(name_map) + others + name_map.sha_names()[-1:])
