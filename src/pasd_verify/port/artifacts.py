"""A port's files (:class:`PortArtifacts`), read up front (:class:`Port`), and what a law on them finds
(:class:`LawResult`, :class:`Failure`).

:class:`Port` reads every file a user named before any law runs, so that an unreadable one is an error naming it, not
a law's failure; what the laws derive from the files (state dicts, models, the head names) is computed once, when a
law first needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint_files import checkpoint_shapes, load_state_dict_file
from ..encodings import _entries, detect_prefix, load_encodings_layout
from ..errors import PasdVerifyError
from ..export.htp import context_load_error
from ..kinds import get_kind, kind_of, networks_of
from ..kinds.loading import build_model, choose_model, find_weights, load_config, load_model, parameter_shapes
from ..sha import convert_to_sha
from . import SEEDS
from .names import HeadNames, infer_head_names, load_head_names


@dataclass(frozen=True)
class PortArtifacts:
    """The files of a port, any subset. ``model``: a model folder (``config.json``, and its weights unless ``mha``
    names them) or a ``config.json``; ``kind``: which network of a folder that holds two (a VAE); ``names``: a names
    file (our MHA name -> the port's head names); ``partner``: the ControlNet folder whose outputs a PASD UNet takes;
    ``qdq``: the quantized graph (QDQ ONNX) of the model; ``context``: its compiled HTP context model (``_ctx.onnx``,
    beside its ``.bin``)."""

    model: Path | None = None
    kind: str | None = None
    mha: Path | None = None
    sha: Path | None = None
    mha_encodings: Path | None = None
    sha_encodings: Path | None = None
    names: Path | None = None
    partner: Path | None = None
    onnx: Path | None = None
    onnx_encodings: Path | None = None
    qdq: Path | None = None
    context: Path | None = None

    @classmethod
    def of(cls, **values: Any) -> PortArtifacts:
        """From strings or paths (None and empty strings are absent)."""
        paths = {f.name for f in fields(cls)} - {"kind"}
        unknown = set(values) - paths - {"kind"}
        if unknown:
            raise PasdVerifyError(f"unknown port artifact(s) {sorted(unknown)}; known: {sorted(paths | {'kind'})}")
        return cls(**{k: (Path(v) if k in paths else v) for k, v in values.items() if v not in (None, "")})

    def given(self) -> set[str]:
        return {f.name for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Failure:
    """One way a law does not hold: the key (the port's name for it) and what is wrong."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class Unchecked(Exception):
    """Raised by a law that cannot be checked on this port, saying why."""


@dataclass
class LawResult:
    """One law on one port: ``status`` is passed, failed or unchecked (``reason`` says why)."""

    law: str
    says: str
    artifacts: list[str]
    status: str
    failures: list[Failure] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"law": self.law, "says": self.says, "artifacts": self.artifacts, "status": self.status,
                "failures": [{"key": f.key, "message": f.message} for f in self.failures],
                "figures": self.figures, "reason": self.reason, "seconds": round(self.seconds, 3)}


def _file(path: Path, what: str) -> Path:
    if not path.exists():
        raise PasdVerifyError(f"{path}: no such {what}")
    return path


class Port:
    """A port's artifacts, read and checked for readability (raising :class:`PasdVerifyError` naming the file), and
    what the laws derive from them, each computed once when a law first needs it."""

    def __init__(self, artifacts: PortArtifacts, *, seed: int = 0, samples: int = 2):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed not in SEEDS:
            raise PasdVerifyError(f"seed {seed!r}: the seed of the inputs is a whole number from 0 to {SEEDS[-1]}")
        self.artifacts, self.seed, self.samples = artifacts, seed, samples
        self._latents: dict[str, tuple[int, int] | None] = {}
        a = artifacts
        if a.kind is not None:
            get_kind(a.kind)
        self.mha_path = a.mha
        if self.mha_path is None and a.model is not None and Path(a.model).is_dir():
            try:
                self.mha_path = find_weights(a.model)
            except PasdVerifyError:
                pass
        self.mha_shapes_file = checkpoint_shapes(_file(self.mha_path, "checkpoint")) if self.mha_path else None
        self.sha_shapes_file = checkpoint_shapes(_file(a.sha, "checkpoint")) if a.sha else None
        # each encodings file read in whatever layout it came (AIMET's 0.6.1 or 1.0.0, or AdaRound's unversioned one);
        # the layout read is reported with the laws' figures
        self.encodings_layouts: dict[str, str] = {}
        for name in ("mha_encodings", "sha_encodings", "onnx_encodings"):
            path = getattr(a, name)
            encodings = None
            if path:
                encodings, self.encodings_layouts[name] = load_encodings_layout(_file(path, "encodings file"))
            setattr(self, name, encodings)
        graphs = {path: _load_onnx(path) for path in (a.onnx, a.qdq, a.context) if path is not None}
        self.onnx_graph = graphs.get(a.onnx)
        if a.context is not None:
            _context_binaries(a.context, graphs[a.context])
            why = context_load_error(a.context)
            if why is not None:
                raise PasdVerifyError(f"{a.context} (and the context binary it names) cannot be loaded on the HTP "
                                      f"backend: {why}; compile the QDQ graph again")
        if a.model is not None:
            load_config(_file(a.model, "model folder or config"))
            self.choice = _choose_model(a.model, self.mha_shapes_file)
            meta = build_model(a.model, self.choice, device="meta")
            nets = _networks(a.model, meta, a.kind)
            for path, graph in graphs.items():
                _graph_takes_inputs_of(path, graph, nets)
            self.mha_model_shapes = self.choice.file_shapes(parameter_shapes(meta))
            self.name_map = convert_to_sha(meta).prefixed(self.choice.key_prefix)
            self.sha_model_shapes = self.choice.file_shapes(parameter_shapes(meta))
            self.heads = self._head_names()

    @property
    def available(self) -> set[str]:
        """The artifacts at hand, the MHA checkpoint found in the model folder included."""
        return self.artifacts.given() | ({"mha"} if self.mha_path is not None else set())

    def _head_names(self) -> HeadNames:
        if self.artifacts.names is not None:
            return load_head_names(self.artifacts.names, self.name_map)
        keys: dict[str, tuple[int, ...]] = dict(self.sha_shapes_file or {})
        if self.sha_encodings is not None:
            names = [n for n, _ in _entries(self.sha_encodings, "param_encodings", str(self.artifacts.sha_encodings))]
            prefix = detect_prefix(names, list(self.sha_model_shapes) + list(keys))
            for name in names:
                keys.setdefault(name[len(prefix):] if name.startswith(prefix) else name, ())
        return infer_head_names(keys, self.name_map, self.mha_model_shapes, self.mha_model_shapes)

    # --- state, loaded when a law needs it ---

    @cached_property
    def mha_state(self) -> dict[str, torch.Tensor]:
        return load_state_dict_file(self.mha_path)

    @cached_property
    def sha_state(self) -> dict[str, torch.Tensor]:
        return load_state_dict_file(self.artifacts.sha)

    @cached_property
    def mha_model(self) -> nn.Module:
        return load_model(self.artifacts.model, weights=self.mha_path)

    def sha_model(self) -> nn.Module:
        """The SHA model holding the port's SHA checkpoint, under our names (strictly: every key, nothing more)."""
        model = build_model(self.artifacts.model, self.choice, device=self.choice.load_device)
        convert_to_sha(model)
        renamed = {self.heads.renames.get(k, k): v for k, v in self.sha_state.items()}
        model.load_state_dict(self.choice.model_state(renamed), strict=True, assign=True)
        return model.eval()

    def samples_for(self, net: nn.Module, count: int, dtype: torch.dtype = torch.float32) -> list[dict]:
        """Seeded inputs of ``net``'s kind, at its config's latent size, or 8 x 8 (64 px) where the config names none
        (a ControlNet's): the laws compare two models on the same inputs, at any size both take."""
        kind = kind_of(net)
        try:
            samples = kind.seeded_samples(net, count, seed=self.seed)
        except PasdVerifyError:
            samples = kind.seeded_samples(net, count, seed=self.seed, latent=(8, 8))
        return [{k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()} for s in samples]

    def partner_model(self) -> nn.Module | None:
        return load_model(self.artifacts.partner) if self.artifacts.partner is not None else None


def _choose_model(model: Path, shapes: dict | None):
    try:
        return choose_model(model, shapes)
    except PasdVerifyError as e:
        # the loader's advice is convert's flag; check takes the class from the config alone
        message = str(e).removesuffix("; name the class with --model-class")
        if message == str(e):
            raise
        raise PasdVerifyError(f"{message}; set _class_name in the model's config.json to the class its weights are "
                              "for") from e


def _networks(model: Path, meta: nn.Module, kind: str | None) -> dict[str, nn.Module]:
    """The networks of the model folder the laws and graphs are about: the one ``kind`` names, else all of them."""
    found = networks_of(meta)
    if kind is None:
        return found
    if kind not in found:
        raise PasdVerifyError(f"{model}: the kind given is {kind}, but the folder holds a {' and a '.join(found)} "
                              f"({type(meta).__name__}); give --kind {' or '.join(found)}, or leave it out")
    return {kind: found[kind]}


def _graph_takes_inputs_of(path: Path, graph, nets: dict[str, nn.Module]) -> None:
    """Refuse, before any law runs, a graph that takes an input none of the model folder's networks gives: another
    network's graph, which onnxruntime would stop on mid-law."""
    initializers = {i.name for i in graph.graph.initializer}
    takes = [i.name for i in graph.graph.input if i.name not in initializers]
    gives = {name: kind_of(net).inputs(net) for name, net in nets.items()}
    if any(set(takes) <= set(inputs) for inputs in gives.values()):
        return
    expected = "; ".join(f"a {name} takes {inputs}" for name, inputs in gives.items())
    raise PasdVerifyError(f"{path}: the graph takes the inputs {takes}; {expected}: is it another network's graph?")


def _load_onnx(path: Path):
    import onnx

    _file(path, "ONNX graph")
    if path.is_file() and path.stat().st_size == 0:
        raise PasdVerifyError(f"{path}: the ONNX graph is empty (0 bytes)")
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, ... for a file that is not a model
        raise PasdVerifyError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    if not graph.graph.node or not graph.graph.output:
        # protobuf reads many a non-model (a text file, zeros) as a model with nothing in it
        raise PasdVerifyError(f"{path}: not an ONNX model: it holds no graph ({len(graph.graph.node)} nodes, "
                               f"{len(graph.graph.output)} outputs)")
    return graph


def _context_binaries(path: Path, graph) -> None:
    """Each HTP context binary that an EPContext node of the context model ``path`` names (``embed_mode`` 0: a file
    beside it) is there and not empty: a missing binary is the input's fault, not an HTP accuracy failure."""
    for node in graph.graph.node:
        attributes = {a.name: a for a in node.attribute}
        if node.op_type != "EPContext" or "embed_mode" not in attributes or attributes["embed_mode"].i != 0:
            continue
        name = attributes["ep_cache_context"].s.decode("utf-8", "replace") if "ep_cache_context" in attributes else ""
        binary = path.parent / name
        if not name or not binary.is_file():
            raise PasdVerifyError(f"{binary}: no such file; the context model {path} names it as its HTP context "
                                  "binary (keep the .bin beside the _ctx.onnx)")
        if binary.stat().st_size == 0:
            raise PasdVerifyError(f"{binary}: empty (0 bytes); the context model {path} names it as its HTP context "
                                  "binary")
