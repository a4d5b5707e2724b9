"""The pipeline exports its own networks, calibrated as Qualcomm's recipe calibrates them: on the fp32 pipeline's
own run (the text encoder on the prompts, the VAE encoder on the photo, the ControlNet and UNet on every step's
inputs, both guidance halves, the VAE decoder on the final latent), in SHA form (what ships), at this photo's
working size, through :func:`pasd_verify.export.pipeline.export_files` (float ONNX, aimet-onnx W8A16, QDQ graph,
HTP context binary, every step checked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..models.vae import split_vae
from .networks import KIND_OF, Components, sha_copy
from .pasd import PASDOutput, tokenize


def calibration_samples(network: str, components: Components, reference: PASDOutput, image: torch.Tensor,
                        prompts: tuple[str, str]) -> list[dict[str, torch.Tensor]]:
    """``network``'s inputs in the fp32 run, one batch-1 sample per call (:mod:`pasd_verify.quant.calibration`)."""
    trace = reference.trace
    if network == "text_encoder":
        return [{"input_ids": tokenize(components.tokenizer, p)} for p in prompts]
    if network == "vae_encoder":
        return [{"image": image * 2 - 1}]
    if network == "vae_decoder":
        return [{"latent": reference.latents}]
    return [{"latent": trace.model_inputs[i], "timestep": torch.tensor([t]),
             "encoder_hidden_states": trace.embeddings[half:half + 1], "control_image": image}
            for i, t in enumerate(trace.timesteps) for half in (0, 1)]


def _sha_network(network: str, components: Components) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """``network`` in SHA form and, where its kind is calibrated on a partner's outputs (the registry says: the PASD
    UNet on its ControlNet's residuals), the partner in SHA form too."""
    from ..kinds import get_kind

    if network in ("vae_encoder", "vae_decoder"):
        return split_vae(sha_copy(components.vae))[0 if network == "vae_encoder" else 1], None
    partner = get_kind(KIND_OF[network]).partner
    network_of = {kind: name for name, kind in KIND_OF.items()}
    return (sha_copy(getattr(components, network)),
            sha_copy(getattr(components, network_of[partner])) if partner else None)


def export_networks(networks: list[str], components: Components, reference: PASDOutput, image: torch.Tensor,
                    prompts: tuple[str, str], export_dir: Path, *, seed: int = 0,
                    rewrites: dict[str, tuple[str, ...]] | None = None, release_models: bool = False,
                    progress: Callable[[str], Any] | None = None) -> dict[str, dict[str, Any]]:
    """Export each of ``networks`` into ``export_dir/<network>`` calibrated on the fp32 run, with the default export
    rewrites unless ``rewrites`` names a network's own; returns each export's report (its ``passed`` says whether
    every export step agreed). ``release_models`` frees each SHA copy's weights once its float graph is written
    (:class:`~pasd_verify.export.pipeline.ExportConfig`: at SD1.5 size, memory the later stages need)."""
    from ..export.pipeline import ExportConfig, export_files
    from ..export.rewrites import REWRITES

    reports = {}
    for network in networks:
        if progress:
            progress(f"exporting {network} (SHA, W8A16, calibrated on the fp32 run)")
        model, partner = _sha_network(network, components)
        samples = calibration_samples(network, components, reference, image, prompts)
        # localization of a disagreement is left to the pipeline check, which names the network and step first
        config = ExportConfig(seed=seed, localize=False, rewrites=(rewrites or {}).get(network, REWRITES),
                              release_model=release_models)
        reports[network] = export_files(model, export_dir / network, config,
                                        partner=partner,
                                        samples=samples, source={"pipeline": "calibrated on the fp32 run",
                                                                 "network": network, "samples": len(samples)})
        del model, partner
    return reports


__all__ = ["calibration_samples", "export_networks"]
