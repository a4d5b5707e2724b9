"""Hypothesis strategies: every generated shape and configuration comes from here, not from test bodies."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from hypothesis import strategies as st

from encodings_helpers import VERSIONS as ENCODINGS_VERSIONS

SD15_HEAD_DIMS = (40, 80, 160)
SD15_WIDTHS = (320, 768)
TEXT_LENGTH = 77


@dataclass(frozen=True)
class AttentionCase:
    """One attention module configuration plus the inputs to call it with."""

    heads: int
    dim_head: int
    query_dim: int
    cross_attention_dim: int | None
    bias: bool
    out_bias: bool
    processor: str
    residual_connection: bool
    rescale_output_factor: float
    batch: int
    height: int
    width: int
    key_length: int
    spatial_input: bool
    mask: str | None
    seed: int
    upcast_attention: bool = False
    upcast_softmax: bool = False
    norm_num_groups: int | None = None  # a group norm before the projections, as the VAE's attentions have

    def build(self, dtype: torch.dtype = torch.float32) -> Attention:
        """The MHA module, seeded; q/k weights are scaled up so softmax is peaked, not near uniform.

        The gain of 2 gives attention logits of standard deviation about 4, as trained SD attention has. Larger
        logits make fp32 rounding alone (MHA's as much as SHA's, against float64) approach the 1e-5 tolerance;
        exactness of the rewrite itself is what the float64 property proves.
        """
        processor = {"AttnProcessor": AttnProcessor, "AttnProcessor2_0": AttnProcessor2_0}[self.processor]()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            attn = Attention(
                self.query_dim, cross_attention_dim=self.cross_attention_dim, heads=self.heads,
                dim_head=self.dim_head, bias=self.bias, out_bias=self.out_bias, processor=processor,
                residual_connection=self.residual_connection, rescale_output_factor=self.rescale_output_factor,
                upcast_attention=self.upcast_attention, upcast_softmax=self.upcast_softmax,
                norm_num_groups=self.norm_num_groups, eps=1e-6,
            )
            for name, p in attn.named_parameters():
                gain = 2.0 if name.startswith(("to_q", "to_k")) else 1.0
                torch.nn.init.normal_(p, std=gain / max(p.shape[-1], 1) ** 0.5)
                if name.startswith("group_norm."):  # an affine norm near the identity, not a random scale
                    with torch.no_grad():
                        p.mul_(0.1).add_(1.0 if name.endswith("weight") else 0.0)
        return attn.to(dtype).eval()

    def reference(self, dtype: torch.dtype = torch.float32) -> Attention:
        """The MHA module SHA must equal in ``dtype``. In float64 it is built without the upcast flags: the classic
        processor's "upcast" is ``.float()``, a cast down to float32 there, while SHA upcasts half precision only
        and stays float64 end to end. In float32 the flags are no-ops, and in half precision both upcast."""
        if dtype == torch.float64 and (self.upcast_attention or self.upcast_softmax):
            return dataclasses.replace(self, upcast_attention=False, upcast_softmax=False).build(dtype)
        return self.build(dtype)

    def inputs(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + 1)
        tokens = self.height * self.width
        if self.spatial_input:
            hidden = torch.randn(self.batch, self.query_dim, self.height, self.width, generator=g, dtype=dtype)
        else:
            hidden = torch.randn(self.batch, tokens, self.query_dim, generator=g, dtype=dtype)
        inputs = {"hidden_states": hidden}
        if self.cross_attention_dim is not None:
            inputs["encoder_hidden_states"] = torch.randn(
                self.batch, self.key_length, self.cross_attention_dim, generator=g, dtype=dtype
            )
        if self.mask is not None:
            inputs["attention_mask"] = self._mask(g, tokens, dtype)
        return inputs

    def _mask(self, g: torch.Generator, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        b, k = self.batch, self.key_length
        if self.mask == "bool":
            keep = torch.rand(b, 1, k, generator=g) > 0.3
            keep[..., 0] = True  # a row with no key to attend to is NaN in MHA and SHA alike
            return keep
        shape = {"keys": (b, k), "text": (b, 1, k), "queries": (b, tokens, k), "per_head": (b * self.heads, tokens, k)}
        additive = torch.randn(*shape[self.mask], generator=g, dtype=dtype)
        # Masked-out keys as diffusers' UNet writes them: a large negative bias.
        return additive.masked_fill(torch.rand(additive.shape, generator=g) < 0.2, -10000.0)


@st.composite
def attention_cases(draw, *, heads=st.integers(1, 16), max_tokens: int = 64) -> AttentionCase:
    heads = draw(heads)
    dim_head = draw(st.one_of(st.integers(1, 64), st.sampled_from(SD15_HEAD_DIMS)))
    query_dim = draw(st.one_of(st.integers(1, 96), st.sampled_from(SD15_WIDTHS)))
    cross_attention_dim = draw(st.one_of(st.none(), st.integers(1, 96), st.just(768)))
    height = draw(st.integers(1, 8))
    width = draw(st.integers(1, max(1, max_tokens // height)))
    if cross_attention_dim is None:
        key_length = height * width
    else:
        key_length = draw(st.one_of(st.integers(1, 96), st.just(TEXT_LENGTH)))
    processor = draw(st.sampled_from(["AttnProcessor", "AttnProcessor2_0"]))
    masks = [None, "text", "queries", "per_head"]
    if processor == "AttnProcessor2_0":
        # Only SDPA takes bool masks, and only it lays out a 2-D (B, Nk) mask per head as documented;
        # the classic processor broadcasts one against the query axis instead.
        masks += ["keys", "bool"]
    residual = draw(st.booleans())
    return AttentionCase(
        heads=heads,
        dim_head=dim_head,
        query_dim=query_dim,
        cross_attention_dim=cross_attention_dim,
        bias=draw(st.booleans()),
        out_bias=draw(st.booleans()),
        processor=processor,
        residual_connection=residual,
        rescale_output_factor=draw(st.sampled_from([1.0, 2.0, 0.5])) if residual else 1.0,
        batch=draw(st.integers(1, 3)),
        height=height,
        width=width,
        key_length=key_length,
        spatial_input=draw(st.booleans()),
        mask=draw(st.sampled_from(masks)),
        seed=draw(st.integers(0, 2**16)),
        upcast_attention=draw(st.booleans()),
        upcast_softmax=draw(st.booleans()),
        # the group's statistics need 2 values at least: channels per group x tokens
        norm_num_groups=draw(st.one_of(st.none(), st.sampled_from(
            [g for g in (1, 2, 4, 32) if query_dim % g == 0 and (query_dim // g) * height * width >= 2] or [None]))),
    )


@st.composite
def transformer_configs(draw, *, channels=st.sampled_from([8, 16, 32, 48]), heads=None, norm_groups=None,
                        cross_attention_dim=st.sampled_from([16, 32, 768]), use_linear_projection=st.booleans(),
                        text_length=st.sampled_from([1, 7, TEXT_LENGTH]), max_side: int = 8) -> dict:
    """Config and input sizes of a ``Transformer2DModel`` as SD1.5 uses it (cross attention). Each argument is a
    strategy; ``heads`` and ``norm_groups`` default to the divisors of the drawn width that the model accepts
    (SD1.5's own values: ``heads=st.just(8), norm_groups=st.just(32)``)."""
    channels = draw(channels)
    heads = draw(heads if heads is not None else st.sampled_from([h for h in (1, 2, 4, 8) if channels % h == 0]))
    # at least 2 channels per group: torch's group norm refuses a group of one value (1x1 inputs)
    groups = draw(norm_groups if norm_groups is not None else
                  st.sampled_from([g for g in (1, 4, 8) if channels % g == 0 and channels // g >= 2]))
    return {
        "model": {
            "num_attention_heads": heads,
            "attention_head_dim": channels // heads,
            "in_channels": channels,
            "norm_num_groups": groups,
            "cross_attention_dim": draw(cross_attention_dim),
            "use_linear_projection": draw(use_linear_projection),
        },
        "batch": draw(st.integers(1, 3)),
        "height": draw(st.integers(1, max_side)),
        "width": draw(st.integers(1, max_side)),
        "text_length": draw(text_length),
        "seed": draw(st.integers(0, 2**16)),
    }


@st.composite
def latent_shapes(draw, *, multiple: int, max_side: int, max_batch: int) -> dict:
    """Batch and latent size with both sides multiples of ``multiple`` (square or not), plus a seed."""
    return {
        "batch": draw(st.integers(1, max_batch)),
        "height": multiple * draw(st.integers(1, max_side // multiple)),
        "width": multiple * draw(st.integers(1, max_side // multiple)),
        "seed": draw(st.integers(0, 2**16)),
    }


def unet_inputs(*, max_side: int = 24):
    """Latent sizes for a tiny UNet: its two levels need sides divisible by 2."""
    return latent_shapes(multiple=2, max_side=max_side, max_batch=3)


def pasd_shapes(*, max_latent: int = 24):
    """Latent sizes for the tiny PASD pair: multiples of 8, as PASD's images are."""
    return latent_shapes(multiple=8, max_side=max_latent, max_batch=2)


def sha_tolerance(dtype: torch.dtype) -> float:
    """max |SHA - MHA| allowed, relative to max |MHA output|."""
    return {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]



# Model kinds a user's folder can hold, as the config's _class_name and PASD's weights describe them.
MODEL_KINDS = ("UNet2DConditionModel", "PASDUNet2DConditionModel", "PASDControlNetModel")


@st.composite
def small_model_configs(draw, *, kinds=st.sampled_from(MODEL_KINDS)) -> dict:
    """A small two-level UNet or ControlNet config of a drawn kind; PASD ControlNets draw their two flags.

    ``_class_name`` is the PASD class for the PASD kinds; :func:`as_pasd_writes_it` gives the folder PASD writes.
    """
    kind = draw(kinds)
    channels = draw(st.sampled_from([(16, 32), (32, 32), (32, 64)]))
    heads = tuple(draw(st.sampled_from([h for h in (1, 2, 4) if c % h == 0])) for c in channels)
    down = draw(st.sampled_from([("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnDownBlock2D",) * 2]))
    config = {
        "_class_name": kind,
        "block_out_channels": channels,
        "layers_per_block": draw(st.integers(1, 2)),
        "down_block_types": down,
        "cross_attention_dim": draw(st.sampled_from([16, 32])),
        "attention_head_dim": heads,  # diffusers' misnomer: the number of heads
        "norm_num_groups": 8,
    }
    if kind == "PASDControlNetModel":
        config.update(conditioning_embedding_out_channels=(8, 8, 16, 16), return_rgbs=draw(st.booleans()),
                      use_rrdb=draw(st.booleans()))
    else:
        ups = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
        config.update(sample_size=8, up_block_types=tuple(ups[b] for b in reversed(down)))
    return config


def as_pasd_writes_it(config: dict) -> dict:
    """The config.json PASD's own save_pretrained writes: its classes are named like diffusers' stock ones."""
    stock = {"PASDUNet2DConditionModel": "UNet2DConditionModel", "PASDControlNetModel": "ControlNetModel"}
    return {**config, "_class_name": stock.get(config["_class_name"], config["_class_name"]),
            "_diffusers_version": "0.29.2"}


@dataclass(frozen=True)
class LayerCase:
    """One Conv2d or Linear layer with seeded weights, and seeded inputs for it, for AdaRound properties."""

    kind: str
    in_channels: int
    out_channels: int
    kernel: int
    tokens: int
    samples: int
    weight_scale: float
    seed: int

    def build(self) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.kind == "conv":
                layer = torch.nn.Conv2d(self.in_channels, self.out_channels, self.kernel, padding=self.kernel // 2)
            else:
                layer = torch.nn.Linear(self.in_channels, self.out_channels)
            with torch.no_grad():
                layer.weight.mul_(self.weight_scale)
        return torch.nn.Sequential(layer).eval()

    def inputs(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + 1)
        shape = (1, self.in_channels, self.tokens, self.tokens) if self.kind == "conv" else (1, self.tokens, self.in_channels)
        return [torch.randn(*shape, generator=g) for _ in range(self.samples)]


@st.composite
def layer_cases(draw) -> LayerCase:
    kind = draw(st.sampled_from(["conv", "linear"]))
    return LayerCase(
        kind=kind,
        in_channels=draw(st.integers(1, 16)),
        out_channels=draw(st.integers(1, 16)),
        kernel=draw(st.sampled_from([1, 3])) if kind == "conv" else 1,
        tokens=draw(st.integers(1, 6)),
        samples=draw(st.integers(1, 3)),
        # weights over several orders of magnitude: the grid must hold whatever the range
        weight_scale=draw(st.sampled_from([1e-3, 1.0, 50.0])),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def per_channel_encodings(draw):
    """A per-channel encoding of either format, with a channel count that ``heads`` divides."""
    version = draw(st.sampled_from(ENCODINGS_VERSIONS))
    heads = draw(st.integers(1, 8))
    channels = heads * draw(st.integers(1, 6))
    bw = draw(st.sampled_from([4, 8, 16]))
    scales = draw(st.lists(st.floats(1e-6, 1.0), min_size=channels, max_size=channels))
    offsets = draw(st.lists(st.integers(-(2**bw - 1), 0), min_size=channels, max_size=channels))
    if version == "0.6.1":
        entry = [{"bitwidth": bw, "dtype": "int", "is_symmetric": "False", "offset": o, "scale": s,
                  "min": o * s, "max": (o + 2**bw - 1) * s} for s, o in zip(scales, offsets)]
    else:
        entry = {"name": "w", "bw": bw, "dtype": "INT", "enc_type": "PER_CHANNEL", "is_sym": False,
                 "scale": scales, "offset": offsets}
    return version, heads, entry
