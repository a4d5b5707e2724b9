"""PASD's ControlNet on current diffusers: RGB side outputs and optional basicsr RRDB pre-processing.

The conditioning embedding gains, as in PASD (github.com/yangxy/PASD), ``preprocesser``: two basicsr
``RRDB(c0, c0)`` blocks after the first conv (``use_rrdb``), and ``to_rgbs``: after each stride-2 conv a 3x3 conv
to RGB (``return_rgbs``), giving images at H/2, H/4 and H/8. Forward returns PASD's
``(rgbs or None, down_residuals, mid_residual)``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn

from ..compat import rrdb_class
from ..ranges import check_image
from .unet import down_and_mid, refuse_unsupported

RRDB_BLOCKS = 2


class PASDConditioningEmbedding(ControlNetConditioningEmbedding):
    """diffusers' conditioning embedding plus PASD's RRDB pre-processing and RGB side outputs."""

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (16, 32, 96, 256), *, return_rgbs: bool = True,
                 use_rrdb: bool = False):
        super().__init__(conditioning_embedding_channels, conditioning_channels, block_out_channels)
        self.return_rgbs = return_rgbs
        self.use_rrdb = use_rrdb
        c0 = block_out_channels[0]
        if use_rrdb:
            rrdb = rrdb_class()
            self.preprocesser = nn.Sequential(*(rrdb(c0, c0) for _ in range(RRDB_BLOCKS)))
        self.to_rgbs = nn.ModuleList(
            nn.Conv2d(c, 3, kernel_size=3, padding=1) for c in block_out_channels[1:]
        ) if return_rgbs else nn.ModuleList()

    def forward(self, conditioning: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """``(embedding, rgbs or None)``: unlike diffusers' embedding, the RGB side outputs are returned."""
        embedding = F.silu(self.conv_in(conditioning))
        if self.use_rrdb:
            embedding = self.preprocesser(embedding)
        rgbs = []
        for i, block in enumerate(self.blocks):
            embedding = F.silu(block(embedding))
            if i % 2 and self.return_rgbs:  # after each stride-2 conv
                rgbs.append(self.to_rgbs[i // 2](embedding))
        return self.conv_out(embedding), rgbs if self.return_rgbs else None


class PASDControlNetModel(ControlNetModel):
    """diffusers' ``ControlNetModel`` with PASD's ``return_rgbs`` and ``use_rrdb`` options.

    ``forward`` checks the control image (NCHW, 3 channels, float in [0, 1], finite, sides multiples of 8) and
    returns ``(rgbs or None, down_residuals, mid_residual)`` as PASD's ControlNet does.
    """

    def __init__(self, *args: Any, return_rgbs: bool = True, use_rrdb: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.register_to_config(return_rgbs=return_rgbs, use_rrdb=use_rrdb)
        config = self.config
        self.controlnet_cond_embedding = PASDConditioningEmbedding(
            config.block_out_channels[0], config.conditioning_channels, config.conditioning_embedding_out_channels,
            return_rgbs=return_rgbs, use_rrdb=use_rrdb,
        ).to(self.conv_in.weight.device)

    # diffusers' from_config keeps the config keys that __init__'s signature names: the stock ones and PASD's two
    __init__.__signature__ = inspect.signature(ControlNetModel.__init__).replace(parameters=[
        *inspect.signature(ControlNetModel.__init__).parameters.values(),
        inspect.Parameter("return_rgbs", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool),
        inspect.Parameter("use_rrdb", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool),
    ])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0, *,
                cross_attention_kwargs: dict[str, Any] | None = None, guess_mode: bool = False,
                return_dict: bool = False, **unsupported: Any):
        """diffusers' ControlNet forward for the configuration PASD uses, with the conditioning embedding's RGB side
        outputs returned through the call: ``(rgbs or None, down_residuals, mid_residual)`` as PASD's ControlNet
        returns them (``return_dict`` is accepted and ignored: PASD's callers unpack the triple)."""
        check_image(controlnet_cond, "controlnet_cond", value_range=(0.0, 1.0))
        config = self.config
        refuse_unsupported(self, unsupported, {  # PASD's ControlNet is SD1.5's: no class or addition embeddings
            "class_embed_type": config.class_embed_type, "num_class_embeds": config.num_class_embeds,
            "addition_embed_type": config.addition_embed_type})
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        emb = self.time_embedding(_time_features(self, sample, timestep), None)
        text = dict(encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)

        embedding, rgbs = self.controlnet_cond_embedding(controlnet_cond)
        sample, skips = down_and_mid(self, self.conv_in(sample) + embedding, emb, text)

        down = [zero_conv(skip) for skip, zero_conv in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(sample)
        if guess_mode and not self.config.global_pool_conditions:  # diffusers' scales: 0.1 to 1.0, deepest last
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
        else:
            scales = [conditioning_scale] * (len(down) + 1)
        down = [residual * scale for residual, scale in zip(down, scales)]
        mid = mid * scales[-1]
        if self.config.global_pool_conditions:
            down = [torch.mean(residual, dim=(2, 3), keepdim=True) for residual in down]
            mid = torch.mean(mid, dim=(2, 3), keepdim=True)
        return rgbs, down, mid


def _time_features(model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
    """diffusers' sinusoidal timestep features, one row per sample, in the sample's dtype."""
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
    elif timesteps.ndim == 0:
        timesteps = timesteps[None].to(sample.device)
    return model.time_proj(timesteps.expand(sample.shape[0])).to(dtype=sample.dtype)
