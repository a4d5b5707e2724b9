"""A bad-input property that cannot drift from the command line: hypothesis corrupts valid artifacts (checkpoints,
configs, encodings, calibration samples) and draws bad flag values for every subcommand, runs ``pasd-verify`` in
this process through :func:`pasd_verify.cli.main`, and proves for each:

- exit 2 (or, for a corruption that leaves a valid file behind, exit 0 with every output written);
- a message naming the file or the flag at fault;
- nothing written: the output folder does not exist afterwards;
- the inputs unchanged, byte for byte;
- bounded memory: the process's peak RSS (VmHWM, reset before each run) grows by less than ``MEMORY_BOUND``.

The ``thorough`` hypothesis profile runs ``THOROUGH_SCALE`` times its examples per test here (README: the count
of generated bad inputs); the ``ci`` profile a bounded sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pasd_verify.checkpoint import load_state_dict_file, save_state_dict_file
from pasd_verify.cli import main
from pasd_verify.presets import build_unet
from pasd_verify.quant.calibration import save_samples, seeded_samples

GOLDEN = Path(__file__).parent.parent / "golden"
MEMORY_BOUND = 1 << 30  # a tiny model's run holds tens of MB; 2**bw of one bad bit width held gigabytes
THOROUGH_SCALE = 14  # 1.5 x 500 x 14 = 10,500 generated bad inputs over the four tests
_SCALE = THOROUGH_SCALE if settings.default.max_examples >= 500 else 1


def _settings(share: float = 1.0):
    return settings(max_examples=max(1, int(settings.default.max_examples * _SCALE * share)),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large], deadline=None)


# --- the valid artifacts, made once ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    unet = build_unet("tiny", seed=0)
    unet.save_pretrained(root / "unet")  # config.json + diffusion_pytorch_model.safetensors
    save_state_dict_file(unet.state_dict(), root / "unet.pth")
    save_samples(seeded_samples(unet, 1, latent=(8, 8)), root / "calibration")
    for version in ("1.0.0", "0.6.1"):
        shutil.copy(GOLDEN / f"unet_tiny_mha_per_channel_{version}.encodings", root / f"mha_{version}.encodings")
    return {"config": root / "unet" / "config.json", "safetensors": root / "unet" / "diffusion_pytorch_model.safetensors",
            "pth": root / "unet.pth", "encodings_1.0.0": root / "mha_1.0.0.encodings",
            "encodings_0.6.1": root / "mha_0.6.1.encodings", "sample": root / "calibration" / "sample_00000.safetensors"}


def _digests(paths) -> dict[Path, str]:
    found = {}
    for path in paths:
        for f in ([path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []):
            if f.is_file():
                found[f] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


# --- corruptions ----------------------------------------------------------------------------------------------

WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.none(), max_size=2),
)


def _json_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            yield from _json_paths(v, prefix + (i,))


def _replace(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


def _delete(value, path):
    copy = dict(value) if isinstance(value, dict) else list(value)
    if len(path) == 1:
        del copy[path[0]]
    else:
        copy[path[0]] = _delete(value[path[0]], path[1:])
    return copy


@st.composite
def json_corruption(draw, text: str) -> bytes:
    """A JSON document with one value replaced or one key deleted, or its text cut before the end."""
    value = json.loads(text)
    how = draw(st.sampled_from(["replace", "delete", "truncate", "not json"]))
    if how == "truncate":
        return text.encode()[: draw(st.integers(0, len(text.rstrip()) - 2))]
    if how == "not json":
        return draw(st.binary(max_size=64))
    paths = list(_json_paths(value))
    if how == "delete":
        paths = [p for p in paths if p]
        return json.dumps(_delete(value, draw(st.sampled_from(paths)))).encode()
    return json.dumps(_replace(value, draw(st.sampled_from(paths)), draw(WEIRD))).encode()


@st.composite
def tensor_corruption(draw, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One tensor given a non-finite value, another dtype or shape, or a key dropped, added or renamed."""
    tensors = dict(tensors)
    key = draw(st.sampled_from(sorted(tensors)))
    how = draw(st.sampled_from(["nan", "dtype", "shape", "drop", "add", "rename", "empty"]))
    t = tensors[key]
    if how == "nan" and t.is_floating_point() and t.numel():
        t = t.clone().flatten()
        t[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tensors[key] = t.reshape(tensors[key].shape)
    elif how == "dtype":
        tensors[key] = t.to(draw(st.sampled_from([torch.int8, torch.int64, torch.bool, torch.float16, torch.float64])))
    elif how == "shape":
        tensors[key] = t.flatten()[: max(0, t.numel() - draw(st.integers(1, 3)))]
    elif how == "drop" and len(tensors) > 1:
        del tensors[key]
    elif how == "add":
        tensors[draw(st.text(min_size=1, max_size=8))] = torch.zeros(draw(st.integers(0, 3)))
    elif how == "rename":
        tensors[key + draw(st.text(min_size=1, max_size=3))] = tensors.pop(key)
    else:
        tensors[key] = t[:0] if t.ndim else t.reshape(1)[:0]
    return tensors


@st.composite
def safetensors_header_corruption(draw, data: bytes) -> bytes:
    """The header's length field or one header value doctored; the data left as it was."""
    (length,) = struct.unpack("<Q", data[:8])
    if draw(st.booleans()):
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1).filter(lambda n: n != length))) + data[8:]
    header = json.loads(data[8:8 + length])
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    header[name] = {**header[name], field: draw(WEIRD)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + length:]


def _file_corruption(draw, path: Path, kind: str, *, always_invalid: bool = False) -> bytes | None:
    """Bytes for a corrupted copy of ``path`` (None: the file is missing). ``always_invalid``: only corruptions no
    valid file can come out of (for export, whose success would cost a whole export and an HTP run)."""
    data = path.read_bytes()
    if always_invalid:
        how = draw(st.sampled_from(["truncate", "missing", "empty"] + (["invalid tensor"] if kind != "json" else [])))
        if how == "invalid tensor":
            tensors = dict(load_state_dict_file(path))
            key = draw(st.sampled_from(sorted(k for k, v in tensors.items() if v.numel() and v.is_floating_point())))
            if draw(st.booleans()):
                tensors[key] = tensors[key].clone()
                tensors[key].view(-1)[draw(st.integers(0, tensors[key].numel() - 1))] = math.nan
            else:
                tensors[key] = tensors[key].to(torch.int32)
            buffer = io.BytesIO()
            if kind == "pth":
                torch.save(tensors, buffer)
                return buffer.getvalue()
            from safetensors.torch import save

            return save(tensors)
    else:
        how = draw(st.sampled_from(["structured", "truncate", "garbage", "missing", "empty"]))
    if how == "missing":
        return None
    if how == "empty":
        return b""
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 2))]
    if how == "garbage":
        start = draw(st.integers(0, min(len(data) - 1, 4096)))
        junk = draw(st.binary(min_size=1, max_size=64))
        return data[:start] + junk + data[start + len(junk):]
    if kind == "json":
        return draw(json_corruption(data.decode()))
    if kind == "safetensors" and draw(st.booleans()):
        return draw(safetensors_header_corruption(data))
    tensors = draw(tensor_corruption(load_state_dict_file(path)))
    buffer = io.BytesIO()
    if kind == "pth":
        torch.save(tensors, buffer)
        return buffer.getvalue()
    from safetensors.torch import save

    try:
        return save({k: v.contiguous() for k, v in tensors.items()})
    except Exception:  # a tensor safetensors cannot store (an empty name): the garbage corruption instead
        return data[:-1]


# --- running the command --------------------------------------------------------------------------------------

def _reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs) and return it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _run(args: list[str]) -> tuple[int, str, int]:
    """``pasd-verify ARGS`` in this process: exit status, stderr, peak RSS growth."""
    err, out = io.StringIO(), io.StringIO()
    base = _reset_peak_rss()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(args)
        except SystemExit as e:  # argparse's refusals
            code = e.code
    return code, err.getvalue(), _status("VmHWM") - base


def _check(args: list[str], out: Path, inputs: list[Path], names: list[str], *, may_succeed: bool) -> int:
    before = _digests(inputs)
    code, err, growth = _run([*args, "--out", str(out)])
    assert growth < MEMORY_BOUND, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    assert _digests(inputs) == before, "an input changed"
    if code == 0 and may_succeed:
        assert out.is_dir() and any(out.iterdir())
        shutil.rmtree(out)
        return code
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    assert any(name in err for name in names), f"none of {names} named in: {err[-2000:]}"
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    return code


# --- the properties, one per subcommand and kind of fault ------------------------------------------------------

_KINDS = {"config": "json", "safetensors": "safetensors", "pth": "pth", "encodings_1.0.0": "json",
          "encodings_0.6.1": "json", "sample": "safetensors"}


def _corrupted(draw, good: dict[str, Path], which: str, folder: Path, *,
               always_invalid: bool = False) -> tuple[Path, Path]:
    """A copy of artifact ``which`` corrupted in ``folder``: (its path, the path to give on the command line)."""
    data = _file_corruption(draw, good[which], _KINDS[which], always_invalid=always_invalid)
    if which == "sample":
        target = folder / "calibration" / "sample_00000.safetensors"
        given_path = target.parent
    else:
        target = folder / good[which].name
        given_path = target
    target.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        target.write_bytes(data)
    return target, given_path


@given(data=st.data())
@_settings(0.5)
def test_convert_with_a_corrupted_artifact(good, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("convert")
    which = data.draw(st.sampled_from(["config", "safetensors", "pth", "encodings_1.0.0", "encodings_0.6.1"]))
    path, given_path = _corrupted(data.draw, good, which, folder)
    files = {"config": good["config"], "state_dict": good["safetensors"], "encodings": good["encodings_1.0.0"]}
    key = {"config": "config", "safetensors": "state_dict", "pth": "state_dict"}.get(which, "encodings")
    files[key] = given_path
    args = ["convert", "--model-config", str(files["config"]), "--state-dict", str(files["state_dict"]),
            "--encodings", str(files["encodings"])]
    _check(args, folder / "out", [*good.values(), path], [path.name], may_succeed=True)


def _bad_value(draw, flag: str) -> str:
    """A value ``flag`` must refuse."""
    numbers = {"--samples": st.integers(-10**6, 0), "--iterations": st.integers(-10**6, 0),
               "--param-bw": st.one_of(st.integers(-100, 1), st.integers(33, 10**30)),
               "--act-bw": st.sampled_from([-1, 0, 1, 3, 7, 9, 15, 17, 32, 10**20]),
               "--seed": st.just("x"), "--cache-budget": st.integers(-10**12, -1)}
    if flag in numbers:
        return str(draw(numbers[flag]))
    if flag in ("--htp-threshold-db", "--guidance", "--conditioning-scale", "--psnr-db"):
        return draw(st.sampled_from(["nan", "inf", "-inf", "x", ""]))
    pipeline_numbers = {"--steps": st.integers(-10**6, 0), "--upscale": st.integers(-10**6, 0),
                        "--process-size": st.one_of(st.integers(-10**6, 7), st.integers(9, 10**4).filter(
                            lambda n: n % 8)),
                        "--ssim": st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0001),
                                            st.just(float("nan")))}
    if flag in pipeline_numbers:
        return str(draw(pipeline_numbers[flag]))
    if flag == "--backend":
        return draw(st.one_of(st.text(max_size=12).filter(lambda s: "=" not in s),
                              st.sampled_from(["unet=gpu", "vae=qdq", "all=", "=htp", "unet=htp=1"])))
    if flag == "--soc-model":
        return draw(st.one_of(st.text(max_size=4).filter(lambda s: not (s.isdigit() and s.isascii() and int(s) > 0)),
                              st.just("-1"), st.just("0")))
    if flag == "--device":
        return draw(st.sampled_from(["banana", "meta", "cuda:x", "", "mps", "cuda" if not torch.cuda.is_available() else "x"]))
    choices = {"--weights", "--encodings-version", "--cache-dtype", "--form", "--kind", "--preset", "--model-class",
               "--rewrite", "--no-rewrite", "--start"}
    assert flag in choices, flag
    return draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in ("per_channel", "per_tensor", "float32",
                                                                            "float16", "sha", "mha", "tiny",
                                                                            "photo", "noise")))


_LATENT = st.lists(st.integers(-5, 0), min_size=2, max_size=2)
FLAGS = {
    "convert": ["--encodings-version", "--model-class"],
    "adaround": ["--samples", "--iterations", "--param-bw", "--seed", "--cache-budget", "--device", "--weights",
                 "--cache-dtype", "--form", "--kind", "--preset", "--encodings-version", "--latent"],
    "export": ["--samples", "--param-bw", "--act-bw", "--soc-model", "--htp-threshold-db", "--weights", "--form",
               "--kind", "--preset", "--seed", "--rewrite", "--no-rewrite", "--latent"],
    "demo": ["--seed"],
    "pipeline": ["--steps", "--guidance", "--conditioning-scale", "--upscale", "--process-size", "--seed", "--start",
                 "--backend", "--psnr-db", "--ssim", "--preset"],
}


@given(data=st.data())
@_settings(0.5)
def test_every_subcommand_refuses_a_bad_flag_value_before_any_work(good, tmp_path_factory, data):
    command = data.draw(st.sampled_from(sorted(FLAGS)))
    flag = data.draw(st.sampled_from(FLAGS[command]))
    if flag == "--latent":
        values = [str(v) for v in data.draw(_LATENT)]
    else:
        values = [_bad_value(data.draw, flag)]
    base = {"convert": ["--model-config", str(good["config"]), "--state-dict", str(good["safetensors"])],
            "adaround": ["--preset", "tiny", "--samples", "1", "--iterations", "1", "--only", "conv_in"],
            "export": ["--preset", "tiny", "--kind", "unet", "--samples", "1"],
            "demo": [],
            "pipeline": ["--preset", "tiny", "--process-size", "64", "--steps", "1"]}[command]
    folder = tmp_path_factory.mktemp(command)
    _check([command, *base, flag, *values], folder / "out", list(good.values()), [flag, flag.lstrip("-"), flag.lstrip("-").replace("-", "_")],
           may_succeed=False)


@given(data=st.data())
@_settings(0.25)
def test_adaround_with_a_corrupted_artifact(good, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("adaround")
    which = data.draw(st.sampled_from(["config", "safetensors", "pth", "sample"]))
    path, given_path = _corrupted(data.draw, good, which, folder)
    files = {"config": good["config"], "state_dict": good["safetensors"], "calibration": good["sample"].parent}
    key = {"config": "config", "sample": "calibration"}.get(which, "state_dict")
    files[key] = given_path
    args = ["adaround", "--model-config", str(files["config"]), "--state-dict", str(files["state_dict"]),
            "--calibration", str(files["calibration"]), "--iterations", "1", "--only", "conv_in"]
    _check(args, folder / "out", [*good.values(), path], [path.name, path.parent.name], may_succeed=True)


@given(data=st.data())
@_settings(0.25)
def test_export_with_a_corrupted_artifact(good, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("export")
    which = data.draw(st.sampled_from(["config", "safetensors", "pth", "sample"]))
    path, given_path = _corrupted(data.draw, good, which, folder, always_invalid=True)
    files = {"config": good["config"], "state_dict": good["safetensors"], "calibration": good["sample"].parent}
    key = {"config": "config", "sample": "calibration"}.get(which, "state_dict")
    files[key] = given_path
    args = ["export", "--model-config", str(files["config"]), "--state-dict", str(files["state_dict"]),
            "--calibration", str(files["calibration"])]
    _check(args, folder / "out", [*good.values(), path], [path.name, path.parent.name], may_succeed=False)


@given(data=st.data())
@_settings(0.25)
def test_check_with_a_corrupted_artifact(good, tmp_path_factory, data):
    """``check`` reads every file before any law: an unreadable one exits 2 naming it and writes nothing; one that
    still reads (a valid config with other values) is judged by the laws: exit 0 or 1, with both reports."""
    folder = tmp_path_factory.mktemp("check")
    which = data.draw(st.sampled_from(["config", "safetensors", "pth", "encodings_1.0.0", "encodings_0.6.1"]))
    path, given_path = _corrupted(data.draw, good, which, folder)
    files = {"config": good["config"], "mha": good["safetensors"], "encodings": good["encodings_1.0.0"]}
    files[{"config": "config", "safetensors": "mha", "pth": "mha"}.get(which, "encodings")] = given_path
    inputs = [*good.values(), path]
    before = _digests(inputs)
    out = folder / "out"
    code, err, _ = _run(["check", "--model", str(files["config"]), "--mha", str(files["mha"]), "--mha-encodings",
                         str(files["encodings"]), "--law", "mha-checkpoint.fits-model", "--law",
                         "mha-encodings.consistent", "--out", str(out)])
    assert _digests(inputs) == before, "an input changed"
    assert "Traceback" not in err, err[-2000:]
    if code in (0, 1):
        assert sorted(p.name for p in out.iterdir()) == ["junit.xml", "report.json"]
    else:
        assert code == 2, f"exit {code}: {err[-2000:]}"
        assert path.name in err, err[-2000:]
        assert not out.exists()
