"""PASD's pixel-aware UNet on current diffusers.

PASD (github.com/yangxy/PASD) gives every up-block layer a pixel attention: a ``Transformer2DModel`` that, after
the layer's resnet (``UpBlock2D``) or text attention (``CrossAttnUpBlock2D``), attends from the hidden states to
the ControlNet down residual matching the skip that layer concatenates, flattened to ``(b, h*w, c)``. Parameter
names follow PASD's checkpoints (``up_blocks.{b}.pixel_attentions.{j}...``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D
from torch import nn

from ..errors import PasdVerifyError


def _flatten_pixels(residual: torch.Tensor) -> torch.Tensor:
    """``(b, c, h, w) -> (b, h*w, c)``: one key/value token per pixel."""
    return residual.flatten(2).transpose(1, 2)


class _PixelAwareLayers:
    """The per-layer loop PASD gives both up-block kinds; ``pixelwise_hidden_states`` is set by the UNet per call."""

    pixelwise_hidden_states: Sequence[torch.Tensor] | None = None

    def _check_plain(self) -> None:
        if getattr(self, "s1", None) is not None:
            raise PasdVerifyError(f"{type(self).__name__}: FreeU is not supported on PASD up blocks")

    def _pixel_attend(self, j: int, hidden_states: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        context = _flatten_pixels(states.pop())  # from the end, in lock-step with the skips
        return self.pixel_attentions[j](hidden_states, encoder_hidden_states=context, return_dict=False)[0]

    def _states(self) -> list[torch.Tensor]:
        if self.pixelwise_hidden_states is None:
            raise PasdVerifyError(f"{type(self).__name__} was called without pixelwise hidden states")
        return list(self.pixelwise_hidden_states)


class PixelAwareUpBlock2D(_PixelAwareLayers, UpBlock2D):
    """``UpBlock2D`` + a pixel attention after each resnet."""

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None, *args, **kwargs):
        self._check_plain()
        states = self._states()
        for j, resnet in enumerate(self.resnets):
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = resnet(hidden_states, temb)
            hidden_states = self._pixel_attend(j, hidden_states, states)
        for upsampler in self.upsamplers or ():
            hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


class PixelAwareCrossAttnUpBlock2D(_PixelAwareLayers, CrossAttnUpBlock2D):
    """``CrossAttnUpBlock2D`` + a pixel attention after each text attention."""

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                cross_attention_kwargs=None, upsample_size=None, attention_mask=None, encoder_attention_mask=None):
        self._check_plain()
        states = self._states()
        for j, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = resnet(hidden_states, temb)
            hidden_states = attn(
                hidden_states, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask, return_dict=False,
            )[0]
            hidden_states = self._pixel_attend(j, hidden_states, states)
        for upsampler in self.upsamplers or ():
            hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


_PIXEL_AWARE = {UpBlock2D: PixelAwareUpBlock2D, CrossAttnUpBlock2D: PixelAwareCrossAttnUpBlock2D}


class PASDUNet2DConditionModel(UNet2DConditionModel):
    """SD1.5's UNet with PASD's pixel attentions; the config is the stock UNet config, nothing added.

    Forward takes the ControlNet outputs as usual (``down_block_additional_residuals``, added to the skips, and
    ``mid_block_additional_residual``), and uses the down residuals as ``pixelwise_hidden_states`` too.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        config = self.config
        heads = config.num_attention_heads or config.attention_head_dim
        heads = list(reversed([heads] * len(config.down_block_types) if isinstance(heads, int) else list(heads)))
        layers = config.transformer_layers_per_block
        layers = list(reversed([layers] * len(config.down_block_types) if isinstance(layers, int) else list(layers)))
        reversed_channels = list(reversed(config.block_out_channels))
        for b, block in enumerate(self.up_blocks):
            if type(block) not in _PIXEL_AWARE:
                raise PasdVerifyError(f"up_blocks.{b}: PASD has no pixel-aware form of {type(block).__name__}")
            # Swap the class, not the module: every stock parameter keeps its name and value.
            block.__class__ = _PIXEL_AWARE[type(block)]
            out_channels = reversed_channels[b]
            skip_in = reversed_channels[min(b + 1, len(reversed_channels) - 1)]
            n = len(block.resnets)
            block.pixel_attentions = nn.ModuleList(
                Transformer2DModel(
                    heads[b], out_channels // heads[b], in_channels=out_channels,
                    num_layers=layers[b] if isinstance(layers[b], int) else layers[b][j],
                    # the residual this layer consumes: the block's input width for its last layer
                    cross_attention_dim=skip_in if j == n - 1 else out_channels,
                    norm_num_groups=config.norm_num_groups,
                    use_linear_projection=config.use_linear_projection,
                    only_cross_attention=False,
                    upcast_attention=config.upcast_attention,
                )
                for j in range(n)
            )

    @staticmethod
    def _get_init_keys(input_class):
        # from_config matches config keys against __init__'s signature; ours forwards the stock one's.
        if issubclass(input_class, UNet2DConditionModel):
            return set(inspect.signature(UNet2DConditionModel.__init__).parameters)
        return set(inspect.signature(input_class.__init__).parameters)

    def forward(self, sample, timestep, encoder_hidden_states, *args,
                down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None, **kwargs):
        if down_block_additional_residuals is None:
            raise PasdVerifyError(
                "PASDUNet2DConditionModel needs the ControlNet outputs: pass down_block_additional_residuals "
                "(they are also the pixel attentions' keys/values) and mid_block_additional_residual"
            )
        residuals = list(down_block_additional_residuals)
        expected = sum(len(block.resnets) for block in self.up_blocks)
        if len(residuals) != expected:
            raise PasdVerifyError(
                f"got {len(residuals)} ControlNet down residuals, the UNet has {expected} skips"
            )
        # Each up block consumes, from the end, as many residuals as it has layers, in lock-step with the skips.
        for block in self.up_blocks:
            n = len(block.resnets)
            block.pixelwise_hidden_states, residuals = residuals[-n:], residuals[:-n]
        try:
            return super().forward(
                sample, timestep, encoder_hidden_states, *args,
                down_block_additional_residuals=down_block_additional_residuals,
                mid_block_additional_residual=mid_block_additional_residual, **kwargs,
            )
        finally:
            for block in self.up_blocks:
                block.pixelwise_hidden_states = None
