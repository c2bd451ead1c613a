"""Checkpoint files in and out: lazy readers, a streaming safetensors writer, sharding.

Readers never unpickle arbitrary objects: ``.pt``/``.pth``/``.bin``/``.ckpt`` go through
``torch.load(weights_only=True)``, ``.npz`` through ``numpy.load(allow_pickle=False)``.
Safetensors files (single, or sharded with a ``*.index.json``) are read tensor by
tensor (``safe_open``), so shapes and dtypes are known from the headers alone and a
merge can visit one tensor at a time.

Writers are atomic (:func:`fedsoup.atomic.atomic_path`): a failed or interrupted write
never leaves a partial checkpoint behind. The safetensors writer streams: the header
is computed from the shapes up front, then each tensor's bytes are appended as soon
as it is produced, so writing never needs the whole model in memory.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from fedsoup.atomic import atomic_path

__all__ = [
    "InputError",
    "TensorInfo",
    "Checkpoint",
    "open_checkpoint",
    "expand_inputs",
    "check_compatible",
    "differences",
    "check_finite",
    "plan_shards",
    "parse_size",
    "output_exists",
    "save_checkpoint",
    "load_state_dict",
    "TORCH_SUFFIXES",
    "SAFETENSORS_SUFFIX",
]

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
NUMPY_SUFFIX = ".npz"
INDEX_SUFFIX = ".index.json"
# The one top-level wrapper key (checked in this order) holding the tensors of a
# training checkpoint, e.g. PyTorch Lightning's {"state_dict": ..., "epoch": ...}.
WRAPPER_KEYS = ("state_dict", "model")

# safetensors dtype codes (the format's spec); little-endian on disk.
_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPE_CODES[getattr(torch, _name)] = _code
_CODE_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class InputError(ValueError):
    """Bad user input (a file, a tensor, a setting). The command line exits with status 2."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ("," if len(shape) == 1 else "") + ")"


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- readers


class Checkpoint:
    """A read-only checkpoint: tensor infos from headers, tensors on demand.

    ``name`` is how the user spelled the path; every error message uses it.
    """

    format = "checkpoint"  # shown by `fedsoup inspect`

    def __init__(self, name: str, infos: dict[str, TensorInfo], metadata: dict[str, str] | None = None):
        self.name = name
        self.infos = infos
        self.metadata = dict(metadata or {})

    def keys(self) -> list[str]:
        return list(self.infos)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.infos.values())

    @property
    def numel(self) -> int:
        return sum(info.numel for info in self.infos.values())

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (and only that tensor, where the format allows)."""
        if key not in self.infos:
            raise InputError(f"{self.name}: no tensor {key!r}")
        return self._read(key)

    def _read(self, key: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_all(self) -> dict[str, torch.Tensor]:
        return {key: self.get(key) for key in self.infos}

    def close(self) -> None:
        """Release open files (safe to call twice)."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.infos)} tensors)"


def _safe_open(path: Path, name: str):
    """Open a safetensors file; ``pread`` (recent safetensors; 0.8 here) keeps no mapping resident.

    With the default mmap backend every page read stays mapped (and counts as resident
    memory) until the file is closed, which would defeat a tensor-by-tensor merge.
    """
    try:
        try:
            return safe_open(str(path), framework="pt", device="cpu", backend="pread")
        except TypeError:  # older safetensors: no backend argument
            return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{name}: not a readable safetensors file ({_one_line(error)})") from None


class SafetensorsCheckpoint(Checkpoint):
    """One ``.safetensors`` file, read lazily one tensor at a time."""

    format = "safetensors"

    def __init__(self, path: Path, name: str | None = None):
        self.path = Path(path)
        name = name or str(path)
        self._handle = _safe_open(self.path, name)
        infos: dict[str, TensorInfo] = {}
        try:
            for key in self._handle.keys():
                view = self._handle.get_slice(key)
                code = view.get_dtype()
                if code not in _CODE_DTYPES:
                    raise InputError(f"{name}: tensor {key!r} has unsupported dtype {code}")
                infos[key] = TensorInfo(tuple(int(size) for size in view.get_shape()), _CODE_DTYPES[code])
            metadata = self._handle.metadata() or {}
        except SafetensorError as error:
            raise InputError(f"{name}: not a readable safetensors file ({_one_line(error)})") from None
        super().__init__(name, infos, metadata)

    def _read(self, key: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise InputError(f"{self.name}: cannot read tensor {key!r} ({_one_line(error)})") from None

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None:
            handle.__exit__(None, None, None)


class InMemoryCheckpoint(Checkpoint):
    """Tensors already in memory (``.pt`` files, which cannot be read key by key)."""

    format = "pytorch"

    def __init__(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        self._tensors = tensors
        infos = {key: TensorInfo(tuple(t.shape), t.dtype) for key, t in tensors.items()}
        super().__init__(name, infos, metadata)

    def _read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        self._tensors = {}


class NpzCheckpoint(Checkpoint):
    """A ``numpy.savez`` archive; array headers are read without loading the data."""

    format = "npz"

    def __init__(self, path: Path, name: str | None = None):
        name = name or str(path)
        try:
            self._npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise InputError(f"{name}: not a readable .npz file ({_one_line(error)})") from None
        if not isinstance(self._npz, np.lib.npyio.NpzFile):
            raise InputError(f"{name}: expected a .npz archive of named arrays, found a single array")
        infos = {}
        try:
            for key in self._npz.files:
                with self._npz.zip.open(key + ".npy") as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(member)
                infos[key] = TensorInfo(tuple(shape), _torch_dtype_of_numpy(dtype, name, key))
        except InputError:
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
            raise InputError(f"{name}: not a readable .npz file ({_one_line(error)})") from None
        super().__init__(name, infos)

    def _read(self, key: str) -> torch.Tensor:
        try:
            array = self._npz[key]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise InputError(f"{self.name}: cannot read array {key!r} ({_one_line(error)})") from None
        # (np.ascontiguousarray would turn a 0-d array into shape (1,))
        return torch.from_numpy(array if array.flags.c_contiguous else array.copy(order="C"))

    def close(self) -> None:
        npz, self._npz = getattr(self, "_npz", None), None
        if npz is not None:
            npz.close()


def _torch_dtype_of_numpy(dtype: np.dtype, name: str, key: str) -> torch.dtype:
    if dtype.hasobject:
        raise InputError(f"{name}: array {key!r} holds Python objects (would need pickle); refused")
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError:
        raise InputError(f"{name}: array {key!r} has dtype {dtype}, which torch does not support") from None


class ShardedCheckpoint(Checkpoint):
    """A checkpoint split over several files, mapped by a Hugging Face style index.

    ``{"metadata": {...}, "weight_map": {"tensor name": "shard file name", ...}}``
    """

    def __init__(self, index_path: Path, name: str | None = None):
        name = name or str(index_path)
        try:
            index = json.loads(Path(index_path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{name}: not a readable index file ({_one_line(error)})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{name}: index has no 'weight_map' of tensor name -> shard file")
        folder = Path(index_path).parent
        self._shards: dict[str, Checkpoint] = {}
        self._shard_of: dict[str, Checkpoint] = {}
        try:
            for shard_name in dict.fromkeys(weight_map.values()):
                shard_path = folder / shard_name
                if Path(shard_name).is_absolute() or ".." in Path(shard_name).parts:
                    raise InputError(f"{name}: shard {shard_name!r} is outside the checkpoint folder")
                if not shard_path.is_file():
                    raise InputError(f"{name}: shard file {shard_name!r} is missing")
                self._shards[shard_name] = open_checkpoint(shard_path, name=f"{name} -> {shard_name}")
            infos: dict[str, TensorInfo] = {}
            for key, shard_name in weight_map.items():
                shard = self._shards[shard_name]
                if key not in shard.infos:
                    raise InputError(f"{shard.name}: tensor {key!r} listed in the index is not in the shard")
                infos[key] = shard.infos[key]
                self._shard_of[key] = shard
            for shard_name, shard in self._shards.items():
                for key in shard.infos:
                    if weight_map.get(key) != shard_name:
                        raise InputError(f"{shard.name}: tensor {key!r} is not in the index")
        except BaseException:
            self.close()
            raise
        metadata = index.get("metadata") or {}
        super().__init__(name, infos, {k: str(v) for k, v in metadata.items()})
        kinds = sorted({shard.format for shard in self._shards.values()})
        self.format = f"{len(self._shards)} {'/'.join(kinds)} shards"

    def _read(self, key: str) -> torch.Tensor:
        return self._shard_of[key].get(key)

    def close(self) -> None:
        for shard in getattr(self, "_shards", {}).values():
            shard.close()


def _load_torch_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` only: a file that needs more is refused, never run."""
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the outcome is what matters.
            warnings.simplefilter("ignore")
            try:
                # mmap keeps the tensors file-backed (zip format only); legacy files fall back.
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error).lower() and "zip" not in str(error).lower():
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = re.search(r"(unsupported GLOBAL \S+|Unsupported global: \S+|Unsupported operand \d+)", str(error))
        raise InputError(
            f"{name}: refused by torch.load(weights_only=True) "
            f"({reason.group(1) if reason else 'not a plain tensor file'}); FedSoup never unpickles "
            f"arbitrary objects, which could run code: re-save the state_dict or convert it to safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, struct.error) as error:
        raise InputError(f"{name}: not a readable PyTorch file ({_one_line(error)})") from None
    return unwrap_state_dict(obj, name)


def unwrap_state_dict(obj, name: str) -> dict[str, torch.Tensor]:
    """Return the tensors of ``obj``, looking inside one ``state_dict``/``model`` wrapper."""
    if not isinstance(obj, Mapping):
        raise InputError(f"{name}: expected a dict of tensors, found {type(obj).__name__}")
    for wrapper in WRAPPER_KEYS:
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"{name}: entry {key!r} is a {type(value).__name__}, not a tensor "
                f"(expected a state_dict, optionally wrapped as {{'state_dict': ...}} or {{'model': ...}})"
            )
        tensors[str(key)] = value
    if not tensors:
        raise InputError(f"{name}: holds no tensors")
    return tensors


def _find_in_directory(folder: Path, name: str) -> Path:
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        safetensors_indexes = [p for p in indexes if p.name.endswith(SAFETENSORS_SUFFIX + INDEX_SUFFIX)]
        indexes = safetensors_indexes if len(safetensors_indexes) == 1 else indexes
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        raise InputError(f"{name}: several index files ({', '.join(p.name for p in indexes)}); name one")
    for suffixes in ((SAFETENSORS_SUFFIX,), TORCH_SUFFIXES, (NUMPY_SUFFIX,)):
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InputError(f"{name}: several checkpoint files ({', '.join(p.name for p in found)}); name one")
    raise InputError(f"{name}: directory holds no checkpoint (.safetensors, *.index.json, .pt, .bin, .npz)")


def open_checkpoint(path: str | os.PathLike[str], *, name: str | None = None) -> Checkpoint:
    """Open a checkpoint file or directory for reading; raise :class:`InputError` if unusable.

    ``model.safetensors`` also finds a sharded ``model.safetensors.index.json`` next to it.
    """
    path = Path(path)
    name = name or str(path)
    if path.is_dir():
        path = _find_in_directory(path, name)
    elif not path.exists():
        sharded = path.with_name(path.name + INDEX_SUFFIX)
        if path.suffix == SAFETENSORS_SUFFIX and sharded.is_file():
            path = sharded
        else:
            raise InputError(f"{name}: no such file or directory")
    if path.name.endswith(INDEX_SUFFIX):
        return ShardedCheckpoint(path, name)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return SafetensorsCheckpoint(path, name)
    if suffix in TORCH_SUFFIXES:
        return InMemoryCheckpoint(name, _load_torch_file(path, name))
    if suffix == NUMPY_SUFFIX:
        return NpzCheckpoint(path, name)
    raise InputError(
        f"{name}: unknown checkpoint format {suffix or '(no suffix)'!r}; "
        f"expected .safetensors, .pt, .pth, .bin, .ckpt, .npz, *.index.json or a directory"
    )


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint (any supported format) into memory."""
    with open_checkpoint(path) as checkpoint:
        return checkpoint.load_all()


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand shell-style globs (``ckpt/*.safetensors``, ``runs/**/model.pt``), sorted per pattern.

    A pattern without wildcards is kept as given (its absence is reported when opened);
    a glob that matches nothing is an error, so a typo never silently drops inputs.
    """
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"{pattern}: no file matches this pattern")
            paths.extend(matches)
        else:
            paths.append(pattern)
    return paths


# --------------------------------------------------------------------------- checks


def differences(reference: Checkpoint, other: Checkpoint, limit: int | None = None) -> list[str]:
    """Why ``other`` cannot be merged with ``reference``: one line per tensor, from headers only."""
    found: list[str] = []
    for key in reference.infos:
        if key not in other.infos:
            found.append(f"{other.name}: tensor {key!r} missing (present in {reference.name})")
    for key in other.infos:
        if key not in reference.infos:
            found.append(f"{other.name}: tensor {key!r} not in {reference.name}")
    for key, expected in reference.infos.items():
        got = other.infos.get(key)
        if got is None:
            continue
        if got.shape != expected.shape:
            found.append(
                f"{other.name}: tensor {key!r} has shape {_shape_str(got.shape)}, "
                f"but {reference.name} has {_shape_str(expected.shape)}"
            )
        elif got.is_floating != expected.is_floating:
            found.append(
                f"{other.name}: tensor {key!r} is {_dtype_str(got.dtype)}, "
                f"but {reference.name} has {_dtype_str(expected.dtype)}"
            )
    return found[:limit] if limit is not None else found


def check_compatible(checkpoints: Sequence[Checkpoint], reference: Checkpoint | None = None) -> None:
    """Same tensor names, shapes and kinds (floating or not) everywhere, from headers only.

    Raises :class:`InputError` naming the file and tensor of the first difference, so a
    mismatch is found before any tensor data is read.
    """
    if not checkpoints:
        raise InputError("no input checkpoints")
    reference = reference or checkpoints[0]
    for checkpoint in checkpoints:
        if checkpoint is reference:
            continue
        found = differences(reference, checkpoint)
        if found:
            more = f" (and {len(found) - 1} more differences)" if len(found) > 1 else ""
            raise InputError(found[0] + more)


def check_finite(tensor: torch.Tensor, name: str, key: str) -> torch.Tensor:
    """Refuse NaN/Inf in a floating tensor, naming the file and tensor."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise InputError(f"{name}: tensor {key!r} contains {kind} values")
    return tensor


# --------------------------------------------------------------------------- writers

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"``, ``"1e6"``, or a plain byte count."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise InputError(f"size {text!r}: expected a number of bytes, optionally with KB/MB/GB/KiB/MiB/GiB")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _SIZE_UNITS[unit])
    if size <= 0:
        raise InputError(f"size {text!r} must be positive")
    return size


def plan_shards(infos: Mapping[str, TensorInfo], max_shard_bytes: int) -> list[list[str]]:
    """Split tensor names, in order, into shards of at most ``max_shard_bytes`` each.

    A tensor larger than the limit gets a shard of its own (tensors are never split).
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for key, info in infos.items():
        if current and current_bytes + info.nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += info.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _safetensors_header(infos: Mapping[str, TensorInfo], keys: Sequence[str], metadata: Mapping[str, str]) -> bytes:
    """The JSON header of a safetensors file holding ``keys`` in that order.

    Format: 8-byte little-endian header length, JSON header (padded with spaces to a
    multiple of 8 so the data is aligned), then the tensors' raw bytes back to back.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key in keys:
        info = infos[key]
        if info.dtype not in _DTYPE_CODES:
            raise InputError(f"tensor {key!r}: dtype {_dtype_str(info.dtype)} cannot be stored in safetensors")
        header[key] = {
            "dtype": _DTYPE_CODES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def _write_safetensors_stream(
    path: Path,
    infos: Mapping[str, TensorInfo],
    keys: Sequence[str],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str],
    on_tensor: Callable[[str, TensorInfo], None],
) -> None:
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian on disk
        raise RuntimeError("the streaming safetensors writer needs a little-endian machine")
    with open(path, "wb") as handle:
        handle.write(_safetensors_header(infos, keys, metadata))
        for key in keys:
            expected = infos[key]
            tensor = produce(key)
            if tuple(tensor.shape) != expected.shape:
                raise RuntimeError(f"tensor {key!r}: produced shape {tuple(tensor.shape)} != planned {expected.shape}")
            if tensor.dtype != expected.dtype:
                tensor = tensor.to(expected.dtype)
            handle.write(_tensor_bytes(tensor))
            del tensor
            on_tensor(key, expected)


def _shard_file_name(stem: str, index: int, count: int) -> str:
    return f"{stem}-{index:05d}-of-{count:05d}{SAFETENSORS_SUFFIX}"


@dataclass(frozen=True)
class OutputLayout:
    """Where a checkpoint goes: the main file, or its shards plus an index."""

    target: Path  # what the user named (a file, or a directory for Hugging Face layout)
    main: Path  # the single-file path (e.g. out/model.safetensors)
    index: Path  # the index path used when sharded (main + ".index.json")
    kind: str  # "safetensors" or "torch"

    @staticmethod
    def of(output: str | os.PathLike[str]) -> OutputLayout:
        as_directory = str(output).endswith(("/", os.sep))
        output = Path(output)
        suffix = "" if as_directory else output.suffix.lower()
        if suffix in TORCH_SUFFIXES:
            return OutputLayout(output, output, output, "torch")
        if suffix == SAFETENSORS_SUFFIX:
            return OutputLayout(output, output, output.with_name(output.name + INDEX_SUFFIX), "safetensors")
        if suffix and not output.is_dir():
            raise InputError(
                f"{output}: unknown output format {suffix!r}; use .safetensors, .pt/.pth/.bin, "
                f"or a directory (written as model.safetensors, sharded when large)"
            )
        main = output / ("model" + SAFETENSORS_SUFFIX)
        return OutputLayout(output, main, main.with_name(main.name + INDEX_SUFFIX), "safetensors")

    def existing(self) -> list[Path]:
        """Files of a previous checkpoint at this destination."""
        found = [p for p in (self.main, self.index) if p.is_file()]
        return list(dict.fromkeys(found))

    def shard_path(self, index: int, count: int) -> Path:
        return self.main.with_name(_shard_file_name(self.main.name[: -len(SAFETENSORS_SUFFIX)], index, count))


def output_exists(output: str | os.PathLike[str]) -> bool:
    return bool(OutputLayout.of(output).existing())


def _old_shards(layout: OutputLayout) -> list[Path]:
    if layout.kind != "safetensors" or not layout.index.is_file():
        return []
    try:
        weight_map = json.loads(layout.index.read_text(encoding="utf-8")).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return []
    folder = layout.index.parent
    return [folder / name for name in dict.fromkeys(weight_map.values()) if "/" not in name and "\\" not in name]


def save_checkpoint(
    output: str | os.PathLike[str],
    infos: Mapping[str, TensorInfo],
    produce: Callable[[str], torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int = 5 * 10**9,
    force: bool = False,
    on_tensor: Callable[[str, TensorInfo], None] | None = None,
) -> list[Path]:
    """Write the tensors ``produce(key)`` for every key of ``infos``, atomically; return the files.

    Tensors are produced (and, for safetensors, written) one at a time in the order of
    ``infos``, so a lazy ``produce`` keeps memory at one tensor. Safetensors output is
    sharded as ``<stem>-0000i-of-0000n.safetensors`` with ``<name>.index.json`` when the
    total exceeds ``max_shard_bytes``. Every file is written to a temporary name first
    and renamed only after all were written, the index last; on any error nothing is
    left behind. An existing checkpoint is refused unless ``force``.
    """
    layout = OutputLayout.of(output)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    previous = layout.existing()
    if previous and not force:
        raise InputError(f"{layout.target}: output exists (use --force to overwrite)")
    on_tensor = on_tensor or (lambda key, info: None)
    keys = list(infos)

    if layout.kind == "torch":
        tensors = {}
        for key in keys:
            tensors[key] = produce(key)
            on_tensor(key, infos[key])
        with atomic_path(layout.main) as tmp:
            torch.save(tensors, tmp)
        return [layout.main]

    stale_shards = _old_shards(layout) if force else []
    shards = plan_shards(infos, max_shard_bytes)
    written: list[Path] = []
    with contextlib.ExitStack() as stack:
        if len(shards) == 1:
            tmp = stack.enter_context(atomic_path(layout.main))
            _write_safetensors_stream(tmp, infos, shards[0], produce, {"format": "pt", **metadata}, on_tensor)
            written.append(layout.main)
        else:
            # Entered first, so renamed last: readers never see an index before its shards.
            index_tmp = stack.enter_context(atomic_path(layout.index))
            weight_map: dict[str, str] = {}
            for number, shard_keys in enumerate(shards, start=1):
                shard_path = layout.shard_path(number, len(shards))
                tmp = stack.enter_context(atomic_path(shard_path))
                _write_safetensors_stream(tmp, infos, shard_keys, produce, {"format": "pt"}, on_tensor)
                weight_map.update({key: shard_path.name for key in shard_keys})
                written.append(shard_path)
            index = {
                "metadata": {"total_size": sum(info.nbytes for info in infos.values()), **metadata},
                "weight_map": weight_map,
            }
            index_tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            written.append(layout.index)
    # Only after the new checkpoint is complete: drop what is left of the old one.
    keep = set(written)
    for path in [*previous, *stale_shards]:
        if path not in keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return written


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
