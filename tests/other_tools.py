"""Artifacts written the way other tools write them, from their documented behaviour (REFERENCE section 4), never by
pasd-verify's conversion: the attention modules and head counts come from diffusers' and transformers' own modules.

- Qualcomm's reference note (diffusers 0.10 era; ``replace_linear_to_convs``, ``replace_tensors``,
  ``replace_encodings``): per head a 1x1 Conv2d ``M.to_q_convs.{i}`` of rows ``[i*dh:(i+1)*dh]``; its defects: the
  MHA keys are collected for removal but never removed, a per-channel encoding is copied whole to every head, the
  head count is a hard-coded 8.
- quic/ai-hub-models' ``model_adaptation.py``: ``M.q_proj_sha.{i}`` (and ``k_proj_sha``, ``v_proj_sha``), Conv2d
  weights ``(head_dim, in, 1, 1)``, the Linear projections deleted.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers.models.attention_processor import Attention

PROJECTIONS = ("to_q", "to_k", "to_v")


def attention_heads(model: torch.nn.Module) -> dict[str, int]:
    """Each diffusers attention module of ``model`` with its head count, as diffusers built it."""
    return {name: module.heads for name, module in model.named_modules() if isinstance(module, Attention)}


def _split_rows(tensor: torch.Tensor, heads: int) -> list[torch.Tensor]:
    rows = tensor.shape[0] // heads
    return [tensor[i * rows:(i + 1) * rows].clone() for i in range(heads)]


def _as_conv(rows: torch.Tensor) -> torch.Tensor:
    return rows[:, :, None, None] if rows.dim() == 2 else rows


def reference_note_checkpoint(state: dict[str, torch.Tensor], heads: dict[str, int], *,
                              assumed_heads: int | None = None) -> dict[str, torch.Tensor]:
    """The reference note's SHA checkpoint: ``to_q_convs.{i}`` added, the MHA keys kept (its ``remove_keys`` are
    never removed); ``assumed_heads`` is its hard-coded head count (8) where given."""
    out = dict(state)
    for module, count in heads.items():
        for proj in PROJECTIONS:
            weight = state[f"{module}.{proj}.weight"]
            for i, rows in enumerate(_split_rows(weight, assumed_heads or count)):
                out[f"{module}.{proj}_convs.{i}.weight"] = _as_conv(rows)
    return out


def _heads_replacing_projections(state: dict[str, torch.Tensor], heads: dict[str, int], name) -> dict[str, torch.Tensor]:
    """``state`` with each q/k/v projection replaced by its heads, head i of ``module``'s projection ``p`` (0, 1, 2
    for q, k, v) named ``name(module, p, i)`` + ``.weight`` / ``.bias``; weights as 1x1 Conv2d ones."""
    out = dict(state)
    for module, count in heads.items():
        for p, proj in enumerate(PROJECTIONS):
            for kind in ("weight", "bias"):
                key = f"{module}.{proj}.{kind}"
                if key not in state:
                    continue
                del out[key]
                for i, rows in enumerate(_split_rows(state[key], count)):
                    out[f"{name(module, p, i)}.{kind}"] = _as_conv(rows) if kind == "weight" else rows
    return out


def ai_hub_checkpoint(state: dict[str, torch.Tensor], heads: dict[str, int]) -> dict[str, torch.Tensor]:
    """ai-hub-models' SHA checkpoint: ``q_proj_sha.{i}`` per head, the Linear projections deleted."""
    return _heads_replacing_projections(state, heads, lambda module, p, i: ai_hub_name(module, PROJECTIONS[p], i))


def ai_hub_name(module: str, proj: str, head: int) -> str:
    return f"{module}.{dict(zip(PROJECTIONS, ('q_proj_sha', 'k_proj_sha', 'v_proj_sha')))[proj]}.{head}"


# --- encodings (format 1.0.0) ------------------------------------------------------------------------------------

def weight_encodings(state: dict[str, torch.Tensor], *, prefix: str = "") -> dict[str, Any]:
    """Per-channel symmetric 8-bit encodings of every weight of two or more dimensions, as AIMET computes them (scale
    = max |w| of the channel / 127), written by hand."""
    entries = []
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.dim() >= 2:
            peaks = tensor.reshape(tensor.shape[0], -1).abs().amax(dim=1).clamp_min(1e-8)
            entries.append({"name": prefix + key, "dtype": "INT", "enc_type": "PER_CHANNEL", "is_sym": True, "bw": 8,
                            "scale": [float(p) / 127 for p in peaks], "offset": [-128] * tensor.shape[0]})
    return {"version": "1.0.0", "activation_encodings": [], "param_encodings": entries, "quantizer_args": {},
            "excluded_layers": []}


def _head_entry(entry: dict, name: str, channels: slice | None) -> dict:
    head = copy.deepcopy(entry)
    head["name"] = name
    if channels is not None and entry["enc_type"] == "PER_CHANNEL":
        head["scale"], head["offset"] = entry["scale"][channels], entry["offset"][channels]
    return head


def sha_encodings(encodings: dict[str, Any], heads: dict[str, int], head_name, *, split: bool = True,
                  keep_mha: bool = False, prefix: str = "") -> dict[str, Any]:
    """SHA parameter encodings from MHA ones, by hand: ``head_name(module, proj, i)`` names head i's module; a
    per-channel entry is split into each head's channels (``split=False``: copied whole to every head, the reference
    note's defect); ``keep_mha``: the MHA entries stay too (its other defect)."""
    out = copy.deepcopy(encodings)
    entries = {e["name"]: e for e in encodings["param_encodings"]}
    params = []
    for entry in encodings["param_encodings"]:
        name = entry["name"][len(prefix):]
        module, _, rest = name.rpartition(".")[0].rpartition(".")
        if name.endswith(".weight") and rest in PROJECTIONS and module in heads:
            count = heads[module]
            rows = len(entry["scale"]) // count
            for i in range(count):
                channels = slice(i * rows, (i + 1) * rows) if split else None
                params.append(_head_entry(entries[entry["name"]], f"{prefix}{head_name(module, rest, i)}.weight",
                                          channels))
            if keep_mha:
                params.append(copy.deepcopy(entry))
        else:
            params.append(copy.deepcopy(entry))
    out["param_encodings"] = params
    return out


def mha2sha_checkpoint(state: dict[str, torch.Tensor], heads: dict[str, int], order: list[str]
                       ) -> dict[str, torch.Tensor]:
    """The QNN SDK's ``mha2sha`` names: attentions numbered in ``order`` (its pattern order, not module paths),
    ``attn_{n}_head_{i}_query.weight`` (and ``_key``, ``_value``), weights ``(head_dim, in, 1, 1)``, the MHA
    projections removed."""
    number = {module: n for n, module in enumerate(order)}
    words = ("query", "key", "value")
    return _heads_replacing_projections(state, heads, lambda module, p, i: f"attn_{number[module]}_head_{i}_{words[p]}")
