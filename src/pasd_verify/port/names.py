"""How a port names its heads: the key of each head's q/k/v parameter in another tool's SHA files, matched to the
name :class:`~pasd_verify.name_map.NameMap` gives it.

Tools name the per-head modules differently: this project and Qualcomm's reference note ``to_q_convs.{i}``, other
tools their own words around the head index. Every scheme seen keeps the converted attention's module path, puts
one head index in what follows it, and says which projection it is with a word (``q``, ``to_q``, ``q_proj``,
``query``). So a key is matched when, under a converted attention module, exactly one number is left (the head)
and exactly one projection word; the model decides the rest (which modules were converted, their head counts, the
shapes the laws then check). The QNN SDK's ONNX-level ``mha2sha`` numbers the attentions instead of naming them
(``attn_{n}_head_{i}_query.weight``): such a group is matched to the one converted module whose head count and
head shapes it has, and left unmatched where several have them. What cannot be matched so is named, never guessed:
a names file (``--names``, the MHA name -> that tool's head names, in ``name_map.json``'s layout) settles it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PasdVerifyError
from ..name_map import NameMap, flat_scope, onnx_scope

# The word that says which projection a head belongs to, in the schemes tools use.
_PROJECTION_WORDS = {"q": 0, "query": 0, "k": 1, "key": 1, "v": 2, "value": 2}
_KINDS = ("weight", "bias")


class NamesError(PasdVerifyError):
    """A names file that is not readable as MHA name -> head names."""


@dataclass(frozen=True)
class HeadNames:
    """A port's head keys matched to ours.

    ``heads``: our MHA parameter name -> the port's head keys, in head order; ``renames``: each of those keys -> our
    SHA name for it (only where the head count is the model's: otherwise there is no SHA name to give);
    ``unmatched``: the port's keys no rule placed, each with why; ``scheme``: how the match was made."""

    heads: dict[str, list[str]]
    renames: dict[str, str]
    unmatched: dict[str, str] = field(default_factory=dict)
    scheme: str = "inferred"

    def templates(self) -> list[str]:
        """The naming patterns found (``to_q_convs.{}.weight``), for the report."""
        patterns = set()
        for mha, keys in self.heads.items():
            module = mha.rsplit(".", 2)[0]
            for key in keys:
                patterns.add(re.sub(r"\d+", "{}", key[len(module) + 1:], count=1) if key.startswith(module + ".")
                             else key)
        return sorted(patterns)

    def activation_renames(self, prefix: str = "") -> dict[str, str]:
        """The port's activation names of each head's projection output -> ours, in both naming schemes AIMET
        writes (module names; ONNX tensors of the head's Conv), under the module path ``prefix``."""
        renames = {}
        for theirs, ours in self.renames.items():
            their_module, our_module = theirs.rsplit(".", 1)[0], ours.rsplit(".", 1)[0]
            renames[prefix + their_module] = prefix + our_module
            for scope in (onnx_scope, flat_scope):
                renames[f"{scope(prefix + their_module)}/Conv_output_0"] = f"{onnx_scope(prefix + our_module)}/Conv_output_0"
        return renames


def _module_of(key: str, modules: list[str]) -> str | None:
    return next((m for m in modules if key.startswith(m + ".")), None)


def _projection(pattern: str) -> int | None:
    """Which of q, k, v the words of ``pattern`` name (None unless exactly one)."""
    words = {_PROJECTION_WORDS[w] for w in re.split(r"[^a-z]+", pattern.lower()) if w in _PROJECTION_WORDS}
    return words.pop() if len(words) == 1 else None


def _numbered_attentions(keys: dict[str, tuple[int, ...]], name_map: NameMap, shapes: dict[str, tuple[int, ...]],
                         unmatched: dict[str, str]) -> dict[str, list[str]]:
    """Heads of attentions that a tool numbered instead of naming (``attn_3_head_1_query.weight``): each numbered
    attention is matched to the converted module whose head count and head shapes it has, when exactly one has."""
    numbered: dict[str, dict[tuple[int, str], dict[int, str]]] = {}  # attention number -> (proj, kind) -> head -> key
    for key in keys:
        kind = key.rsplit(".", 1)[-1]
        head = re.search(r"heads?[^a-z0-9]*(\d+)", key.lower())
        numbers = re.findall(r"\d+", key)
        proj = _projection(re.sub(r"\d+", " ", key))
        if head is None or len(numbers) != 2 or proj is None or kind not in _KINDS:
            continue
        attention = numbers[0] if numbers[1] == head.group(1) else numbers[1]
        numbered.setdefault(attention, {}).setdefault((proj, kind), {})[int(head.group(1))] = key

    def signature(found: dict[tuple[int, str], list[tuple[int, ...]]]) -> tuple:
        return tuple(sorted((p, k, len(s), tuple(s[0][:2]) if s else ()) for (p, k), s in found.items()))

    modules: dict[tuple, list[str]] = {}
    for module, heads in name_map.modules.items():
        found = {}
        for p, proj in enumerate(name_map.projections(module)):
            for kind in _KINDS:
                mha = f"{module}.{proj}.{kind}"
                if mha in name_map:
                    rows = shapes[mha][0] // heads
                    found[(p, kind)] = [(rows, *shapes[mha][1:])] * heads
        modules.setdefault(signature(found), []).append(module)
    matched: dict[str, list[str]] = {}
    for attention, groups in numbered.items():
        found = {pk: [tuple(keys[k][:2]) for _, k in sorted(heads.items())] for pk, heads in groups.items()}
        candidates = modules.get(signature(found), [])
        every = [k for heads in groups.values() for k in heads.values()]
        if len(candidates) != 1:
            for key in every:
                unmatched[key] = (f"attention number {attention}'s head shapes fit {len(candidates)} converted "
                                  "modules; give --names" if candidates else
                                  f"attention number {attention}'s head count and shapes fit no converted module")
            continue
        module = candidates[0]
        for (p, kind), heads in groups.items():
            matched[f"{module}.{name_map.projections(module)[p]}.{kind}"] = [heads[i] for i in sorted(heads)]
        for key in every:
            unmatched.pop(key, None)
    return matched


def infer_head_names(keys: Iterable[str] | dict[str, tuple[int, ...]], name_map: NameMap, model_keys: Iterable[str],
                     mha_shapes: dict[str, tuple[int, ...]] | None = None) -> HeadNames:
    """Match the head keys among ``keys`` (a port's SHA checkpoint keys or parameter encoding names, under the same
    names as the model's ``model_keys``; with their shapes, numbered attentions can be matched too, given the
    model's ``mha_shapes``) to ``name_map``'s MHA parameters; see the module docstring."""
    name_map = NameMap.of(name_map)
    modules = sorted(name_map.modules, key=len, reverse=True)  # the longest path first: nested modules
    known = set(model_keys) | set(name_map)
    groups: dict[str, dict[str, dict[int, str]]] = {}  # our MHA name -> pattern -> head index -> their key
    unmatched: dict[str, str] = {}
    for key in keys:
        if key in known:
            continue
        module = _module_of(key, modules)
        if module is None:
            unmatched[key] = "is not a parameter of the model, nor under any of its attention modules"
            continue
        rest = key[len(module) + 1:]
        kind = rest.rsplit(".", 1)[-1]
        numbers = list(re.finditer(r"\d+", rest))
        pattern = rest if len(numbers) != 1 else rest[:numbers[0].start()] + "{}" + rest[numbers[0].end():]
        word = _projection(pattern)
        if kind not in _KINDS or len(numbers) != 1 or word is None:
            unmatched[key] = (f"under attention {module!r}, but not one head index and one q/k/v word; "
                              "give --names")
            continue
        proj = name_map.projections(module)[word]
        mha = f"{module}.{proj}.{kind}"
        if mha not in name_map:
            unmatched[key] = f"would be a head of {mha!r}, which the model does not have"
            continue
        groups.setdefault(mha, {}).setdefault(pattern, {})[int(numbers[0].group())] = key
    heads: dict[str, list[str]] = {}
    for mha, patterns in groups.items():
        if len(patterns) > 1:
            for pattern, found in patterns.items():
                for key in found.values():
                    unmatched[key] = (f"one of {len(patterns)} naming patterns ({', '.join(sorted(patterns))}) for "
                                      f"the heads of {mha!r}; give --names")
            continue
        (found,) = patterns.values()
        heads[mha] = [found[i] for i in sorted(found)]
    if isinstance(keys, dict) and mha_shapes is not None:
        outside = {k: keys[k] for k in unmatched if _module_of(k, modules) is None}
        for mha, found in _numbered_attentions(outside, name_map, mha_shapes, unmatched).items():
            heads.setdefault(mha, found)
    return _with_renames(heads, name_map, unmatched, "inferred")


def _with_renames(heads: dict[str, list[str]], name_map: NameMap, unmatched: dict[str, str], scheme: str) -> HeadNames:
    renames = {}
    for mha, keys in heads.items():
        if len(keys) == len(name_map[mha]):
            renames.update(zip(keys, name_map[mha]))
    return HeadNames(heads, renames, unmatched, scheme)


def load_head_names(path: str | os.PathLike, name_map: NameMap) -> HeadNames:
    """A names file: a JSON object of our MHA parameter name -> the port's head keys in head order (the layout of
    ``name_map.json``, with the other tool's names on the right)."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise NamesError(f"{path}: no such names file") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NamesError(f"{path}: not a JSON names file ({e})") from e
    if not isinstance(mapping, dict):
        raise NamesError(f"{path}: expected an object of MHA name -> head names, got {type(mapping).__name__}")
    for mha, keys in mapping.items():
        if mha not in name_map:
            raise NamesError(f"{path}: {mha!r} is not a q/k/v parameter of an attention the model converts")
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise NamesError(f"{path}: {mha!r} must map to a list of head names")
    return _with_renames({k: list(v) for k, v in mapping.items()}, name_map, {}, f"file {path}")

