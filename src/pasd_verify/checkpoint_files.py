"""Checkpoint files: ``.safetensors`` and ``.pth`` state dicts read and written with clear errors.

Reading checks every tensor's values (:func:`check_tensor_values`) and names the tensor at fault in a damaged file;
safetensors are read one tensor at a time (:class:`_SafetensorsReader`) and written streamed (:func:`_write_safetensors`),
so that :mod:`pasd_verify.checkpoint`'s rewrite of a 3.4 GB SD1.5 UNet never holds it in memory. A ``.pth`` is
unpickled with ``weights_only`` and never runs a file's code. Writes are atomic.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .errors import CheckpointError
from .io import atomic_path

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
# Every dtype name the safetensors format defines (its reader's own list), of which pasd-verify reads the above.
_SAFETENSORS_ALL_DTYPES = frozenset({"BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                                     "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                                     "F64", "I64", "U64", "C64"})


def checkpoint_format(path: str | os.PathLike) -> str:
    """``"safetensors"`` or ``"torch"`` from the file name; anything else is an error."""
    name = str(path).lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    raise CheckpointError(
        f"{path}: unknown checkpoint type; expected one of {SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}"
    )


def check_tensor_values(key: str, tensor: torch.Tensor, source: str) -> torch.Tensor:
    """``tensor`` as read from a checkpoint, refused when it cannot be a weight: a parameter (``.weight``,
    ``.bias``: floating point in every model this tool handles; buffers such as CLIP's ``position_ids`` may be
    integers) of an integer or bool dtype, or any NaN or infinite value, which every later stage would carry
    silently into the outputs and the encodings' ranges."""
    if key.endswith((".weight", ".bias")) and not tensor.is_floating_point():
        raise CheckpointError(f"{source}: {key} has dtype {str(tensor.dtype).removeprefix('torch.')}; a weight must "
                              "be floating point")
    # The sum is NaN or infinite whenever a value is, and allocates nothing: torch.isfinite of a whole SD1.5 conv
    # weight would hold a float copy of it (abs) and a bool mask, 150 MB more at the peak of a streamed rewrite
    # (the memory gate caught it). Only a non-finite sum, which a large float16 tensor can also overflow to, is
    # counted exactly, one bounded chunk at a time.
    if tensor.is_floating_point() and not math.isfinite(float(tensor.sum())):
        bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in tensor.reshape(-1).split(1 << 20))
        if bad:
            raise CheckpointError(f"{source}: {key} holds {bad} NaN or infinite value(s) of {tensor.numel()}")
    return tensor


def load_state_dict_file(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict from a ``.safetensors`` or ``.pth`` file, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if checkpoint_format(path) == "safetensors":
        with _open_safetensors(path) as f:
            return {key: check_tensor_values(key, f.get_tensor(key), str(path)) for key in f.keys()}
    return {key: check_tensor_values(key, tensor, str(path)) for key, tensor in _load_torch(path, mmap=mmap).items()}


def load_model_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """:func:`load_state_dict_file` for weights a model will run with: its floating tensors must share one dtype
    (a model assigned the file's tensors runs in their dtypes, and one float16 tensor among float32 ones fails deep
    in a forward as a dtype mismatch)."""
    state_dict = load_state_dict_file(path)
    dtypes: dict[torch.dtype, list[str]] = {}
    for key, tensor in state_dict.items():
        if tensor.is_floating_point():
            dtypes.setdefault(tensor.dtype, []).append(key)
    if len(dtypes) > 1:
        common = max(dtypes, key=lambda d: len(dtypes[d]))
        odd = next(d for d in dtypes if d != common)
        raise CheckpointError(f"{path}: mixes floating dtypes: {dtypes[odd][0]} is {str(odd).removeprefix('torch.')}, "
                              f"{len(dtypes[common])} tensors are {str(common).removeprefix('torch.')}; a model runs "
                              "in one dtype")
    return state_dict


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the header alone for ``.safetensors`` (memory-mapped for ``.pth``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if checkpoint_format(path) == "safetensors":
        with _SafetensorsReader(path) as f:
            return {k: tuple(f.dtype_and_shape(k)[1]) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in _load_torch(path, mmap=True).items()}


def check_checkpoint_matches(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                             source: str, config: str | os.PathLike | None = None) -> None:
    """Raise naming the first missing, unexpected or mis-shaped key of a checkpoint against a model (and the
    ``config`` file the model was built from, when given: either file may be the one at fault)."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) missing, e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]!r}")
        if wrong:
            parts.append(f"{wrong[0]!r} has shape {tuple(shapes[wrong[0]])}, the model {tuple(expected[wrong[0]])}")
        against = f"the model config {config}" if config is not None else "the model config"
        raise CheckpointError(f"{source}: does not match {against}: " + "; ".join(parts))


def save_state_dict_file(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``state_dict`` atomically as ``.safetensors`` (tensors streamed) or ``.pth``, by the suffix."""
    fmt = checkpoint_format(path)
    with atomic_path(path) as tmp:
        if fmt == "safetensors":
            _write_safetensors(tmp, ((k, lambda t=t: t) for k, t in state_dict.items()), dict(_shapes(state_dict)))
        else:
            torch.save(dict(state_dict), tmp)


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, tuple[str, list[int]]]]:
    for key, tensor in state_dict.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{key}: dtype {tensor.dtype} cannot be stored in safetensors")
        yield key, (_SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape))


def _write_safetensors(path: Path, tensors, shapes: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file from ``(name, make_tensor)`` pairs, materialising one tensor at a time.

    The header needs every offset up front, so it is built from ``shapes`` (``name -> (dtype, shape)``)
    before any data is read; each tensor is then checked against its promised dtype and shape.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, (dtype, shape) in shapes.items():
        nbytes = _TORCH_DTYPES[dtype].itemsize * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data must start 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        # pragma: no mutate start -- the progress bar's looks, which no test can (or should) see
        progress = tqdm(tensors, total=len(shapes), desc=f"writing {Path(path).name}", unit="tensor", leave=False,
                        disable=None)
        # pragma: no mutate end
        for name, make in progress:
            tensor = make()
            dtype, shape = shapes[name]
            if _SAFETENSORS_DTYPES.get(tensor.dtype) != dtype or list(tensor.shape) != list(shape):
                raise CheckpointError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # no bytes copy


class _SafetensorsReader:
    """Reads a safetensors file one tensor at a time, with plain reads at the header's offsets.

    ``safe_open`` memory-maps the file, and every page it touches stays in the process's RSS until it closes:
    a lazy pass over a 3.4 GB checkpoint would end with 3.4 GB resident. Plain reads go through the page cache
    without mapping it, so only the tensor in hand counts. ``safe_open`` still validates the file first.
    """

    def __init__(self, path: Path):
        with _open_safetensors(path) as f:
            self._metadata = f.metadata()
        self._file = open(path, "rb")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        header = json.loads(self._file.read(header_len))
        header.pop("__metadata__", None)
        # In data order, so that a pass over keys() reads the file front to back.
        self._entries = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
        self._data_start = 8 + header_len

    def __enter__(self) -> _SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self._entries)

    def metadata(self) -> dict[str, str] | None:
        return self._metadata

    def dtype_and_shape(self, key: str) -> tuple[str, list[int]]:
        return self._entries[key]["dtype"], self._entries[key]["shape"]

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        dtype = _TORCH_DTYPES[entry["dtype"]]
        if end == begin:
            return check_tensor_values(key, torch.empty(entry["shape"], dtype=dtype), self._file.name)
        buffer = bytearray(end - begin)
        self._file.seek(self._data_start + begin)
        if self._file.readinto(buffer) != len(buffer):
            raise CheckpointError(f"{self._file.name}: {key} is cut short; the file is truncated")
        return check_tensor_values(key, torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"]), self._file.name)


def _sniff(path: Path) -> str | None:
    """What a checkpoint file really is, from its first bytes: ``"safetensors"`` (a little-endian header length,
    then ``{``), ``"torch"`` (a zip archive, or a legacy pickle) or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8:
        return "safetensors"
    return None


def _other_format(path: Path, expected: str) -> str:
    """A hint where ``path`` is a checkpoint of the other format under the wrong suffix."""
    found = _sniff(path)
    if found is None or found == expected:
        return ""
    suffix = ".safetensors" if found == "safetensors" else ".pth"
    return f"; the file is really a {found} checkpoint: rename it to end in {suffix}"


def _tensor_at_fault(path: Path) -> str:
    """Where safetensors refuses a header without naming the tensor (an unknown dtype, a shape that does not fit its
    offsets): the first entry at fault, read from the header when its length fits the file, else nothing."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size - 8:
                return ""
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return ""
    if not isinstance(header, dict):
        return ""
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return f"; tensor {name!r}: its entry is not an object"
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_ALL_DTYPES:
            return f"; tensor {name!r}: dtype {dtype!r} is not a safetensors dtype"
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            return f"; tensor {name!r}: shape {shape!r} is not a list of sizes"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
            return f"; tensor {name!r}: data_offsets {offsets!r} is not [begin, end]"
        needed = math.prod(shape) * _TORCH_DTYPES[dtype].itemsize if dtype in _TORCH_DTYPES else None
        if needed is not None and offsets[1] - offsets[0] != needed:
            return (f"; tensor {name!r}: shape {shape} of {dtype} needs {needed} bytes, its data_offsets "
                    f"{offsets} hold {offsets[1] - offsets[0]}")
    return ""


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}){_tensor_at_fault(path)}"
                              f"{_other_format(path, 'safetensors')}") from e


def _unpickling_reason(error: Exception) -> str:
    """torch's weights-only refusal without its advice to load with ``weights_only=False`` or to allow-list the
    global, either of which would run the file's code: only the sentence that says what the file holds."""
    for line in str(error).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line.startswith(("Trying to load unsupported GLOBAL", "Unsupported operand", "Unsupported global")):
            return line.split(". ")[0].rstrip(".")
    return type(error).__name__


def _load_torch(path: Path, *, mmap: bool) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        other = _other_format(path, "torch")
        if other:
            raise CheckpointError(f"{path}: not a readable torch checkpoint{other}") from e
        reason = _unpickling_reason(e)
        if "GLOBAL" in reason:
            raise CheckpointError(f"{path}: refused: the pickle holds more than tensors ({reason}); pasd-verify never "
                                  "runs a checkpoint's code. Save the state dict as .safetensors where the file is "
                                  "trusted") from e
        raise CheckpointError(f"{path}: not a readable torch checkpoint (UnpicklingError: {reason})") from e
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # legacy (non-zip) torch.save format cannot be memory-mapped
            return _load_torch(path, mmap=False)
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e}){_other_format(path, 'torch')}") from e
    except Exception as e:  # unpickling raises many types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})"
                              f"{_other_format(path, 'torch')}") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a flat {{name: tensor}} state dict, got {type(obj).__name__}")
    return obj
