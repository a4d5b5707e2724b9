"""Models as graphs with plain, named tensor inputs and outputs: what ONNX export, AIMET and the HTP see.

diffusers' models take keyword arguments, lists of residuals and return dataclasses; an exported graph needs flat
tensors with stable names. Each wrapper here fixes the names and the order:

- UNet: ``sample, timestep, encoder_hidden_states -> noise``;
- PASD UNet: the same plus ``down_residual_{i}`` (one per skip, 12 for SD1.5) and ``mid_residual``;
- PASD ControlNet: ``sample, timestep, encoder_hidden_states, control_image -> rgb_{i}..., down_residual_{i}...,
  mid_residual``.

The timestep is a float ``(batch,)`` input and its sinusoidal embedding is computed in the graph (Sin/Cos on a
constant frequency table): the scheduler hands the model a timestep, the HTP takes Sin and Cos, and a graph fed a
precomputed embedding would move part of the model into every caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..models import PASDControlNetModel, PASDUNet2DConditionModel
from ..quant.calibration import CONTROL_KEY, Sample


@dataclass
class ExportGraph:
    """A module with a flat tensor signature, its input and output names, and example inputs in that order."""

    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    kind: str

    def feeds(self, sample: Sample, controlnet: PASDControlNetModel | None = None) -> dict[str, torch.Tensor]:
        """The graph's inputs for one calibration sample (see :mod:`pasd_verify.quant.calibration`)."""
        feeds = {"sample": sample["latent"], "timestep": sample["timestep"].float().reshape(-1).expand(
            sample["latent"].shape[0]).contiguous(), "encoder_hidden_states": sample["encoder_hidden_states"]}
        if self.kind == "pasd-controlnet":
            feeds["control_image"] = sample[CONTROL_KEY]
        elif self.kind == "pasd-unet":
            if controlnet is None:
                raise ValueError("a PASD UNet graph's residual inputs come from its ControlNet; pass controlnet")
            with torch.no_grad():
                _, down, mid = controlnet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"],
                                          sample[CONTROL_KEY])
            feeds.update({f"down_residual_{i}": r for i, r in enumerate(down)})
            feeds["mid_residual"] = mid
        return feeds

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            outputs = self.module(*(feeds[name] for name in self.input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(self.output_names, outputs))


class _UNetGraph(nn.Module):
    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _PASDUNetGraph(nn.Module):
    def __init__(self, unet: PASDUNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        *down, mid = residuals
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


class _PASDControlNetGraph(nn.Module):
    def __init__(self, controlnet: PASDControlNetModel):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, control_image):
        rgbs, down, mid = self.controlnet(sample, timestep, encoder_hidden_states, control_image)
        return (*(rgbs or ()), *down, mid)


BASE_INPUTS = ["sample", "timestep", "encoder_hidden_states"]


def skip_count(unet: UNet2DConditionModel) -> int:
    """How many down residuals a UNet's up path consumes (12 for SD1.5)."""
    return sum(len(block.resnets) for block in unet.up_blocks)


def export_graph(model: nn.Module) -> ExportGraph:
    """The flat-signature wrapper for a UNet, PASD UNet or PASD ControlNet."""
    if isinstance(model, PASDControlNetModel):
        rgbs = len(model.controlnet_cond_embedding.to_rgbs)
        skips = len(model.controlnet_down_blocks)
        outputs = [f"rgb_{i}" for i in range(rgbs)] + [f"down_residual_{i}" for i in range(skips)] + ["mid_residual"]
        return ExportGraph(_PASDControlNetGraph(model).eval(), BASE_INPUTS + ["control_image"], outputs,
                           "pasd-controlnet")
    if isinstance(model, PASDUNet2DConditionModel):
        residuals = [f"down_residual_{i}" for i in range(skip_count(model))] + ["mid_residual"]
        return ExportGraph(_PASDUNetGraph(model).eval(), BASE_INPUTS + residuals, ["noise"], "pasd-unet")
    if isinstance(model, UNet2DConditionModel):
        return ExportGraph(_UNetGraph(model).eval(), list(BASE_INPUTS), ["noise"], "unet")
    raise TypeError(f"cannot export {type(model).__name__}: expected a UNet, PASD UNet or PASD ControlNet")
