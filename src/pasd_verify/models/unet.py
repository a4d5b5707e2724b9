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
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D
from torch import nn

from ..errors import PasdVerifyError


def _flatten_pixels(residual: torch.Tensor) -> torch.Tensor:
    """``(b, c, h, w) -> (b, h*w, c)``: one key/value token per pixel."""
    return residual.flatten(2).transpose(1, 2)


def refuse_unsupported(model: nn.Module, arguments: dict[str, Any], features: dict[str, Any]) -> None:
    """PASD's forwards implement SD1.5's configuration: refuse any other forward argument given a value, and any
    of the config ``features`` that is set, naming them."""
    name = type(model).__name__
    given = sorted(k for k, v in arguments.items() if v is not None)
    if given:
        raise PasdVerifyError(f"{name}.forward does not support {', '.join(given)}")
    set_ = sorted(k for k, v in features.items() if v is not None)
    if set_:
        raise PasdVerifyError(f"{name}: config {', '.join(f'{k}={features[k]!r}' for k in set_)} is not supported "
                              "(PASD uses the SD1.5 configuration)")


def down_and_mid(model: nn.Module, sample: torch.Tensor, emb: torch.Tensor,
                 text: dict[str, Any]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The down blocks then the mid block, as diffusers' UNet and ControlNet forwards run them: returns the mid
    block's output and the skips (``sample`` first, then every down block's states). ``text`` goes to the blocks
    that have cross attention."""
    skips: tuple[torch.Tensor, ...] = (sample,)
    for block in model.down_blocks:
        extra = text if getattr(block, "has_cross_attention", False) else {}
        sample, res = block(hidden_states=sample, temb=emb, **extra)
        skips += res
    if model.mid_block is not None:
        extra = text if getattr(model.mid_block, "has_cross_attention", False) else {}
        sample = model.mid_block(sample, emb, **extra)
    return sample, skips


class _PixelAwareLayers:
    """The per-layer loop PASD gives both up-block kinds; the UNet passes each call's ControlNet residuals as the
    ``pixelwise_hidden_states`` argument, so that a trace sees them flow in."""

    def _check_plain(self) -> None:
        if getattr(self, "s1", None) is not None:
            raise PasdVerifyError(f"{type(self).__name__}: FreeU is not supported on PASD up blocks")

    def _pixel_attend(self, j: int, hidden_states: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        context = _flatten_pixels(states.pop())  # from the end, in lock-step with the skips
        return self.pixel_attentions[j](hidden_states, encoder_hidden_states=context, return_dict=False)[0]

    def _states(self, pixelwise_hidden_states: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        if pixelwise_hidden_states is None:
            raise PasdVerifyError(f"{type(self).__name__} was called without pixelwise_hidden_states")
        if len(pixelwise_hidden_states) != len(self.resnets):
            raise PasdVerifyError(f"{type(self).__name__} has {len(self.resnets)} layers, got "
                                  f"{len(pixelwise_hidden_states)} pixelwise_hidden_states")
        return list(pixelwise_hidden_states)


class PixelAwareUpBlock2D(_PixelAwareLayers, UpBlock2D):
    """``UpBlock2D`` + a pixel attention after each resnet."""

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None,
                pixelwise_hidden_states: Sequence[torch.Tensor] | None = None):
        self._check_plain()
        states = self._states(pixelwise_hidden_states)
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
                cross_attention_kwargs=None, upsample_size=None, attention_mask=None, encoder_attention_mask=None,
                pixelwise_hidden_states: Sequence[torch.Tensor] | None = None):
        self._check_plain()
        states = self._states(pixelwise_hidden_states)
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
    ``mid_block_additional_residual``), and hands the down residuals to the up blocks as their
    ``pixelwise_hidden_states`` argument too.
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

    # diffusers' from_config keeps the config keys that __init__'s signature names: ours takes the stock ones
    __init__.__signature__ = inspect.signature(UNet2DConditionModel.__init__)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, encoder_hidden_states: torch.Tensor,
                down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None, *,
                cross_attention_kwargs: dict[str, Any] | None = None, return_dict: bool = True, **unsupported: Any):
        """diffusers' UNet forward for the SD1.5 configuration PASD uses, with the ControlNet residuals also handed
        to each up block as its ``pixelwise_hidden_states`` argument (as PASD's own forward does)."""
        config = self.config
        refuse_unsupported(self, unsupported, {  # PASD's UNet is SD1.5's: none of diffusers' extra embeddings
            "class_embed_type": config.class_embed_type, "addition_embed_type": config.addition_embed_type,
            "encoder_hid_dim_type": config.encoder_hid_dim_type, "center_input_sample": config.center_input_sample or None})
        if down_block_additional_residuals is None or mid_block_additional_residual is None:
            raise PasdVerifyError(
                "PASDUNet2DConditionModel needs the ControlNet outputs: pass down_block_additional_residuals "
                "(they are also the pixel attentions' keys/values) and mid_block_additional_residual"
            )
        pixelwise = list(down_block_additional_residuals)
        expected = sum(len(block.resnets) for block in self.up_blocks)
        if len(pixelwise) != expected:
            raise PasdVerifyError(f"got {len(pixelwise)} ControlNet down residuals, the UNet has {expected} skips")
        # an upsampler must be told its output size when the latent is not a multiple of the overall up factor
        forward_upsample_size = any(dim % 2**self.num_upsamplers for dim in sample.shape[-2:])

        emb = self.time_embedding(self.get_time_embed(sample=sample, timestep=timestep), None)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        text = dict(encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)

        sample, skips = down_and_mid(self, self.conv_in(sample), emb, text)
        skips = tuple(skip + residual for skip, residual in zip(skips, down_block_additional_residuals))
        sample = sample + mid_block_additional_residual

        for i, block in enumerate(self.up_blocks):
            # each up block consumes, from the end, as many skips and residuals as it has layers
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            states, pixelwise = pixelwise[-n:], pixelwise[:-n]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            extra = text if getattr(block, "has_cross_attention", False) else {}
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size,
                           pixelwise_hidden_states=states, **extra)

        if self.conv_norm_out:
            sample = self.conv_act(self.conv_norm_out(sample))
        sample = self.conv_out(sample)
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)
