"""Rewrite diffusers multi-head attention (MHA) into single-head attention (SHA).

Qualcomm's QNN compiles attention best as one small graph per head: per head a 1x1 ``Conv2d`` each for q, k
and v, then matmul, softmax, matmul, and a concat of the heads before the unchanged output projection.
``convert_to_sha`` swaps every diffusers ``Attention`` it can convert exactly for a :class:`SHAAttention`, and
every transformers ``CLIPAttention`` (the text encoder's) for a :class:`SHACLIPAttention`, and returns the MHA -> SHA
parameter-name map, which is the single source of truth for every later rename (checkpoints, AIMET encodings).
``convert_to_mha`` undoes the swap.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from aimet_torch.nn.modules.custom import Concat, MatMul
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from .errors import AttentionInputError, UnsupportedAttentionError
from .name_map import CLIP_PROJECTIONS, PROJECTIONS, NameMap

logger = logging.getLogger(__name__)


# diffusers' processors that compute plain scaled-dot-product attention; any other processor (IP-adapter,
# LoRA, custom) may compute something else, so a module using one is refused rather than guessed at.
_PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def _bias_mismatch(attn: nn.Module, projections: tuple[str, ...]) -> list[str]:
    """A reason when some of the q/k/v projections have a bias and others none: the name map (and undo) give the three
    one bias rule, so such a module would be renamed wrongly, not rewritten."""
    biased = {proj: getattr(attn, proj).bias is not None for proj in projections}
    if len(set(biased.values())) > 1:
        return [f"its q/k/v projections differ in having a bias ({', '.join(f'{p}: {b}' for p, b in biased.items())})"]
    return []


def unsupported_reasons(attn: Attention) -> list[str]:
    """Why ``attn`` cannot be rewritten to SHA exactly; an empty list means it can."""
    reasons = []
    if type(attn).forward is not Attention.forward:
        reasons.append(f"{type(attn).__name__} overrides Attention.forward")
    # A group norm (the VAE's attentions) is not refused: it normalizes the input before the projections, and stays
    # there, whole, before the split into heads.
    for attrs, what in (
        (("spatial_norm",), "a spatial norm"),
        (("norm_q", "norm_k"), "query/key norms (qk_norm)"),
        (("norm_cross",), "a cross-attention norm"),
        (("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"), "added projections (added_kv_proj_dim)"),
    ):
        if any(getattr(attn, attr, None) is not None for attr in attrs):
            reasons.append(f"it has {what}")
    if attn.to_k is None or attn.to_v is None:
        reasons.append("it has no key/value projections (only_cross_attention)")
    if attn.to_out is None:
        reasons.append("it has no output projection (pre_only)")
    elif len(attn.to_out) != 2 or not isinstance(attn.to_out[0], nn.Linear):
        reasons.append("its to_out is not [Linear, Dropout]")
    if getattr(attn, "fused_projections", False):
        reasons.append("its q/k/v projections are fused")
    if not isinstance(attn.processor, _PLAIN_PROCESSORS):
        reasons.append(f"its processor {type(attn.processor).__name__} is not AttnProcessor or AttnProcessor2_0")
    if reasons:
        return reasons

    heads, inner = attn.heads, attn.to_q.out_features
    if inner % heads:
        return [f"to_q has {inner} output features, which {heads} heads do not divide evenly"]
    if attn.to_k.out_features != inner or attn.to_v.out_features != inner:
        reasons.append(
            f"to_k/to_v have {attn.to_k.out_features}/{attn.to_v.out_features} output features, "
            f"to_q {inner} (grouped key/value heads)"
        )
    if isinstance(attn.processor, AttnProcessor2_0) and attn.scale != (inner // heads) ** -0.5:
        # AttnProcessor2_0 ignores attn.scale and uses 1/sqrt(dim_head); a copy of attn.scale would differ.
        reasons.append(f"AttnProcessor2_0 ignores its scale {attn.scale}, which is not 1/sqrt(dim_head)")
    return reasons + _bias_mismatch(attn, ("to_q", "to_k", "to_v"))


class SingleHeads(nn.Module):
    """What every single-head form shares: per head ``i`` a 1x1 conv each for q, k and v (``<proj>_convs[i]``,
    named after the MHA module's projections and holding rows ``[i*dim_head:(i+1)*dim_head]`` of them),
    ``matmul_1[i]``, ``softmax_1[i]`` and ``matmul_2[i]`` for that head's attention, and ``concat_1`` joining the
    heads. Tensors entering the projections are laid out ``(B, C, 1, N)``, as the QNN converter expects of 1x1
    convs."""

    # matmul_1/matmul_2/concat_1 are aimet-torch's own MatMul and Concat modules: AIMET quantizes them natively,
    # so every head's products and the joined heads get their own quantizers.

    def _split_heads(self, attn: nn.Module, projections: tuple[str, str, str], heads: int) -> None:
        self.projections = projections
        self.heads = heads
        self.dim_head = getattr(attn, projections[0]).out_features // heads
        for proj in projections:
            setattr(self, f"{proj}_convs", nn.ModuleList(_head_convs(getattr(attn, proj), heads)))
        self.matmul_1 = nn.ModuleList(MatMul() for _ in range(heads))
        self.softmax_1 = nn.ModuleList(nn.Softmax(dim=-1) for _ in range(heads))
        self.matmul_2 = nn.ModuleList(MatMul() for _ in range(heads))
        self.concat_1 = Concat(axis=-1)

    def _attend(self, query_in: torch.Tensor, context: torch.Tensor, masks: list[torch.Tensor] | None,
                upcast_attention: bool, softmax_dtype: torch.dtype | None) -> torch.Tensor:
        """The heads' attention of ``query_in`` over ``context`` (both ``(B, C, 1, N)``), joined: ``(B, Nq, C)``.
        ``masks`` are per-head additive masks; the scores are float32 with ``upcast_attention``, and the softmax
        is computed in ``softmax_dtype`` (None: the scores' own) and cast back."""
        q_convs, k_convs, v_convs = (getattr(self, f"{proj}_convs") for proj in self.projections)
        head_outputs = []
        for i in range(self.heads):
            query = q_convs[i](query_in).squeeze(2).transpose(1, 2)  # (B, Nq, d)
            key = k_convs[i](context).squeeze(2)  # (B, d, Nk)
            value = v_convs[i](context).squeeze(2).transpose(1, 2)  # (B, Nk, d)
            if upcast_attention:
                query, key = query.float(), key.float()
            scores = self.matmul_1[i](query, key) * self.scale
            if masks is not None:
                scores = scores + masks[i]
            if softmax_dtype is not None:
                probs = self.softmax_1[i](scores.to(softmax_dtype)).to(value.dtype)
            else:
                probs = self.softmax_1[i](scores)
            head_outputs.append(self.matmul_2[i](probs, value))
        return self.concat_1(*head_outputs)

    def _merge_heads_into(self, attn: nn.Module) -> None:
        """Copy the heads' convs back into the MHA projections of ``attn`` (exact copies, no arithmetic)."""
        with torch.no_grad():
            for proj in self.projections:
                linear = getattr(attn, proj)
                convs = getattr(self, f"{proj}_convs")
                linear.to(device=convs[0].weight.device, dtype=convs[0].weight.dtype)
                linear.weight.copy_(torch.cat([conv.weight.flatten(1) for conv in convs]))
                if linear.bias is not None:
                    linear.bias.copy_(torch.cat([conv.bias for conv in convs]))


class SHAAttention(SingleHeads):
    """Single-head form of a diffusers ``Attention``: the same function, one small graph per head.

    Per head ``i``, ``to_q_convs[i]`` / ``to_k_convs[i]`` / ``to_v_convs[i]`` are 1x1 convolutions holding rows
    ``[i*dim_head:(i+1)*dim_head]`` of the MHA projections; ``matmul_1[i]``, ``softmax_1[i]`` and ``matmul_2[i]``
    compute that head's attention; ``concat_1`` joins the heads before the MHA ``to_out``, reused as is.
    A group norm (the VAE's) is reused as is, before the split.
    """

    def __init__(self, attn: Attention):
        """Build from ``attn``; its parameters are copied into per-head slices, ``attn`` is not changed."""
        super().__init__()
        reasons = unsupported_reasons(attn)
        if reasons:
            raise UnsupportedAttentionError({type(attn).__name__: reasons})
        self.scale = attn.scale
        self.residual_connection = attn.residual_connection
        self.rescale_output_factor = attn.rescale_output_factor
        self.group_norm = attn.group_norm  # None, or reused as is: its parameters keep their names
        # The classic processor computes scores (upcast_attention) and softmax (upcast_softmax) in float32 for
        # half-precision inputs; AttnProcessor2_0 ignores both flags, so only the classic one's are kept.
        classic = isinstance(attn.processor, AttnProcessor)
        self.upcast_attention = classic and attn.upcast_attention
        self.upcast_softmax = classic and (attn.upcast_attention or attn.upcast_softmax)
        # Everything convert_to_mha needs to rebuild an identical Attention.
        self.mha_config = _attention_config(attn)
        self._split_heads(attn, PROJECTIONS, attn.heads)
        self.to_out = attn.to_out
        self.train(attn.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **cross_attention_kwargs: Any,
    ) -> torch.Tensor:
        unexpected = sorted(k for k, v in cross_attention_kwargs.items() if v is not None)
        if unexpected:
            raise AttentionInputError(f"SHAAttention does not take {unexpected}; the MHA module would ignore them")
        residual = hidden_states
        if hidden_states.ndim == 4:
            batch, channels, height, width = hidden_states.shape
            query_in = hidden_states.reshape(batch, channels, 1, height * width)
        elif hidden_states.ndim == 3:
            query_in = hidden_states.transpose(1, 2).unsqueeze(2)
        else:
            raise AttentionInputError(
                f"hidden_states must be (B, N, C) or (B, C, H, W), got shape {tuple(hidden_states.shape)}"
            )
        if self.group_norm is not None:
            # diffusers normalizes the (B, C, N) tokens before the projections; (B, C, 1, N) has the same groups
            query_in = self.group_norm(query_in)
        if encoder_hidden_states is None:
            context = query_in
        elif encoder_hidden_states.ndim == 3:
            context = encoder_hidden_states.transpose(1, 2).unsqueeze(2)
        else:
            raise AttentionInputError(
                f"encoder_hidden_states must be (B, N, C), got shape {tuple(encoder_hidden_states.shape)}"
            )
        masks = self._head_masks(attention_mask, query_in, context)

        # Only half precision is upcast: in float32 the casts would be no-ops, yet exported graphs would keep them.
        half = query_in.dtype in (torch.float16, torch.bfloat16)
        joined = self._attend(query_in, context, masks, half and self.upcast_attention,
                              torch.float32 if half and self.upcast_softmax else None)
        out = self.to_out[1](self.to_out[0](joined))

        if hidden_states.ndim == 4:
            out = out.transpose(1, 2).reshape(batch, -1, height, width)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor

    def _head_masks(
        self, mask: torch.Tensor | None, query_in: torch.Tensor, context: torch.Tensor
    ) -> list[torch.Tensor] | None:
        """Per-head additive masks, laid out as diffusers' ``prepare_attention_mask`` lays them out."""
        if mask is None:
            return None
        batch, key_len = context.shape[0], context.shape[-1]
        if mask.shape[-1] != key_len:
            # diffusers would pad such a mask with zeros, silently attending to padding; refuse instead.
            raise AttentionInputError(
                f"attention_mask covers {mask.shape[-1]} keys, the keys number {key_len}"
            )
        if mask.dtype == torch.bool:
            # scaled_dot_product_attention's convention: True means attend.
            mask = torch.zeros(mask.shape, dtype=query_in.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        if mask.ndim == 2:
            mask = mask.unsqueeze(1)
        if mask.ndim != 3 or mask.shape[0] not in (batch, batch * self.heads):
            raise AttentionInputError(
                f"attention_mask shape {tuple(mask.shape)} is neither (B, [Nq,] Nk) nor (B*heads, Nq, Nk) "
                f"for B={batch}, heads={self.heads}, Nk={key_len}"
            )
        if mask.shape[0] == batch:
            return [mask] * self.heads
        per_head = mask.reshape(batch, self.heads, mask.shape[1], key_len)
        return [per_head[:, i] for i in range(self.heads)]

    def to_attention(self) -> Attention:
        """An MHA ``Attention`` equal to the one this module was built from: same config, same parameters."""
        config = dict(self.mha_config)
        processor_cls = config.pop("processor_cls")
        scale = config.pop("scale")
        attn = Attention(**config, processor=processor_cls())
        attn.scale = scale
        if attn.to_q.out_features != self.heads * self.dim_head or attn.heads != self.heads:
            raise UnsupportedAttentionError(
                {"SHAAttention": [f"rebuilding Attention from {self.mha_config} gives a different shape"]}
            )
        self._merge_heads_into(attn)
        attn.to_out = self.to_out
        attn.group_norm = self.group_norm
        attn.train(self.training)
        return attn


# transformers' attention implementations that compute plain scaled-dot-product attention from the masks CLIP's
# text and vision models build (an additive or boolean tensor, or none with is_causal); flash and flex attention
# take other mask formats on other devices, and are refused rather than guessed at.
_PLAIN_IMPLEMENTATIONS = ("eager", "sdpa")


def _clip_attention_types() -> tuple[type, ...]:
    """transformers' ``CLIPAttention``, where transformers' CLIP is loaded: a model can only hold one once its
    module is imported, so pasd-verify does not import transformers for models that have none."""
    module = sys.modules.get("transformers.models.clip.modeling_clip")
    return (module.CLIPAttention,) if module is not None else ()


def clip_unsupported_reasons(attn: nn.Module) -> list[str]:
    """Why the transformers ``CLIPAttention`` ``attn`` cannot be rewritten to SHA exactly; empty means it can."""
    [clip_attention] = _clip_attention_types()
    reasons = []
    if type(attn).forward is not clip_attention.forward:
        reasons.append(f"{type(attn).__name__} overrides CLIPAttention.forward")
    for proj in (*CLIP_PROJECTIONS, "out_proj"):
        if type(getattr(attn, proj, None)) is not nn.Linear:
            reasons.append(f"its {proj} is not a plain Linear ({type(getattr(attn, proj, None)).__name__})")
    implementation = attn.config._attn_implementation or "eager"  # None: a module made alone, which runs eager
    if implementation not in _PLAIN_IMPLEMENTATIONS:
        reasons.append(f"its attention implementation {implementation!r} is not one of {list(_PLAIN_IMPLEMENTATIONS)}")
    if attn.dropout:
        reasons.append(f"its attention dropout is {attn.dropout}; the single-head form has none")
    if reasons:
        return reasons
    if attn.embed_dim % attn.num_heads or attn.head_dim * attn.num_heads != attn.q_proj.out_features:
        reasons.append(f"{attn.num_heads} heads of {attn.head_dim} do not make q_proj's {attn.q_proj.out_features} "
                       f"output features")
    return reasons + _bias_mismatch(attn, CLIP_PROJECTIONS)


class SHACLIPAttention(SingleHeads):
    """Single-head form of transformers' ``CLIPAttention`` (the SD1.5 text encoder's self-attentions).

    ``q_proj_convs[i]`` / ``k_proj_convs[i]`` / ``v_proj_convs[i]`` hold head ``i``'s rows of the MHA projections;
    ``out_proj`` is reused as is. Called as ``CLIPAttention`` is: ``(hidden_states, attention_mask, is_causal=...)``
    -> ``(output, None)`` (no attention weights: there is no one matrix of them to return).
    """

    def __init__(self, attn: nn.Module):
        """Build from ``attn``; its parameters are copied into per-head slices, ``attn`` is not changed."""
        super().__init__()
        reasons = clip_unsupported_reasons(attn)
        if reasons:
            raise UnsupportedAttentionError({type(attn).__name__: reasons})
        self.config = attn.config  # the model's own config object: undo rebuilds CLIPAttention from it
        self.scale = attn.scale
        self.is_causal = attn.is_causal
        # eager computes the softmax in float32 whatever the inputs' dtype (float64 included) and casts it back, and
        # takes causality only from the mask it is given; sdpa computes the softmax in the inputs' dtype, and with no
        # mask applies the causal one the caller's is_causal asks for: each converted module does what its MHA did
        eager = (attn.config._attn_implementation or "eager") == "eager"
        self.softmax_dtype = torch.float32 if eager else None
        self.causal_from_flag = not eager
        self._split_heads(attn, CLIP_PROJECTIONS, attn.num_heads)
        self.out_proj = attn.out_proj
        self.train(attn.training)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        unexpected = sorted(k for k, v in kwargs.items() if v not in (None, False))
        if unexpected:
            raise AttentionInputError(f"SHACLIPAttention does not take {unexpected}")
        if hidden_states.ndim != 3:
            raise AttentionInputError(f"hidden_states must be (B, N, C), got shape {tuple(hidden_states.shape)}")
        tokens = hidden_states.transpose(1, 2).unsqueeze(2)  # (B, C, 1, N)
        masks = self._head_masks(attention_mask, hidden_states, is_causal)
        return self.out_proj(self._attend(tokens, tokens, masks, False, self.softmax_dtype)), None

    def _head_masks(self, mask: torch.Tensor | None, hidden_states: torch.Tensor,
                    is_causal: bool | None) -> list[torch.Tensor] | None:
        """Per-head additive masks from what transformers passes: a ``(B, 1 or heads, Nq, Nk)`` additive or boolean
        (True: attend, which only sdpa is given) tensor, or none, with ``is_causal`` (else the module's own flag)
        asking sdpa for the causal one. A masked score gets the dtype's most negative value, as transformers' masks give it."""
        batch, length = hidden_states.shape[:2]
        lowest = torch.finfo(hidden_states.dtype).min
        if mask is None:
            causal = self.causal_from_flag and (self.is_causal if is_causal is None else is_causal)
            if not causal or length == 1:
                return None
            upper = torch.ones(length, length, dtype=torch.bool, device=hidden_states.device).triu(1)
            return [torch.zeros(upper.shape, dtype=hidden_states.dtype, device=hidden_states.device)
                    .masked_fill(upper, lowest)] * self.heads
        if not isinstance(mask, torch.Tensor):
            raise AttentionInputError(f"attention_mask is a {type(mask).__name__}, not a tensor")
        if mask.ndim != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, self.heads) \
                or mask.shape[-1] != length:
            raise AttentionInputError(f"attention_mask shape {tuple(mask.shape)} is not (B, 1 or heads, Nq, Nk) for "
                                      f"B={batch}, heads={self.heads}, N={length}")
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=hidden_states.dtype, device=mask.device).masked_fill(~mask, lowest)
        return [mask[:, i if mask.shape[1] > 1 else 0] for i in range(self.heads)]

    def to_attention(self) -> nn.Module:
        """A ``CLIPAttention`` equal to the one this module was built from: same config, same parameters."""
        [clip_attention] = _clip_attention_types()
        attn = clip_attention(self.config)
        self._merge_heads_into(attn)
        attn.out_proj = self.out_proj
        attn.train(self.training)
        return attn


def _attention_config(attn: Attention) -> dict[str, Any]:
    return {
        "query_dim": attn.to_q.in_features,
        "cross_attention_dim": attn.to_k.in_features if attn.is_cross_attention else None,
        "heads": attn.heads,
        "dim_head": attn.to_q.out_features // attn.heads,
        "dropout": attn.dropout,
        "bias": attn.to_q.bias is not None,
        "upcast_attention": attn.upcast_attention,
        "upcast_softmax": attn.upcast_softmax,
        "out_bias": attn.to_out[0].bias is not None,
        "scale_qk": attn.scale_qk,
        "rescale_output_factor": attn.rescale_output_factor,
        "residual_connection": attn.residual_connection,
        # the group norm module itself (its eps, its parameters) is reused on undo; this gives it its slot, first
        # among the submodules, so that the rebuilt module's state dict has the original's order
        "norm_num_groups": attn.group_norm.num_groups if attn.group_norm is not None else None,
        "_from_deprecated_attn_block": attn._from_deprecated_attn_block,
        # Attention's out_dim sets the inner width and the output width together; it was given only where
        # they are not dim_head*heads and query_dim.
        "out_dim": None if attn.to_out[0].out_features == attn.to_q.in_features else attn.to_out[0].out_features,
        "processor_cls": type(attn.processor),
        "scale": attn.scale,
    }


def _head_convs(linear: nn.Linear, heads: int) -> list[nn.Conv2d]:
    """One 1x1 conv per head holding that head's contiguous rows of ``linear`` (exact copies, no arithmetic)."""
    dim_head = linear.out_features // heads
    weight = linear.weight.detach()
    convs = []
    for i in range(heads):
        rows = slice(i * dim_head, (i + 1) * dim_head)
        conv = nn.Conv2d(
            linear.in_features, dim_head, kernel_size=1, bias=linear.bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(weight[rows].reshape(dim_head, linear.in_features, 1, 1))
            if linear.bias is not None:
                conv.bias.copy_(linear.bias.detach()[rows])
        conv.weight.requires_grad_(linear.weight.requires_grad)
        convs.append(conv)
    return convs


def _reasons(module: nn.Module) -> list[str]:
    return unsupported_reasons(module) if isinstance(module, Attention) else clip_unsupported_reasons(module)


def _single_head(module: nn.Module) -> SingleHeads:
    return SHAAttention(module) if isinstance(module, Attention) else SHACLIPAttention(module)


def convert_to_sha(model: nn.Module, *, skip_unsupported: bool = False) -> NameMap:
    """Replace, in place, every diffusers ``Attention`` in ``model`` by an equivalent :class:`SHAAttention`, and every
    transformers ``CLIPAttention`` by an equivalent :class:`SHACLIPAttention`.

    Returns the MHA -> SHA parameter-name map: each replaced MHA parameter name (``...attn1.to_q.weight``,
    ``...self_attn.q_proj.weight``) to the per-head SHA names in head order (``...attn1.to_q_convs.0.weight``, ...).
    Parameters outside q/k/v keep their names and are not in the map.

    A module that cannot be converted exactly raises :class:`UnsupportedAttentionError` naming every such
    module and why, before anything is changed; with ``skip_unsupported=True`` those modules are left as
    they are and logged instead.
    """
    attentions = (Attention, *_clip_attention_types())
    if isinstance(model, attentions):
        single = "SHAAttention" if isinstance(model, Attention) else "SHACLIPAttention"
        raise TypeError(f"convert_to_sha rewrites the modules inside a model; wrap a lone {type(model).__name__} as "
                        f"{single}(attn)")
    targets = {name: m for name, m in model.named_modules() if isinstance(m, attentions)}
    problems = {name: reasons for name, m in targets.items() if (reasons := _reasons(m))}
    if problems and not skip_unsupported:
        raise UnsupportedAttentionError(problems)
    for name, reasons in problems.items():
        logger.warning("left %s as MHA: %s", name, "; ".join(reasons))

    name_map = NameMap()
    for name, attn in targets.items():
        if name in problems:
            continue
        sha = _single_head(attn)
        model.set_submodule(name, sha)
        name_map.add(name, sha.heads, getattr(attn, sha.projections[0]).bias is not None, sha.projections)
    logger.info("converted %d attention module(s) to SHA", len(targets) - len(problems))
    return name_map


def sha_name_map(model: nn.Module) -> NameMap:
    """The MHA -> SHA name map of a model already in SHA form: the one :func:`convert_to_sha` gave."""
    name_map = NameMap()
    for name, sha in model.named_modules():
        if isinstance(sha, SingleHeads):
            biased = getattr(sha, f"{sha.projections[0]}_convs")[0].bias is not None
            name_map.add(name, sha.heads, biased, sha.projections)
    return name_map


def convert_to_mha(model: nn.Module) -> NameMap:
    """Undo :func:`convert_to_sha` in place; returns the same MHA -> SHA name map the forward rewrite gave."""
    name_map = sha_name_map(model)
    for name, sha in [(n, m) for n, m in model.named_modules() if isinstance(m, SingleHeads)]:
        model.set_submodule(name, sha.to_attention())
    return name_map
