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
        self.rgbs: list[torch.Tensor] | None = None

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        embedding = F.silu(self.conv_in(conditioning))
        if self.use_rrdb:
            embedding = self.preprocesser(embedding)
        rgbs = []
        for i, block in enumerate(self.blocks):
            embedding = F.silu(block(embedding))
            if i % 2 and self.return_rgbs:  # after each stride-2 conv
                rgbs.append(self.to_rgbs[i // 2](embedding))
        # diffusers' ControlNet forward takes only the embedding from this module; the RGBs wait here for
        # PASDControlNetModel.forward to collect them in the same call.
        self.rgbs = rgbs if self.return_rgbs else None
        return self.conv_out(embedding)


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

    @staticmethod
    def _get_init_keys(input_class):
        # from_config matches config keys against __init__'s signature; ours adds two to the stock one's.
        if issubclass(input_class, PASDControlNetModel):
            return set(inspect.signature(ControlNetModel.__init__).parameters) | {"return_rgbs", "use_rrdb"}
        return set(inspect.signature(input_class.__init__).parameters)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0, **kwargs: Any):
        check_image(controlnet_cond, "controlnet_cond", value_range=(0.0, 1.0))
        kwargs.pop("return_dict", None)
        down, mid = super().forward(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    conditioning_scale=conditioning_scale, return_dict=False, **kwargs)
        rgbs, self.controlnet_cond_embedding.rgbs = self.controlnet_cond_embedding.rgbs, None
        return rgbs, list(down), mid
