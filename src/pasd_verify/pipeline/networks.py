"""The five networks of a PASD app, each on a backend of its own, behind the call its torch model has.

``fp32`` is the torch model as loaded (MHA: the reference); ``sha`` the same model rewritten to single-head
attention; ``qdq`` the exported W8A16 QDQ graph on onnxruntime's CPU; ``htp`` the exported context binary on
Qualcomm's HTP backend. A graph backend answers with the torch model's own call (``text_encoder(ids)[0]``, the
ControlNet's ``(rgbs, down, mid)``, ``vae.encode(x).latent_dist``...), so :class:`~.pasd.PASDPipeline` runs any mix
unchanged. Exported graphs are batch 1 at one size: a batch is run row by row, a different size is refused.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from torch import nn

from ..errors import PasdVerifyError
from ..models.vae import split_vae
from ..sha import convert_to_sha

# the order a PASD run calls them in
NETWORKS = ("text_encoder", "vae_encoder", "controlnet", "unet", "vae_decoder")
KIND_OF = {"text_encoder": "text-encoder", "vae_encoder": "vae-encoder", "controlnet": "pasd-controlnet",
           "unet": "pasd-unet", "vae_decoder": "vae-decoder"}
BACKENDS = ("fp32", "sha", "qdq", "htp")
TORCH_BACKENDS = ("fp32", "sha")
GRAPH_FILES = {"qdq": "model.qdq.onnx", "htp": "model_ctx.onnx"}


class BackendError(PasdVerifyError):
    """A network cannot run on the backend asked for (a missing export, a graph of another size)."""


@dataclass(frozen=True)
class Components:
    """A PASD run's fp32 torch components (diffusers' and transformers' models) and its scheduler's config."""

    text_encoder: nn.Module
    tokenizer: Any
    vae: nn.Module
    unet: nn.Module
    controlnet: nn.Module
    scheduler_config: dict


def preset_components(preset: str = "tiny", *, seed: int = 0) -> Components:
    """The five networks of the named preset with seeded weights (:mod:`pasd_verify.presets`), the presets'
    tokenizer and SD1.5's scheduler config."""
    import tempfile

    from transformers import CLIPTokenizer

    from ..presets import build_pasd, build_text_encoder, build_vae, write_tokenizer
    from .pasd import SD15_SCHEDULER_CONFIG

    unet, controlnet = build_pasd(preset, seed=seed)
    with tempfile.TemporaryDirectory(prefix="pasd-verify-tokenizer-") as folder:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder))
    return Components(build_text_encoder(preset, seed=seed), tokenizer, build_vae(preset, seed=seed), unet,
                      controlnet, dict(SD15_SCHEDULER_CONFIG))


def parse_backends(items: list[str] | None) -> dict[str, str]:
    """``["unet=htp", "vae_decoder=qdq"]`` -> every network's backend (``fp32`` where not named); ``all=B`` sets
    every network at once, later items override earlier ones."""
    backends = dict.fromkeys(NETWORKS, "fp32")
    for item in items or ():
        network, sep, backend = item.partition("=")
        if not sep or backend not in BACKENDS or network not in (*NETWORKS, "all"):
            raise BackendError(f"--backend {item!r}: expected NET=BACKEND with NET one of {', '.join(NETWORKS)} or "
                               f"all, and BACKEND one of {', '.join(BACKENDS)}")
        backends.update(dict.fromkeys(NETWORKS if network == "all" else (network,), backend))
    return backends


def sha_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every attention in single-head form (the original is untouched)."""
    converted = copy.deepcopy(model)
    convert_to_sha(converted)
    return converted


def expected_shapes(network: str, latent: tuple[int, int], channels: int = 4) -> dict[str, tuple[int, ...]]:
    """The graph input shapes a run at ``latent`` (h, w) feeds ``network`` (batch 1: a batch runs row by row)."""
    h, w = latent
    image = (1, 3, h * 8, w * 8)
    return {"text_encoder": {}, "vae_encoder": {"image": image}, "vae_decoder": {"latent": (1, channels, h, w)},
            "controlnet": {"sample": (1, channels, h, w), "control_image": image},
            "unet": {"sample": (1, channels, h, w)}}[network]


def graph_names(network: str, components: Components) -> tuple[list[str], list[str]]:
    """The input and output names of ``network``'s exported graph, as the registry's kind defines them for the
    run's own model (a UNet's residual inputs depend on its blocks)."""
    from ..kinds import get_kind

    if network in ("vae_encoder", "vae_decoder"):
        model = split_vae(components.vae)[0 if network == "vae_encoder" else 1]
    else:
        model = getattr(components, network)
    kind = get_kind(KIND_OF[network])
    return list(kind.inputs(model)), list(kind.outputs(model))


def _readable_file(path: Path, network: str, backend: str, what: str) -> None:
    if not path.is_file():
        raise BackendError(f"{network} on {backend}: {path} does not exist; export {network} with "
                           f"`pasd-verify export` into {path.parent}, or leave out --export-dir and the pipeline "
                           f"exports it")
    if path.stat().st_size == 0:
        raise BackendError(f"{network} on {backend}: {path} is empty; expected {what}")


def _context_files(graph: Any, path: Path, network: str) -> None:
    """Each context binary an EPContext node of the context model ``path`` names (``embed_mode`` 0: a file beside
    it) exists and is not empty."""
    for node in graph.node:
        if node.op_type != "EPContext":
            continue
        attributes = {a.name: a for a in node.attribute}
        if "embed_mode" in attributes and attributes["embed_mode"].i == 0:
            name = attributes["ep_cache_context"].s.decode("utf-8", "replace") if "ep_cache_context" in attributes \
                else ""
            _readable_file(path.parent / name, network, "htp", f"the HTP context binary {path.name} names")


def check_exports(backends: dict[str, str], export_dir: str | os.PathLike | None, latent: tuple[int, int],
                  channels: int = 4, *, components: Components | None = None) -> None:
    """Before any work: every network on a graph backend has its graph in ``export_dir/<network>``, compiled for
    this run's size, with the inputs and outputs of that network (given ``components``: a ControlNet's graph in the
    UNet's place is refused here, not met as a missing feed mid-run); an HTP context model's binary exists, is not
    empty, and loads on the HTP backend (a broken binary is the input's fault, not an accuracy failure to report).
    An error names the file, the input and what was expected and found."""
    import onnx

    for network, backend in backends.items():
        if backend in TORCH_BACKENDS or export_dir is None:
            continue
        path = Path(export_dir) / network / GRAPH_FILES[backend]
        _readable_file(path, network, backend, "an ONNX graph")
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as e:  # onnx raises DecodeError and others for a file that is not a model
            raise BackendError(f"{path}: not a readable ONNX graph: {e}") from None
        initializers = {t.name for t in graph.initializer}
        shapes = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in graph.input
                  if i.name not in initializers}
        for name, shape in expected_shapes(network, latent, channels).items():
            if name not in shapes:
                if components is not None:
                    break  # named below, with every input expected and found
                raise BackendError(f"{path}: no input {name!r}; is it an export of {network}? inputs: {sorted(shapes)}")
            if shapes[name] != shape:
                raise BackendError(f"{path}: {name} was compiled as {list(shapes[name])}, this photo's working size "
                                   f"needs {list(shape)} (graphs run at one size: export at this size, or give a "
                                   "photo of the compiled size)")
        if components is not None:
            inputs, outputs = graph_names(network, components)
            found_outputs = [o.name for o in graph.output]
            if set(shapes) != set(inputs) or set(found_outputs) != set(outputs):
                raise BackendError(
                    f"{path}: not an export of this run's {network}: its graph takes {sorted(shapes)} and gives "
                    f"{sorted(found_outputs)}; {network} takes {sorted(inputs)} and gives {sorted(outputs)} (is "
                    f"another network's export in {path.parent}?)")
        if backend == "htp":
            _context_files(graph, path, network)
            _load_on_htp(path, network)


def _load_on_htp(path: Path, network: str) -> None:
    """The context model loads on the HTP backend (:func:`~pasd_verify.export.htp.context_load_error`): a broken one
    is named as the file it is, not as the network's death in the middle of the check."""
    from ..export.htp import context_load_error

    why = context_load_error(path)
    if why is not None:
        raise BackendError(f"{network} on htp: {path} (and the context binary it names) cannot be loaded on the "
                           f"HTP backend: {why}; export {network} again")


# --- exported graphs ------------------------------------------------------------------------------------------

class GraphRunner:
    """One exported graph on the CPU (``qdq``) or the HTP (``htp``): named numpy feeds in, named outputs out."""

    def __init__(self, network: str, backend: str, folder: str | os.PathLike):
        path = Path(folder) / GRAPH_FILES[backend]
        if not path.is_file():
            raise BackendError(f"{network} on {backend}: {path} does not exist; export {network} with "
                               f"`pasd-verify export` into {folder}, or let the pipeline export it")
        self.network, self.backend, self.path = network, backend, path
        if backend == "htp":
            from ..export.htp import HtpSession

            self._session = HtpSession(path)
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            # the graph as written, as the export checked it (no fusing of its QDQ pairs into integer kernels)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: tuple(i.shape) for i in self._session.get_inputs()}
        self.outputs = [o.name for o in self._session.get_outputs()]
        self.calls, self.seconds = 0, 0.0
        self.captured: list[dict[str, np.ndarray]] | None = None  # a list: every call's feeds are kept in it

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, shape in self.inputs.items():
            if tuple(feeds[name].shape) != shape:
                raise BackendError(f"{self.network} on {self.backend}: {self.path} was compiled for {name} of shape "
                                   f"{list(shape)}, this run feeds {list(feeds[name].shape)} (graphs run at one "
                                   "size; export at this photo's working size)")
        feeds = {k: feeds[k] for k in self.inputs}
        if self.captured is not None:
            self.captured.append(feeds)
        started = time.perf_counter()
        outputs = self._session.run(self.outputs, feeds)
        self.calls += 1
        self.seconds += time.perf_counter() - started
        return dict(zip(self.outputs, outputs))

    def figures(self) -> dict[str, Any]:
        """Calls and seconds spent in them (an HTP child's own load time and peak memory too)."""
        figures = {"graph": str(self.path), "calls": self.calls, "seconds": self.seconds}
        for name in ("load_seconds", "peak_rss_bytes"):
            if hasattr(self._session, name):
                figures[name] = getattr(self._session, name)
        return figures

    def close(self) -> None:
        close = getattr(self._session, "close", None)
        if close is not None:
            close()


def _rows(tensor: torch.Tensor) -> list[np.ndarray]:
    return [row[None].detach().float().numpy() for row in tensor]


def _timestep_rows(t: torch.Tensor | float, batch: int) -> list[np.ndarray]:
    steps = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(batch)
    return [np.array([float(s)], dtype=np.float32) for s in steps]


class _GraphModule(nn.Module):
    """A graph in the pipeline's place: the torch model's config (the pipeline reads it) and the model's call."""

    def __init__(self, runner: GraphRunner, config: Any):
        super().__init__()
        self.runner, self.config = runner, config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


class TextEncoderGraph(_GraphModule):
    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        rows = [self.runner({"input_ids": row.astype(np.int32)})["last_hidden_state"]
                for row in (r[None].numpy() for r in input_ids)]
        return (torch.from_numpy(np.concatenate(rows)),)


class ControlNetGraph(_GraphModule):
    """The exported ControlNet runs at conditioning scale 1; the scale multiplies its residuals here, as
    diffusers' forward does after the zero convs (exactly linear)."""

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                return_dict=False, **kwargs):
        outputs = [self.runner({"sample": s, "timestep": t, "encoder_hidden_states": e, "control_image": c})
                   for s, t, e, c in zip(_rows(sample), _timestep_rows(timestep, sample.shape[0]),
                                         _rows(encoder_hidden_states), _rows(controlnet_cond))]
        joined = {name: torch.from_numpy(np.concatenate([o[name] for o in outputs])) for name in outputs[0]}
        rgbs = [joined[n] for n in self.runner.outputs if n.startswith("rgb")] or None
        down = [joined[n] * conditioning_scale for n in self.runner.outputs if n.startswith("down_residual_")]
        return rgbs, down, joined["mid_residual"] * conditioning_scale


class UNetGraph(_GraphModule):
    def forward(self, sample, timestep, encoder_hidden_states, down_block_additional_residuals=(),
                mid_block_additional_residual=None, return_dict=False, **kwargs):
        residuals = [*down_block_additional_residuals, mid_block_additional_residual]
        names = [*(f"down_residual_{i}" for i in range(len(residuals) - 1)), "mid_residual"]
        rows = []
        for i, (s, t, e) in enumerate(zip(_rows(sample), _timestep_rows(timestep, sample.shape[0]),
                                          _rows(encoder_hidden_states))):
            feeds = {"sample": s, "timestep": t, "encoder_hidden_states": e,
                     **{n: r[i:i + 1].float().numpy() for n, r in zip(names, residuals)}}
            rows.append(self.runner(feeds)["noise"])
        return (torch.from_numpy(np.concatenate(rows)),)


class SplitVAE(nn.Module):
    """``AutoencoderKL``'s ``encode`` / ``decode`` from its two networks, either on any backend: ``encode`` gives
    diffusers' own ``DiagonalGaussianDistribution`` of the encoder's mean and log-variance; the decoder network
    takes the scaled latent (the phone's graph boundary), so ``decode(z)`` feeds it ``z * scaling_factor``."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, config: Any):
        super().__init__()
        self.encoder_network, self.decoder_network, self.config = encoder, decoder, config

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        mean, logvar = self.encoder_network(x)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)))

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        image = self.decoder_network(z * self.config.scaling_factor)
        return DecoderOutput(sample=image) if return_dict else (image,)


class VAEHalfGraph(_GraphModule):
    def forward(self, x: torch.Tensor):
        name = next(iter(self.runner.inputs))
        rows = [self.runner({name: row}) for row in _rows(x)]
        outputs = [torch.from_numpy(np.concatenate([r[name] for r in rows])) for name in self.runner.outputs]
        return tuple(outputs) if len(outputs) > 1 else outputs[0]


_GRAPH_MODULES = {"text_encoder": TextEncoderGraph, "controlnet": ControlNetGraph, "unet": UNetGraph,
                  "vae_encoder": VAEHalfGraph, "vae_decoder": VAEHalfGraph}


def network_module(network: str, backend: str, components: Components, *, export_dir: str | os.PathLike | None = None,
                   runners: dict[str, GraphRunner] | None = None) -> nn.Module:
    """``network`` on ``backend``, as a module with the call the pipeline makes. A graph backend's runner is kept in
    ``runners`` under ``"network=backend"`` and reused from there: one HTP child per network for every pipeline
    built with the same ``runners`` (the caller closes them)."""
    if backend in TORCH_BACKENDS:
        if network in ("vae_encoder", "vae_decoder"):
            model = split_vae(components.vae)[0 if network == "vae_encoder" else 1]
        else:
            model = getattr(components, network)
        return sha_copy(model) if backend == "sha" else model
    if export_dir is None:
        raise BackendError(f"{network} on {backend} needs its export: give --export-dir")
    runners = {} if runners is None else runners
    key = f"{network}={backend}"
    if key not in runners:
        runners[key] = GraphRunner(network, backend, Path(export_dir) / network)
    config = components.vae.config if network.startswith("vae") else getattr(components, network).config
    return _GRAPH_MODULES[network](runners[key], config)


def pipeline_components(backends: dict[str, str], components: Components, *,
                        export_dir: str | os.PathLike | None = None,
                        runners: dict[str, GraphRunner] | None = None) -> dict[str, nn.Module]:
    """The pipeline's ``text_encoder``, ``vae``, ``controlnet`` and ``unet`` for a choice of backends. With both
    VAE halves on ``fp32`` the VAE is diffusers' ``AutoencoderKL`` itself (no re-association of its scaling)."""
    whole_vae = backends["vae_encoder"] == backends["vae_decoder"] == "fp32"
    modules = {n: network_module(n, b, components, export_dir=export_dir, runners=runners)
               for n, b in backends.items() if not (whole_vae and n.startswith("vae"))}
    if whole_vae:
        return {**modules, "vae": components.vae}
    vae = SplitVAE(modules.pop("vae_encoder"), modules.pop("vae_decoder"), components.vae.config)
    return {**modules, "vae": vae}
