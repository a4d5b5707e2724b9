"""The MHA -> SHA name map: the one source of every rename.

:func:`pasd_verify.convert_to_sha` returns it. It records which attention modules were converted and with how many
heads; every SHA name the checkpoint, encodings and export code use is derived here from that record:

- parameters: ``a.attn1.to_q.weight`` -> ``a.attn1.to_q_convs.0.weight``, ... (one per head, in head order), and
  in transformers' naming (CLIP's text encoder) ``layers.0.self_attn.q_proj.weight`` ->
  ``layers.0.self_attn.q_proj_convs.0.weight``;
- activations, in both naming schemes AIMET writes: ONNX tensor names (``/a/attn1/to_q/MatMul_output_0`` ->
  ``/a/attn1/to_q_convs/to_q_convs.0/Conv_output_0``, ...) and module names (``a.attn1.to_q`` ->
  ``a.attn1.to_q_convs.0``, ...).

A :class:`NameMap` is a ``dict`` (MHA parameter name -> per-head SHA names), so that ``name_map.json`` is exactly
what users read; :meth:`NameMap.of` checks a plain dict (such a file, loaded) and gives the object.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

from .errors import PasdVerifyError

# The q, k and v projections' names in each library's attention: diffusers' ``Attention`` and transformers'
# ``CLIPAttention``. A converted module keeps its library's names, with ``_convs.<head>`` after them.
PROJECTIONS = ("to_q", "to_k", "to_v")
CLIP_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
_SCHEMES = (PROJECTIONS, CLIP_PROJECTIONS)
_KINDS = ("weight", "bias")


def projections_named(proj: str) -> tuple[str, str, str] | None:
    """The q/k/v names of the scheme ``proj`` (``to_k``, ``q_proj``) belongs to, or None."""
    return next((scheme for scheme in _SCHEMES if proj in scheme), None)


# State-dict keys of an attention projection in each form, as :meth:`NameMap.add` names them: what a checkpoint
# holds is read from these, whether or not a name map is at hand.
_PROJECTION_KEYS = {"mha": re.compile(r"(^|\.)(to_[qkv]|[qkv]_proj)\.(weight|bias)$"),
                    "sha": re.compile(r"(^|\.)(to_[qkv]|[qkv]_proj)_convs\.\d+\.(weight|bias)$")}


def is_projection_key(key: str, form: str) -> bool:
    """Whether ``key`` is a q/k/v projection parameter in ``form``: ``mha`` (``x.to_q.weight``) or ``sha``
    (``x.to_q_convs.3.weight``)."""
    return _PROJECTION_KEYS[form].search(key) is not None


def holds_sha_projections(keys: Iterable[str]) -> bool:
    """Whether a checkpoint with these keys is in SHA form (has any per-head projection)."""
    return any(is_projection_key(key, "sha") for key in keys)


class NameMapError(PasdVerifyError):
    """A name map is not one :func:`pasd_verify.convert_to_sha` could have produced."""


def _module_parts(module_path: str) -> list[str]:
    """Path segments with each ModuleList index kept on its list: ``a.blocks.0.attn1`` -> ``[a, blocks.0, attn1]``."""
    parts: list[str] = []
    for part in module_path.split("."):
        if part.isdigit() and parts:
            parts[-1] += "." + part
        else:
            parts.append(part)
    return parts


def onnx_scope(module_path: str) -> str:
    """The ONNX scope of a module's own ops as AIMET's export names them: ``a.blocks.0.attn1`` ->
    ``/a/blocks/blocks.0/attn1`` (a ModuleList child is named by the list, then by the list and its index)."""
    return "/" + "/".join(f"{p.split('.')[0]}/{p}" if "." in p else p for p in _module_parts(module_path))


def flat_scope(module_path: str) -> str:
    """The scope of free (functional) ops inside a module: ``a.blocks.0.attn1`` -> ``/a/blocks.0/attn1``."""
    return "/" + "/".join(_module_parts(module_path))


def _module_of(parameter: str) -> str:
    """``a.attn1.to_q.weight`` -> ``a.attn1`` (``""`` for a model that is one attention)."""
    return parameter.rsplit(".", 2)[0] if parameter.count(".") >= 2 else ""


class NameMap(dict[str, list[str]]):
    """MHA parameter name -> the per-head SHA parameter names, in head order, of every converted attention."""

    def add(self, module: str, heads: int, has_bias: bool, projections: tuple[str, str, str] = PROJECTIONS) -> None:
        """Record the attention ``module``, whose q/k/v are named ``projections``, converted into ``heads``
        single-head modules."""
        dot = f"{module}." if module else ""
        for proj in projections:
            for kind in _KINDS if has_bias else _KINDS[:1]:
                self[f"{dot}{proj}.{kind}"] = [f"{dot}{proj}_convs.{i}.{kind}" for i in range(heads)]

    @classmethod
    def of(cls, mapping: Mapping[str, list[str]], source: str = "name map") -> NameMap:
        """``mapping`` as a NameMap, checked: every entry must be what :meth:`add` gives for its module."""
        if isinstance(mapping, NameMap):
            return mapping
        if not isinstance(mapping, Mapping):
            raise NameMapError(f"{source}: expected an object of MHA name -> SHA names, got {type(mapping).__name__}")
        rebuilt = cls()
        for key, names in mapping.items():
            module, _, rest = key.rpartition(".")
            module, _, proj = module.rpartition(".")  # a top-level module gives ("", "", proj)
            scheme = projections_named(proj)
            if scheme is None or rest not in _KINDS or not isinstance(names, list) or not names:
                raise NameMapError(f"{source}: {key!r} is not a q/k/v weight or bias with a list of head names")
            rebuilt.add(module, len(names), has_bias=True, projections=scheme)
            if names != rebuilt[key]:
                raise NameMapError(f"{source}: {key!r} maps to {names[:2]}..., expected {rebuilt[key][:2]}...")
        checked = cls((k, list(v)) for k, v in mapping.items())
        heads: dict[str, set[int]] = {}
        schemes: dict[str, set[tuple[str, ...]]] = {}
        for key, names in checked.items():
            heads.setdefault(_module_of(key), set()).add(len(names))
            schemes.setdefault(_module_of(key), set()).add(projections_named(key.split(".")[-2]))
        for module, counts in heads.items():
            weights = [f"{module}.{proj}.weight" if module else f"{proj}.weight" for proj in checked.projections(module)]
            if len(counts) > 1 or len(schemes[module]) > 1 or any(w not in checked for w in weights):
                raise NameMapError(f"{source}: module {module!r} lacks a q/k/v weight, mixes two naming schemes, or "
                                   f"splits them into different head counts {sorted(counts)}")
        return checked

    def projections(self, module: str) -> tuple[str, str, str]:
        """The q/k/v names of the converted ``module``: the scheme of its first entry."""
        dot = f"{module}." if module else ""
        first = next(key for key in self if _module_of(key) == module)
        return projections_named(first[len(dot):].split(".")[0])

    def prefixed(self, prefix: str) -> NameMap:
        """The same map with ``prefix`` before every name: the names of a checkpoint that puts the model under it
        (a transformers 4.x text encoder's ``text_model.``)."""
        return NameMap((prefix + mha, [prefix + sha for sha in shas]) for mha, shas in self.items())

    @property
    def modules(self) -> dict[str, int]:
        """Each converted attention module, with its head count."""
        return {_module_of(key): len(names) for key, names in self.items()}

    def sha_names(self) -> list[str]:
        """Every SHA parameter name, in the map's order."""
        return [name for names in self.values() for name in names]

    def first_heads(self) -> dict[str, str]:
        """The first head's SHA name -> its MHA name (where a merge back starts)."""
        return {names[0]: mha for mha, names in self.items()}

    def all_names(self) -> list[str]:
        """Every MHA and SHA parameter name the map holds."""
        return [name for mha, shas in self.items() for name in (mha, *shas)]

    def activation_names(self, prefix: str = "") -> dict[str, list[str]]:
        """MHA activation names -> the SHA activation names that take their encoding, under the module path
        ``prefix`` AIMET put in front of the model's (``unet.``). Keys are module names (``x.to_q``) and ONNX scopes
        (``/x/to_q``: any ``<op>_output_0`` tensor directly in that scope is the projection's output)."""
        names: dict[str, list[str]] = {}
        for module, heads in self.modules.items():
            path = prefix + module
            scope = onnx_scope(path)
            for proj in self.projections(module):
                names[f"{scope}/{proj}"] = [f"{scope}/{proj}_convs/{proj}_convs.{i}/Conv_output_0" for i in range(heads)]
                names[f"{path}.{proj}"] = [f"{path}.{proj}_convs.{i}" for i in range(heads)]
        return names

    def attention_scopes(self, prefix: str = "") -> list[str]:
        """The ONNX scopes of every converted module's ops (its own, and its free ops')."""
        return [scope for module in self.modules for scope in (onnx_scope(prefix + module), flat_scope(prefix + module))]

    def to_json(self) -> str:
        return json.dumps(self, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "name map") -> NameMap:
        try:
            return cls.of(json.loads(text), source)
        except json.JSONDecodeError as e:
            raise NameMapError(f"{source}: not JSON ({e})") from e
