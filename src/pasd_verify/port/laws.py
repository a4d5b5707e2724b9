"""The laws of an MHA -> SHA port, checked on another tool's artifacts.

A :class:`~pasd_verify.port.artifacts.Port` reads whatever a user has
(:class:`~pasd_verify.port.artifacts.PortArtifacts`: a model folder, its MHA checkpoint, an SHA checkpoint, MHA and
SHA encodings, an ONNX export and its encodings, a QDQ graph) up front, so that an unreadable file is an error before
any law runs. Each :class:`Law` names the artifacts it needs; :func:`check_port` runs every law whose artifacts are
there and says, for the others, which artifact is missing. A failed law lists each key at fault
(:class:`~pasd_verify.port.artifacts.Failure`), in the port's own names.

The laws read the port through :class:`~pasd_verify.port.names.HeadNames` (their head keys -> ours) and then hold it
to what this project's own rewrite computes from the MHA artifacts (:mod:`pasd_verify.checkpoint`,
:mod:`pasd_verify.encodings`): the split is exact (rows, not numbers close to them), so "what the MHA file implies"
is one answer.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..demo import FP32_TOLERANCE, FP64_TOLERANCE  # max |SHA - MHA| / max |MHA|: the same function, reordered
from ..encodings import _channels, _entries, _is_per_tensor, convert_version, detect_prefix, mha_to_sha
from ..encodings_check import check_encodings
from ..errors import PasdVerifyError
from ..export.agreement import relative_error
from ..kinds import kind_of, networks_of
from .artifacts import Failure, LawResult, Port, Unchecked

# An encoding's numbers go through JSON: a tool writing them from float32 keeps 7 digits.
_FLOAT_RTOL = 1e-6


# --- the laws --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Law:
    """A law: its name (``group.law``), what it says, the artifacts it needs and the function that checks it (the
    port -> its failures and figures; raising :class:`Unchecked` where this port cannot say)."""

    name: str
    says: str
    needs: tuple[str, ...]
    check: Callable[[Port], tuple[list[Failure], dict[str, Any]]]


def _mha_fits(port: Port):
    expected, found = port.mha_model_shapes, port.mha_shapes_file
    failures = [Failure(k, "is missing from the MHA checkpoint") for k in sorted(expected.keys() - found.keys())]
    failures += [Failure(k, "is not a parameter of the model") for k in sorted(found.keys() - expected.keys())]
    failures += [Failure(k, f"has shape {found[k]}, the model {expected[k]}")
                 for k in sorted(expected.keys() & found.keys()) if tuple(found[k]) != tuple(expected[k])]
    return failures, {"keys": len(found)}


def _names_matched(port: Port):
    failures = [Failure(k, why) for k, why in sorted(port.heads.unmatched.items())]
    return failures, {"scheme": port.heads.scheme, "patterns": port.heads.templates(),
                      "heads_matched": sum(len(v) for v in port.heads.heads.values())}


def _no_mha_keys(port: Port):
    kept = sorted(k for k in port.sha_shapes_file if k in port.name_map)
    return [Failure(k, "is an MHA projection key, still in the SHA checkpoint") for k in kept], {"mha_keys_kept": len(kept)}


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """A head's parameter as the Linear rows it comes from: a 1x1 Conv2d weight (dh, C, 1, 1) -> (dh, C)."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() == 4 and tensor.shape[2:] == (1, 1) else tensor


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` hold the same bits: the same dtype and shape and every element's bits equal. ``torch.equal``
    compares values, so it takes -0.0 for 0.0 and refuses a NaN copied exactly."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(bits), b.contiguous().view(bits)
    return torch.equal(a, b)


def _split_failures(mha: str, whole: torch.Tensor, keys: list[str], heads: int, state: dict) -> list[Failure]:
    if len(keys) != heads:
        return [Failure(keys[0], f"{mha} is split into {len(keys)} heads; the model's attention has {heads}")]
    rows = whole.shape[0] // heads
    failures = []
    for i, key in enumerate(keys):
        if key not in state:
            failures.append(Failure(key, f"head {i} of {mha} is missing"))
            continue
        head = _rows(state[key])
        expected = whole[i * rows:(i + 1) * rows]
        if head.shape != expected.shape:
            failures.append(Failure(key, f"has shape {tuple(state[key].shape)}; head {i} of {mha} "
                                         f"{tuple(whole.shape)} is rows {i * rows}:{(i + 1) * rows}"))
        elif not _same_bits(head, expected):
            found = [j for j in range(heads) if _same_bits(head.to(whole.dtype), whole[j * rows:(j + 1) * rows])]
            where = f"; it holds head {found[0]}'s rows" if found else ""
            failures.append(Failure(key, f"is not rows {i * rows}:{(i + 1) * rows} of {mha}, bit for bit{where}"))
    return failures


def _head_split(port: Port):
    failures, split = [], 0
    heads_of = port.name_map.modules
    for mha in port.name_map:
        if mha not in port.mha_state:
            continue
        keys = port.heads.heads.get(mha)
        if not keys:
            failures.append(Failure(mha, "has no heads in the SHA checkpoint"))
            continue
        module = mha.rsplit(".", 2)[0].removeprefix(port.choice.key_prefix)
        failures += _split_failures(mha, port.mha_state[mha], keys, heads_of[module], port.sha_state)
        split += 1
    return failures, {"projections_split": split, "heads": sum(len(v) for v in port.heads.heads.values())}


def _rest_unchanged(port: Port):
    failures, same = [], 0
    for key, tensor in port.mha_state.items():
        if key in port.name_map:
            continue
        if key not in port.sha_state:
            failures.append(Failure(key, "is in the MHA checkpoint but not in the SHA one"))
        elif not _same_bits(port.sha_state[key], tensor):
            failures.append(Failure(key, "differs from the MHA checkpoint's (not a q/k/v projection: it must be kept)"))
        else:
            same += 1
    return failures, {"kept_identical": same}


def _loads_strict(port: Port):
    expected = port.sha_model_shapes
    found = {port.heads.renames.get(k, k): (k, tuple(s)) for k, s in port.sha_shapes_file.items()}
    failures = [Failure(k, "the SHA model needs it; the checkpoint has nothing that maps to it")
                for k in sorted(expected.keys() - found.keys())]
    failures += [Failure(found[k][0], "is not a parameter of the SHA model (unexpected in a strict load)")
                 for k in sorted(found.keys() - expected.keys())]
    failures += [Failure(found[k][0], f"has shape {found[k][1]}; the SHA model's {k} is {tuple(expected[k])}")
                 for k in sorted(expected.keys() & found.keys()) if found[k][1] != tuple(expected[k])]
    if not failures:
        port.sha_model()  # the load itself: strict, every tensor assigned
    return failures, {"keys": len(found)}


def networks(port: Port, model: nn.Module) -> list[nn.Module]:
    """The networks of a loaded model: a VAE's two halves (or the one ``kind`` names), else the model."""
    found = networks_of(model)
    kind = port.artifacts.kind
    return [found[kind]] if len(found) > 1 and kind in found else list(found.values())


def _one_network(port: Port, what: str):
    """The model's one network (of ``kind`` in a VAE folder), its graph and the partner that feeds it: what a law on
    an exported graph runs on the same seeded input."""
    nets = networks(port, port.mha_model)
    if len(nets) != 1:
        raise Unchecked(f"the model folder holds two networks (a VAE): give the kind the {what} is")
    kind = kind_of(nets[0])
    partner = port.partner_model()
    if kind.partner is not None and partner is None:
        raise Unchecked(f"a {kind.name}'s inputs come from its {kind.partner}: give its folder as the partner")
    return nets[0], kind.graph(nets[0]), partner


def _equals_mha(port: Port):
    partner = port.partner_model()
    mha_nets, sha_nets = networks(port, port.mha_model), networks(port, port.sha_model())
    figures: dict[str, Any] = {"samples": port.samples}
    failures = []
    for mha_net, sha_net in zip(mha_nets, sha_nets):
        kind = kind_of(mha_net)
        if kind.partner is not None and partner is None:
            raise Unchecked(f"a {kind.name}'s inputs come from its {kind.partner}: give its folder as the partner")
        for precision, dtype, tolerance in (("fp32", torch.float32, FP32_TOLERANCE),
                                            ("fp64", torch.float64, FP64_TOLERANCE)):
            # nn.Module's own to(): diffusers' logs a warning for every cast of a model it could keep in float32
            a, b = nn.Module.to(copy.deepcopy(mha_net), dtype), nn.Module.to(copy.deepcopy(sha_net), dtype)
            feeding = nn.Module.to(copy.deepcopy(partner), dtype) if partner is not None else None
            worst = 0.0
            graph_a, graph_b = kind.graph(a), kind.graph(b)
            for sample in port.samples_for(mha_net, port.samples, dtype):
                feeds = graph_a.feeds(sample, feeding)
                out_a, out_b = graph_a(feeds), graph_b(feeds)
                worst = max(worst, *(relative_error(out_a[k].numpy(), out_b[k].numpy()) for k in out_a))
            figures[f"{kind.name}_{precision}_relative_error"] = worst
            figures[f"{kind.name}_{precision}_tolerance"] = tolerance
            if not worst <= tolerance:
                failures.append(Failure(kind.name, f"SHA and MHA outputs differ by {worst:.3g} of the output's "
                                                   f"largest value in {precision}; the same function allows "
                                                   f"{tolerance:g}"))
    return failures, figures


def _encodings_consistent(form: str):
    def check(port: Port):
        encodings = port.mha_encodings if form == "mha" else _renamed_encodings(port)
        shapes = port.mha_model_shapes if form == "mha" else port.sha_model_shapes
        source = str(port.artifacts.mha_encodings if form == "mha" else port.artifacts.sha_encodings)
        problems = check_encodings(encodings, shapes, source=source)
        return [_problem(p, source) for p in problems], {
            "layout": port.encodings_layouts[f"{form}_encodings"],
            "param_encodings": len(list(_entries(encodings, "param_encodings", source))),
            "activation_encodings": len(list(_entries(encodings, "activation_encodings", source)))}
    return check


def _problem(problem: str, source: str) -> Failure:
    """A problem of :func:`check_encodings` (``<file>: <name>: <what>``) as the failure of its entry."""
    rest = problem.removeprefix(source + ": ")
    key, sep, what = rest.removeprefix("activation ").partition(": ")
    return Failure(key.split("[", 1)[0].strip(), what) if sep else Failure(source, rest)


def _our_names(port: Port, encodings: dict) -> tuple[dict[str, str], dict[str, str], str]:
    """Renames of the port's parameter and activation encoding names into ours, and the prefix AIMET put."""
    source = str(port.artifacts.sha_encodings)
    names = [n for n, _ in _entries(encodings, "param_encodings", source)]
    prefix = detect_prefix(names, list(port.sha_model_shapes) + list(port.heads.renames))
    params = {prefix + theirs: prefix + ours for theirs, ours in port.heads.renames.items()}
    return params, port.heads.activation_renames(prefix), prefix


def _renamed_encodings(port: Port) -> dict[str, Any]:
    """The port's SHA encodings under our names (its head names replaced, everything else as it is)."""
    encodings = port.sha_encodings
    params, acts, _ = _our_names(port, encodings)
    out = copy.deepcopy(encodings)
    for section, renames in (("param_encodings", params), ("activation_encodings", acts)):
        body = out[section]
        if isinstance(body, dict):
            out[section] = {renames.get(k, k): v for k, v in body.items()}
        else:
            for entry in body:
                entry["name"] = renames.get(entry["name"], entry["name"])
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=_FLOAT_RTOL,
                                                                                            abs_tol=1e-30)
    return a == b


def _strip_name(entry: Any) -> Any:
    return {k: v for k, v in entry.items() if k != "name"} if isinstance(entry, dict) else entry


def _implied(port: Port):
    source = str(port.artifacts.mha_encodings)
    implied, report = mha_to_sha(port.mha_encodings, port.name_map, source=source)
    theirs_raw = port.sha_encodings
    theirs = convert_version(_renamed_encodings(port), implied["version"], source=str(port.artifacts.sha_encodings))
    params, acts, prefix = _our_names(port, theirs_raw)
    back = {ours: t for t, ours in {**params, **acts}.items()}  # our name -> theirs, for messages
    scopes = port.name_map.attention_scopes(report.prefix)
    failures, compared = [], 0
    for section in ("param_encodings", "activation_encodings"):
        want = dict(_entries(implied, section, source))
        have = dict(_entries(theirs, section, str(port.artifacts.sha_encodings)))
        for name, entry in want.items():
            label = back.get(name, name)
            if name not in have:
                failures.append(Failure(label, f"{section}: the MHA encodings imply an entry; the SHA file has none"))
                continue
            compared += 1
            if not _same(_strip_name(entry), _strip_name(have[name])):
                failures.append(Failure(label, f"{section}: {_difference(want[name], have[name], implied['version'])}"))
        for name in sorted(have.keys() - want.keys()):
            bare = name[len(prefix):] if name.startswith(prefix) else name
            if section == "param_encodings" and bare in port.name_map:
                failures.append(Failure(back.get(name, name), "param_encodings: an MHA projection's entry, still in "
                                                              "the SHA file"))
            elif section == "param_encodings" or not any(name.startswith(s + "/") or name.startswith(s + ".")
                                                         for s in scopes):
                failures.append(Failure(back.get(name, name), f"{section}: not implied by the MHA encodings"))
    return failures, {"entries_compared": compared, **report.as_dict()}


def _difference(want: Any, have: Any, version: str) -> str:
    channels_want, channels_have = _channels(want, version), _channels(have, version)
    if channels_want != channels_have:
        return (f"{channels_have} channel encodings where the MHA file implies {channels_want} "
                f"({'per-tensor, copied' if _is_per_tensor(want, version) else 'its head of a per-channel one'})")
    return "differs from the entry the MHA encodings imply (the head's channels, in order)"


def _onnx_names(port: Port):
    from ..export.quantize import check_encoding_names

    source = str(port.artifacts.onnx_encodings)
    encodings = convert_version(port.onnx_encodings, "1.0.0", source=source)
    problems = check_encoding_names(encodings, port.onnx_graph)
    return [Failure(p.split("'")[1] if "'" in p else source, p) for p in problems], {
        "param_encodings": len(encodings["param_encodings"]), "activation_encodings": len(encodings["activation_encodings"]),
        "initializers": len(port.onnx_graph.graph.initializer), "nodes": len(port.onnx_graph.graph.node)}


def _onnx_equals(port: Port):
    from onnx.helper import tensor_dtype_to_np_dtype

    from ..export.agreement import float_agrees
    from ..export.onnx_io import run_onnx

    net, graph, partner = _one_network(port, "ONNX graph")

    inputs = [i.name for i in port.onnx_graph.graph.input]
    dtypes = {i.name: tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in port.onnx_graph.graph.input}
    missing = [n for n in graph.input_names if n not in inputs]
    if missing:
        return [Failure(n, f"the {graph.kind.name}'s input is not an input of the ONNX graph (it has {inputs})")
                for n in missing], {}
    failures, errors = [], {}
    for sample in port.samples_for(net, 1):
        feeds = graph.feeds(sample, partner)
        reference = {k: v.numpy() for k, v in graph(feeds).items()}
        # each input in the dtype the export declares (a timestep traced as an int64 or as a float)
        outputs = run_onnx(port.artifacts.onnx, {k: v.numpy().astype(dtypes.get(k, v.numpy().dtype))
                                                 for k, v in feeds.items()})
        for name, ref in reference.items():
            if name not in outputs:
                failures.append(Failure(name, "the model's output is not an output of the ONNX graph"))
                continue
            errors[name] = relative_error(ref, outputs[name])
            if not float_agrees([errors[name]]):
                failures.append(Failure(name, f"the ONNX graph's output differs from torch's by {errors[name]:.3g} "
                                              "of its largest value"))
    return failures, {"relative_error": max(errors.values(), default=0.0), "per_output": errors}


def _on_htp(port: Port):
    """The QDQ graph on the HTP (its context model when given, loaded as it is; else compiled here) against the same
    graph on onnxruntime's CPU, on a seeded input: what ``pasd-verify export``'s HTP step measures."""
    from ..export.agreement import HTP_SQNR_DB, htp_agrees, sqnr_db
    from ..export.htp import run_on_htp
    from ..export.onnx_io import run_onnx

    net, graph, partner = _one_network(port, "QDQ graph")
    feeds = {k: v.numpy() for k, v in graph.feeds(port.samples_for(net, 1)[0], partner).items()}
    cpu = run_onnx(port.artifacts.qdq, feeds)
    on_htp = port.artifacts.context or port.artifacts.qdq
    htp = run_on_htp(on_htp, feeds)
    figures: dict[str, Any] = {"graph": str(on_htp), "htp": htp.as_dict(), "threshold_db": HTP_SQNR_DB}
    if htp.status == "skipped":
        raise Unchecked(f"no HTP backend here: {htp.error}")
    if htp.status != "passed":
        return [Failure(str(on_htp), f"the HTP run {htp.status}: {htp.error}")], figures
    per_output = {name: sqnr_db(cpu[name], htp.outputs[name]) for name in cpu if name in htp.outputs}
    figures.update(cpu_vs_htp_sqnr_db=min(per_output.values()), per_output=per_output)
    failures = [Failure(name, f"the HTP's output is {value:.1f} dB from the CPU's on the same QDQ graph; "
                              f"agreement is at least {HTP_SQNR_DB:g} dB")
                for name, value in per_output.items() if not htp_agrees(value, HTP_SQNR_DB)]
    failures += [Failure(name, "an output of the QDQ graph that the HTP run did not give") for name in cpu
                 if name not in htp.outputs]
    return failures, figures


LAWS: tuple[Law, ...] = (
    Law("mha-checkpoint.fits-model", "the MHA checkpoint holds every parameter of the model, in its shape, and nothing "
        "else", ("model", "mha"), _mha_fits),
    Law("sha-checkpoint.names-matched", "every key of the SHA checkpoint is a parameter of the model or a head of "
        "one of its attentions", ("model", "sha"), _names_matched),
    Law("sha-checkpoint.no-mha-keys", "no MHA q/k/v key is left in the SHA checkpoint", ("model", "sha"), _no_mha_keys),
    Law("sha-checkpoint.heads-split", "each head is its rows of the MHA projection, bit for bit, in head order, as "
        "many heads as the attention has", ("model", "mha", "sha"), _head_split),
    Law("sha-checkpoint.rest-unchanged", "every other parameter is the MHA checkpoint's, bit for bit",
        ("model", "mha", "sha"), _rest_unchanged),
    Law("sha-checkpoint.loads-strict", "the SHA checkpoint loads strictly into the SHA model", ("model", "sha"),
        _loads_strict),
    Law("sha-model.equals-mha", "the SHA model's outputs are the MHA model's, in fp32 and fp64, on seeded inputs",
        ("model", "mha", "sha"), _equals_mha),
    Law("mha-encodings.consistent", "the MHA encodings name the model's parameters, with one encoding per output "
        "channel where per-channel, each self-consistent", ("model", "mha_encodings"), _encodings_consistent("mha")),
    Law("sha-encodings.implied", "the SHA encodings are what the MHA encodings imply: per-channel entries split per "
        "head, per-tensor ones copied, activations derived", ("model", "mha_encodings", "sha_encodings"), _implied),
    Law("sha-encodings.consistent", "the SHA encodings are consistent with the SHA model",
        ("model", "sha_encodings"), _encodings_consistent("sha")),
    Law("onnx.encodings-names", "every encoding of the export names a tensor of its graph, in the right section",
        ("onnx", "onnx_encodings"), _onnx_names),
    Law("onnx.equals-torch", "the float ONNX graph's outputs are the torch model's on a seeded input",
        ("model", "mha", "onnx"), _onnx_equals),
    Law("htp.agrees-with-cpu", "the QDQ graph (or its context binary) on the HTP agrees with the same graph on the CPU, "
        "as pasd-verify export measures it", ("model", "mha", "qdq"), _on_htp),
)
# A law whose input another law found broken says nothing of its own: it waits for that one.
_AFTER = {"sha-checkpoint.heads-split": ("mha-checkpoint.fits-model",),
          "sha-checkpoint.rest-unchanged": ("mha-checkpoint.fits-model",),
          "sha-model.equals-mha": ("mha-checkpoint.fits-model", "sha-checkpoint.loads-strict"),
          "onnx.equals-torch": ("mha-checkpoint.fits-model",),
          "sha-encodings.implied": ("mha-encodings.consistent", "sha-checkpoint.names-matched")}
_ARTIFACT_FLAGS = {"model": "--model", "mha": "--mha (or weights in the model folder)", "sha": "--sha",
                   "mha_encodings": "--mha-encodings", "sha_encodings": "--sha-encodings", "onnx": "--onnx",
                   "onnx_encodings": "--onnx-encodings", "qdq": "--qdq"}


def missing_artifacts(port: Port, law: Law) -> list[str]:
    """The flags of the artifacts ``law`` needs that ``port`` lacks (none: the law can be checked on it)."""
    return [_ARTIFACT_FLAGS[a] for a in law.needs if a not in port.available]


def run_law(port: Port, law: Law, results: dict[str, LawResult], *,
            progress: Callable[[str], None] | None = None) -> LawResult:
    """``law`` on ``port``, checked where its artifacts are there (else unchecked, naming them) and where none of the
    laws it follows failed in ``results`` (the laws checked before it); the result is added to ``results``."""
    result = LawResult(law.name, law.says, list(law.needs), "unchecked")
    missing = missing_artifacts(port, law)
    broken = [name for name in _AFTER.get(law.name, ()) if name in results and results[name].status == "failed"]
    if missing:
        result.reason = "needs " + ", ".join(missing)
    elif broken:
        result.reason = f"{', '.join(broken)} failed: its input is not what this law reads"
    else:
        if progress is not None:
            progress(law.name)
        started = time.perf_counter()
        try:
            failures, figures = law.check(port)
            result.status, result.failures, result.figures = ("failed" if failures else "passed"), failures, figures
        except Unchecked as e:
            result.reason = str(e)
        result.seconds = time.perf_counter() - started
    results[law.name] = result
    return result


def check_port(port: Port, laws: tuple[Law, ...] = LAWS, *, progress: Callable[[str], None] | None = None
               ) -> list[LawResult]:
    """Every law of ``laws`` on ``port``, in order."""
    results: dict[str, LawResult] = {}
    for law in laws:
        run_law(port, law, results, progress=progress)
    return list(results.values())


def law_names() -> list[str]:
    return [law.name for law in LAWS]


def select_laws(names: list[str] | None) -> tuple[Law, ...]:
    if not names:
        return LAWS
    unknown = [n for n in names if n not in law_names()]
    if unknown:
        raise PasdVerifyError(f"unknown law(s) {unknown}; the laws are {law_names()}")
    return tuple(law for law in LAWS if law.name in names)

