"""Seeded model presets (no hub, no network); models from a user's local folders are in :mod:`pasd_verify.kinds.loading`.

``tiny`` runs a whole UNet forward in milliseconds on a CPU; ``sd15`` has Stable Diffusion 1.5's real
dimensions (320/640/1280/1280 channels, 8 heads, text 77 x 768) with random weights. The same two presets exist for
the other networks of a PASD app: the CLIP text encoder (with tokenizer files written here) and the VAE.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from .errors import PasdVerifyError
from .models import PASDControlNetModel, PASDUNet2DConditionModel
from .ranges import LATENT_FACTOR, TEXT_LENGTH

logger = logging.getLogger(__name__)

UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sample_size": 8,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 4),  # diffusers' misnomer: this is the number of heads
        "norm_num_groups": 8,
    },
    "sd15": {
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
}


# diffusers' AutoencoderKL: SD1.5's VAE (stabilityai/sd-vae-ft-mse and runwayml's vae/config.json have these
# values), and a tiny one with the same structure. Its one attention per mid block has a single head at SD1.5's
# width (attention_head_dim = the width) and a group norm before the projections.
VAE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {  # four blocks, as SD1.5's: the latent is the image / 8, PASD's LATENT_FACTOR
        "sample_size": 64,
        "block_out_channels": (8, 16, 32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
    },
    "sd15": {
        "sample_size": 512,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "latent_channels": 4,
        "scaling_factor": 0.18215,
    },
}

# transformers' CLIPTextModel: SD1.5's text encoder (openai/clip-vit-large-patch14's text tower, as runwayml's
# text_encoder/config.json gives it: 12 layers, width 768, 12 heads, 77 positions, quick-GELU), and a tiny one of the
# same structure. The token ids of the special tokens are the tokenizer's (see write_tokenizer), so that the
# pooled output finds the end of the prompt.
TEXT_ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "projection_dim": 32},
    "sd15": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "projection_dim": 768},
}
_TEXT_ENCODER_COMMON = {"max_position_embeddings": TEXT_LENGTH, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}

# The words the tokenizer's merges are learnt from: PASD's own prompts (its added prompt and negative prompt) and a
# few of a photo's, so that these prompts tokenize into words, not letters.
TOKENIZER_CORPUS = (
    "clean, high-resolution, 8k, best quality, masterpiece, extremely detailed, "
    "dotted, noise, blur, lowres, oversmooth, longbody, bad anatomy, bad hands, missing fingers, extra digit, "
    "fewer digits, cropped, worst quality, low quality, "
    "a photo of an astronaut, a cat, a coffee cup, a rocket, a camera man, a portrait, a landscape"
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's and CLIP's byte -> printable character table: the byte-level alphabet every vocabulary starts with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_merges(corpus: str, count: int) -> list[tuple[str, str]]:
    """Byte-pair encoding learnt from ``corpus`` as CLIP's was: words end in ``</w>``, the most frequent adjacent
    pair is merged first (ties by the pair itself, so the files are the same on every run)."""
    words = Counter(tuple(word[:-1]) + (word[-1] + "</w>",)
                    for word in corpus.lower().replace(",", " ").replace("-", " - ").split())
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


MERGES = 200


@functools.lru_cache(maxsize=1)
def _tokenizer_files() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The vocabulary and merges :func:`write_tokenizer` writes: CLIP's byte-level alphabet, each letter also ending
    a word, :data:`MERGES` merges learnt from :data:`TOKENIZER_CORPUS`, and the two special tokens last, as in
    CLIP's."""
    alphabet = list(_bytes_to_unicode().values())
    learnt = tuple(_learn_merges(TOKENIZER_CORPUS, MERGES))
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in learnt), BOS, EOS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, learnt


def write_tokenizer(folder: str | os.PathLike) -> Path:
    """Write the presets' CLIP tokenizer in SD1.5's ``tokenizer/`` layout (``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json``) into ``folder``, for ``CLIPTokenizer.from_pretrained``. It pads with the end token to
    77 tokens, as SD1.5's does. Returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, learnt = _tokenizer_files()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learnt))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": TEXT_LENGTH, "do_lower_case": True,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2))
    return folder


def build_text_encoder(preset: str = "tiny", *, seed: int = 0, **overrides: Any):
    """transformers' ``CLIPTextModel`` of the named preset (:data:`TEXT_ENCODER_PRESETS`), weights from
    ``torch.manual_seed(seed)``, its special tokens' ids those of :func:`write_tokenizer`'s vocabulary.
    ``overrides`` replace config entries; ``attn_implementation`` ("sdpa", the default, or "eager") chooses the
    attention transformers runs."""
    from transformers import CLIPTextConfig, CLIPTextModel

    _check_preset(preset)
    implementation = overrides.pop("attn_implementation", "sdpa")
    vocab, _ = _tokenizer_files()
    special = {"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]}
    config = CLIPTextConfig(**{**TEXT_ENCODER_PRESETS[preset], **_TEXT_ENCODER_COMMON, **special, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel._from_config(config, attn_implementation=implementation).eval()


def special_token_ids(config: Any) -> tuple[int, int]:
    """A CLIP text config's start and end token ids, where they lie in its vocabulary; else the vocabulary's last two
    ids, with a warning naming the keys. transformers' defaults (49406, 49407) are SD1.5's, so a small CLIP config
    saved without setting them names ids its embedding does not have; the model itself never looks them up (the
    end id only picks the pooled output, which Stable Diffusion does not use), only the seeded samples do."""
    vocab = config.vocab_size
    ids = {"bos_token_id": (config.bos_token_id, vocab - 2), "eos_token_id": (config.eos_token_id, vocab - 1)}
    outside = {key: given for key, (given, _) in ids.items()
               if not isinstance(given, int) or not 0 <= given < vocab}
    if outside:
        logger.warning("the text encoder's config.json: %s outside its vocab_size %d; its seeded token samples use "
                       "ids %d and %d as the start and end tokens instead", ", ".join(
                           f"{key} {value!r}" for key, value in outside.items()), vocab, vocab - 2, vocab - 1)
    return tuple(fallback if key in outside else given for key, (given, fallback) in ids.items())


def text_tokens(model: Any, *, batch: int = 1, seed: int = 0, length: int = TEXT_LENGTH,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Seeded token ids ``(batch, length)`` as a tokenizer lays them out: the start token, random tokens of the
    vocabulary's ordinary part, the end token, then end tokens as padding; int32, the phone's input type. Drawn from
    ``generator`` where given, else from ``seed``."""
    config = model.config
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    bos, eos = special_token_ids(config)
    ordinary = min(config.vocab_size, bos, eos)  # the special tokens come last
    ids = torch.full((batch, length), eos, dtype=torch.int32)
    for row in ids:
        words = int(torch.randint(1, length - 1, (1,), generator=g))
        row[0] = bos
        row[1:1 + words] = torch.randint(0, ordinary, (words,), generator=g, dtype=torch.int32)
    return ids


# PASD's ControlNet conditioning embedding widths: three stride-2 convs take the image to the latent size.
CONDITIONING_CHANNELS = {"tiny": (8, 8, 16, 16), "sd15": (16, 32, 96, 256)}
_CONTROLNET_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
                    "attention_head_dim", "norm_num_groups")


def _check_preset(preset: str) -> None:
    if preset not in UNET_PRESETS:
        raise PasdVerifyError(f"unknown preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")


def build_vae(preset: str = "tiny", *, seed: int = 0, **overrides: Any) -> AutoencoderKL:
    """diffusers' ``AutoencoderKL`` of the named preset (:data:`VAE_PRESETS`), weights from ``torch.manual_seed(seed)``."""
    _check_preset(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**{**VAE_PRESETS[preset], **overrides}).eval()


def vae_image(vae: AutoencoderKL, *, batch: int = 1, size: tuple[int, int] | None = None, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded image in [-1, 1], the VAE's input convention (PASD's ``2 * x - 1`` of a [0, 1] photo)."""
    height, width = size or (vae.config.sample_size, vae.config.sample_size)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, vae.config.in_channels, height, width, generator=g, dtype=dtype) * 2 - 1


def _randomize_zero_parameters(model: nn.Module) -> None:
    """Give zero-initialised weights (ControlNet's zero convs) small seeded values, so every path carries signal.

    A fresh ControlNet outputs exact zeros, which would make any test of what flows through it vacuous.
    """
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)


def build_unet(preset: str = "tiny", *, seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` of the named preset, with weights drawn from ``torch.manual_seed(seed)``;
    ``overrides`` replace config entries (``attention_head_dim=8``: more heads at the same width)."""
    _check_preset(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**{**UNET_PRESETS[preset], **overrides}).eval()


def build_pasd(preset: str = "tiny", *, seed: int = 0, use_rrdb: bool = True,
               return_rgbs: bool = True) -> tuple[PASDUNet2DConditionModel, PASDControlNetModel]:
    """PASD's UNet and ControlNet for the named preset, seeded; ``use_rrdb`` / ``return_rgbs`` as in PASD.

    The ControlNet mirrors the UNet's down path. Its zero convs get small seeded weights instead of zeros.
    """
    _check_preset(preset)
    config = UNET_PRESETS[preset]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = PASDUNet2DConditionModel(**config).eval()
        controlnet = PASDControlNetModel(
            **{k: config[k] for k in _CONTROLNET_KEYS}, conditioning_embedding_out_channels=CONDITIONING_CHANNELS[preset],
            return_rgbs=return_rgbs, use_rrdb=use_rrdb,
        ).eval()
        _randomize_zero_parameters(controlnet)
    return unet, controlnet


def pasd_inputs(unet: UNet2DConditionModel, *, batch: int = 1, latent: tuple[int, int] | None = None, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded PASD inputs: :func:`unet_inputs` plus a [0, 1] control image 8x the latent size."""
    inputs = unet_inputs(unet, batch=batch, latent=latent, seed=seed, dtype=dtype)
    height, width = inputs["sample"].shape[-2:]
    g = torch.Generator().manual_seed(seed + 1)
    inputs["controlnet_cond"] = torch.rand(batch, 3, height * LATENT_FACTOR, width * LATENT_FACTOR, generator=g,
                                           dtype=dtype)
    return inputs


def unet_inputs(unet: UNet2DConditionModel, *, batch: int = 2, latent: tuple[int, int] | None = None,
                seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded UNet inputs: latents, one timestep per sample, and a 77-token text embedding."""
    config = unet.config
    height, width = latent or (config.sample_size, config.sample_size)
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, config.in_channels, height, width, generator=g, dtype=dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT_LENGTH, config.cross_attention_dim, generator=g, dtype=dtype),
    }
