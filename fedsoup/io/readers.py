"""Checkpoint readers: tensor names, shapes and dtypes from headers; tensors on demand.

Readers never unpickle arbitrary objects: ``.pt``/``.pth``/``.bin``/``.ckpt`` go through
``torch.load(weights_only=True)``, ``.npz`` through ``numpy.load(allow_pickle=False)``.
Safetensors files (single, or sharded with a ``*.index.json``) are read lazily, tensor
by tensor (``safe_open``), so a merge can visit one tensor at a time. Every failure is a
:class:`~fedsoup.errors.MergeInputError` whose ``path`` is the file as the user spelled it.

This module opens one weights file (or index) whose path is known; which file a user's
path means (a model directory, a missing ``model.safetensors`` beside its index) is
:mod:`fedsoup.io.resolve`.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from fedsoup.errors import MergeInputError, os_reason
from fedsoup.io.formats import (
    CODE_DTYPES,
    INDEX_SUFFIX,
    NUMPY_SUFFIX,
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    WRAPPER_KEYS,
    TensorInfo,
    one_line,
)
from fedsoup.io.npy import read_npy_header
from fedsoup.report import counted

__all__ = [
    "Checkpoint",
    "SafetensorsCheckpoint",
    "InMemoryCheckpoint",
    "TorchCheckpoint",
    "NpzCheckpoint",
    "ShardedCheckpoint",
    "open_weights_file",
    "refuse_special_file",
    "unwrap_state_dict",
    "without_tensors",
]


class Checkpoint:
    """A read-only checkpoint: tensor infos from headers, tensors on demand.

    ``name`` is how the user spelled the path; every error uses it as its ``path``.
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
            raise MergeInputError("no such tensor", key=key, path=self.name)
        return self._read(key)

    def _read(self, key: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, in file order."""
        return {key: self.get(key) for key in self.infos}

    def check_unchanged(self) -> None:
        """Raise :class:`MergeInputError` if the file was written to since it was opened.

        Tensors are read as the merge goes (mapped): bytes another program writes into an
        input mid-merge would reach the merge, whose result would then be of no version of
        the file. A merge calls this once all is read, before its output is renamed into
        place. (Nothing to check by default: a format read whole at open.)
        """

    def close(self) -> None:
        """Release open files (safe to call twice)."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.infos)} tensors)"


class _WithoutTensors(Checkpoint):
    """A checkpoint with some of its tensors left out, read through it (:func:`without_tensors`)."""

    def __init__(self, checkpoint: Checkpoint, left_out: set[str] | dict[str, str]):
        self._whole = checkpoint
        self.format = checkpoint.format
        infos = {key: info for key, info in checkpoint.infos.items() if key not in left_out}
        super().__init__(checkpoint.name, infos, checkpoint.metadata)

    def _read(self, key: str) -> torch.Tensor:
        return self._whole.get(key)

    def load_all(self) -> dict[str, torch.Tensor]:
        loaded = self._whole.load_all()  # (one mapping of the file: the tensors left out cost nothing)
        return {key: loaded[key] for key in self.infos}

    def check_unchanged(self) -> None:
        self._whole.check_unchanged()

    def close(self) -> None:
        self._whole.close()


def without_tensors(checkpoint: Checkpoint, left_out: set[str] | dict[str, str]) -> Checkpoint:
    """``checkpoint`` as if it did not hold the tensors named in ``left_out`` (the tied copies of
    :func:`fedsoup.io.checks.tied_copies`): neither listed nor read. Closing it closes ``checkpoint``."""
    return _WithoutTensors(checkpoint, left_out) if left_out else checkpoint


def refuse_special_file(path: Path, name: str) -> None:
    """A path that is there but neither a regular file nor a directory (a named pipe, a
    socket, ``/dev/null``) is refused as such, never opened (opening a named pipe blocks)
    and never reported as missing."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise MergeInputError("not a regular file (a pipe, socket or device)", path=name)


def _check_readable(path: Path, name: str) -> None:
    """A file that is there but cannot be opened (mode 0600 of another user) is reported as
    such: safetensors and torch say "No such file or directory" for it."""
    refuse_special_file(path, name)
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise MergeInputError("no such file or directory", path=name) from None
    except OSError as error:
        raise MergeInputError(f"cannot be read: {os_reason(error)}", path=name) from None


def _safe_open(path: Path, name: str):
    """Open (and so validate) a safetensors file: header, dtypes, shapes and offsets within the file.

    ``pread``: this handle never reads a tensor (:class:`SafetensorsCheckpoint` maps them) and
    so needs no mapping of the whole file.
    """
    try:
        try:
            return safe_open(str(path), framework="pt", device="cpu", backend="pread")
        except TypeError:  # older safetensors: no backend argument
            return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        _check_readable(path, name)
        raise MergeInputError(f"not a readable safetensors file ({one_line(error)})", path=name) from None


def _data_offsets(file, name: str) -> dict[str, tuple[int, int, str, tuple[int, ...]]]:
    """Each tensor's byte range ``[begin, end)`` in the file, dtype code and shape, by the
    format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON header
    (``dtype``, ``shape``, ``data_offsets`` relative to the end of the header), then the data."""
    file.seek(0)
    size = os.fstat(file.fileno()).st_size
    try:
        (length,) = struct.unpack("<Q", file.read(8))
        if length > size - 8:
            raise MergeInputError(f"not a readable safetensors file (a header of {length} bytes in a file of "
                                  f"{size})", path=name)
        header = json.loads(file.read(length))
        data_start = 8 + length
        offsets = {}
        for key, entry in header.items():
            if key != "__metadata__":
                begin, end = (int(offset) for offset in entry["data_offsets"])
                if not 0 <= begin <= end <= size - data_start:
                    raise MergeInputError(f"not a readable safetensors file (bytes {begin}..{end} are outside "
                                          f"the data)", key=key, path=name)
                offsets[key] = (data_start + begin, data_start + end, str(entry["dtype"]),
                                tuple(int(dim) for dim in entry["shape"]))
    except (struct.error, ValueError, TypeError, KeyError, AttributeError) as error:
        if isinstance(error, MergeInputError):  # (a ValueError)
            raise
        raise MergeInputError(f"not a readable safetensors file ({one_line(error)})", path=name) from None
    return offsets


def _file_stamp(file) -> tuple[int, int]:
    """What writing into an open file changes: its size and modification time."""
    status = os.fstat(file.fileno())
    return status.st_size, status.st_mtime_ns


def _check_stamp(file, stamp: tuple[int, int], name: str) -> None:
    """:meth:`Checkpoint.check_unchanged` for a file held open since ``stamp`` was taken."""
    if file is not None and _file_stamp(file) != stamp:
        raise MergeInputError("changed while it was being merged (written to by another program); "
                              "merge it again once it is complete", path=name)


def _check_torch_shape(info: TensorInfo, key: str, name: str) -> None:
    """Refuse a shape torch cannot hold (a size or stride beyond int64), which safetensors
    accepts for a tensor of no elements, as a :class:`MergeInputError`, not a crash later."""
    try:
        torch.empty(info.shape, dtype=info.dtype, device="meta")
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise MergeInputError(f"shape {list(info.shape)} is too large for a torch tensor", key=key, path=name) from None


class SafetensorsCheckpoint(Checkpoint):
    """One ``.safetensors`` file; each tensor mapped from the file when it is read.

    ``safe_open`` validates the header at open; the byte ranges come from the header too
    (:func:`_data_offsets`), read from the one file descriptor the tensors are mapped from,
    whose dtypes and shapes must be the validated ones (a file renamed over the path between
    the two opens is refused, never read with another file's dtypes).
    :meth:`get` gives a copy-on-write ``mmap`` of the tensor's own bytes: reading copies
    nothing (pages come from the page cache as the merge touches them), writing to it never
    reaches the file, and its pages are unmapped when it is freed, so a tensor-by-tensor
    merge holds about one tensor per input. :meth:`load_all` maps the file's data once and
    gives views of that one mapping (one file descriptor and map area per file). Reading
    each tensor into fresh memory instead (``pread``) took 1.1 s of a 1.4 s soup of three
    500 MB files (benchmarks/bench_language_models.py); it is done only where no mapping
    can be made.
    A file truncated by another process *while* it is merged ends the process (SIGBUS), as
    with any mapped file (``torch.load(mmap=True)``, safetensors' own default); outputs are
    atomic, so nothing half-written is left.
    """

    format = "safetensors"

    def __init__(self, path: Path, name: str | None = None):
        self.path = Path(path)
        name = name or str(path)
        handle = _safe_open(self.path, name)
        infos: dict[str, TensorInfo] = {}
        try:
            for key in handle.keys():
                view = handle.get_slice(key)
                code = view.get_dtype()
                if code not in CODE_DTYPES:
                    raise MergeInputError(f"unsupported dtype {code}", key=key, path=name)
                infos[key] = TensorInfo(tuple(int(size) for size in view.get_shape()), CODE_DTYPES[code])
                if infos[key].numel == 0:  # any shape is 0 bytes; torch's shapes and strides are int64
                    _check_torch_shape(infos[key], key, name)
            metadata = handle.metadata() or {}
        except SafetensorError as error:
            raise MergeInputError(f"not a readable safetensors file ({one_line(error)})", path=name) from None
        finally:
            handle.__exit__(None, None, None)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - held until close(): tensors are mapped from it
        except OSError as error:
            raise MergeInputError(f"cannot be read: {os_reason(error)}", path=name) from None
        try:
            self._stamp = _file_stamp(self._file)
            entries = _data_offsets(self._file, name)
            for key, info in infos.items():  # the file read here is the file validated above
                begin, end, code, shape = entries.get(key, (0, -1, None, None))
                if (end - begin, CODE_DTYPES.get(code), shape) != (info.nbytes, info.dtype, info.shape):
                    raise MergeInputError("changed while it was being opened", key=key, path=name)
            self._offsets = {key: entries[key][:2] for key in infos}
        except BaseException:
            self.close()
            raise
        super().__init__(name, infos, metadata)

    def _read(self, key: str) -> torch.Tensor:
        begin, end = self._offsets[key]
        if begin == end:
            return self._tensor(key, None, 0)
        mapped, start = self._map(begin, end, key)
        return self._tensor(key, mapped, begin - start)

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, in file order, as views of one mapping of the file's data.

        One mapping and one file descriptor per file, however many tensors: a mapping per
        tensor costs a descriptor each (Python's ``mmap`` keeps a duplicate of the file's)
        and a kernel map area each, and a whole model of several inputs runs out of the
        usual 1024 open files (and ``vm.max_map_count``). :meth:`get` maps one tensor, for
        merges that hold one tensor per input at a time.
        """
        filled = [self._offsets[key] for key in self.infos if self._offsets[key][0] < self._offsets[key][1]]
        mapped, start = (None, 0) if not filled else self._map(
            min(begin for begin, _ in filled), max(end for _, end in filled), None)
        return {key: self._tensor(key, mapped, self._offsets[key][0] - start) for key in self.infos}

    def check_unchanged(self) -> None:
        _check_stamp(self._file, self._stamp, self.name)

    def _map(self, begin: int, end: int, key: str | None) -> tuple[mmap.mmap | bytearray, int]:
        """A private (copy-on-write) mapping of the file from a page boundary at or below
        ``begin`` up to ``end``, and the file offset where it starts.

        Where no mapping can be made (out of file descriptors, each mapping holding one, or
        of map areas; a file system without ``mmap``), bytes ``[begin, end)`` read into memory.
        """
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        try:
            return mmap.mmap(self._file.fileno(), end - start, offset=start, access=mmap.ACCESS_COPY), start
        except OSError:
            pass
        except ValueError as error:
            raise MergeInputError(f"cannot be read ({one_line(error)})", key=key, path=self.name) from None
        data = bytearray(end - begin)
        view, count = memoryview(data), 0
        try:
            while count < len(data):  # (from the file itself: the file object's buffer may be stale)
                got = os.preadv(self._file.fileno(), [view[count:]], begin + count)
                if got == 0:
                    raise MergeInputError(f"cannot be read (the file ends at byte {begin + count}, before {end})",
                                          key=key, path=self.name)
                count += got
        except OSError as error:
            raise MergeInputError(f"cannot be read ({one_line(error)})", key=key, path=self.name) from None
        return data, begin

    def _tensor(self, key: str, mapped: mmap.mmap | bytearray | None, offset: int) -> torch.Tensor:
        """Tensor ``key``, whose bytes start at ``offset`` in ``mapped``; it holds the mapping
        (its buffer), which is unmapped when the last tensor on it is freed."""
        info = self.infos[key]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(mapped, dtype=info.dtype, count=info.numel, offset=offset).view(info.shape)

    def close(self) -> None:
        file, self._file = getattr(self, "_file", None), None
        if file is not None:
            file.close()


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


class TorchCheckpoint(InMemoryCheckpoint):
    """A ``.pt``/``.pth``/``.bin``/``.ckpt`` file: ``torch.load(weights_only=True, mmap=True)``,
    its tensors mapped from the file (zip format), which is held open to tell whether it
    was written to meanwhile (:meth:`Checkpoint.check_unchanged`)."""

    def __init__(self, path: Path, name: str):
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - held until close()
        except OSError as error:
            raise MergeInputError(f"cannot be read: {os_reason(error)}", path=name) from None
        try:
            self._stamp = _file_stamp(self._file)
            tensors = _load_torch_file(path, name)
            held, loaded = os.fstat(self._file.fileno()), os.stat(path)
            if (held.st_dev, held.st_ino) != (loaded.st_dev, loaded.st_ino):
                raise MergeInputError("changed while it was being opened", path=name)
        except BaseException:
            self.close()
            raise
        super().__init__(name, tensors)

    def check_unchanged(self) -> None:
        _check_stamp(self._file, self._stamp, self.name)

    def close(self) -> None:
        super().close()
        file, self._file = getattr(self, "_file", None), None
        if file is not None:
            file.close()


class NpzCheckpoint(Checkpoint):
    """A ``numpy.savez`` archive; array headers are read without loading the data."""

    format = "npz"

    def __init__(self, path: Path, name: str | None = None):
        name = name or str(path)
        try:
            self._npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise MergeInputError(f"not a readable .npz file ({one_line(error)})", path=name) from None
        if not isinstance(self._npz, np.lib.npyio.NpzFile):
            raise MergeInputError("expected a .npz archive of named arrays, found a single array", path=name)
        self._stamp = _file_stamp(self._npz.fid)  # (its arrays are read as the merge asks for them)
        infos = {}
        try:
            for key in self._npz.files:
                with self._npz.zip.open(key + ".npy") as member:
                    try:
                        shape, _, dtype = read_npy_header(member)
                    except ValueError as error:
                        raise MergeInputError(f"refused: {one_line(error)}", key=key, path=name) from None
                infos[key] = TensorInfo(shape, _torch_dtype_of_numpy(dtype, name, key))
        except MergeInputError:
            self.close()
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
            self.close()
            raise MergeInputError(f"not a readable .npz file ({one_line(error)})", path=name) from None
        super().__init__(name, infos)

    def _read(self, key: str) -> torch.Tensor:
        try:
            array = self._npz[key]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise MergeInputError(f"cannot be read ({one_line(error)})", key=key, path=self.name) from None
        # (np.ascontiguousarray would turn a 0-d array into shape (1,))
        return torch.from_numpy(array if array.flags.c_contiguous else array.copy(order="C"))

    def check_unchanged(self) -> None:
        _check_stamp(None if self._npz is None else self._npz.fid, self._stamp, self.name)

    def close(self) -> None:
        npz, self._npz = getattr(self, "_npz", None), None
        if npz is not None:
            npz.close()


def _torch_dtype_of_numpy(dtype: np.dtype, name: str, key: str) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError:
        raise MergeInputError(f"dtype {dtype} is not supported by torch", key=key, path=name) from None


class ShardedCheckpoint(Checkpoint):
    """A checkpoint split over several files, mapped by a Hugging Face style index.

    ``{"metadata": {...}, "weight_map": {"tensor name": "shard file name", ...}}``
    """

    def __init__(self, index_path: Path, name: str | None = None):
        name = name or str(index_path)
        try:
            index = json.loads(Path(index_path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise MergeInputError(f"not a readable index file ({one_line(error)})", path=name) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MergeInputError("index has no 'weight_map' of tensor name -> shard file", path=name)
        folder = Path(index_path).parent
        self._shards: dict[str, Checkpoint] = {}
        self._shard_of: dict[str, Checkpoint] = {}
        try:
            for shard_name in dict.fromkeys(weight_map.values()):
                shard_path = folder / shard_name
                if Path(shard_name).is_absolute() or ".." in Path(shard_name).parts:
                    raise MergeInputError(f"shard {shard_name!r} is outside the checkpoint folder", path=name)
                if not shard_path.is_file():
                    raise MergeInputError(f"shard file {shard_name!r} is missing", path=name)
                if shard_name.endswith(INDEX_SUFFIX):  # (itself, or one listing this one: no end)
                    raise MergeInputError(f"shard {shard_name!r} is an index, not a weights file", path=name)
                self._shards[shard_name] = open_weights_file(shard_path, f"{name} -> {shard_name}")
            infos: dict[str, TensorInfo] = {}
            for key, shard_name in weight_map.items():
                shard = self._shards[shard_name]
                if key not in shard.infos:
                    raise MergeInputError("listed in the index but not in the shard", key=key, path=shard.name)
                infos[key] = shard.infos[key]
                self._shard_of[key] = shard
            for shard_name, shard in self._shards.items():
                for key in shard.infos:
                    if weight_map.get(key) != shard_name:
                        raise MergeInputError("not in the index", key=key, path=shard.name)
        except BaseException:
            self.close()
            raise
        metadata = index.get("metadata") or {}
        super().__init__(name, infos, {k: str(v) for k, v in metadata.items()})
        kinds = sorted({shard.format for shard in self._shards.values()})
        self.format = counted(len(self._shards), f"{'/'.join(kinds)} shard") if kinds else "index of no shards"

    def _read(self, key: str) -> torch.Tensor:
        return self._shard_of[key].get(key)

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, in the index's order, each shard read whole (one mapping per shard)."""
        loaded: dict[str, torch.Tensor] = {}
        for shard in self._shards.values():
            loaded.update(shard.load_all())
        return {key: loaded[key] for key in self.infos}

    def check_unchanged(self) -> None:
        for shard in self._shards.values():
            shard.check_unchanged()

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
        # torch's message is the only place that names the refused global; it goes into
        # the reason for the reader, never parsed by callers.
        refused = re.search(r"(unsupported GLOBAL \S+|Unsupported global: \S+|Unsupported operand \d+)", str(error))
        raise MergeInputError(
            f"refused by torch.load(weights_only=True) "
            f"({refused.group(1) if refused else 'not a plain tensor file'}); FedSoup never unpickles "
            f"arbitrary objects, which could run code: re-save the state_dict or convert it to safetensors",
            path=name,
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, struct.error) as error:
        raise MergeInputError(f"not a readable PyTorch file ({one_line(error)})", path=name) from None
    return unwrap_state_dict(obj, name)


def unwrap_state_dict(obj, name: str) -> dict[str, torch.Tensor]:
    """Return the tensors of ``obj``, looking inside one ``state_dict``/``model`` wrapper."""
    if not isinstance(obj, Mapping):
        raise MergeInputError(f"expected a dict of tensors, found {type(obj).__name__}", path=name)
    for wrapper in WRAPPER_KEYS:
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise MergeInputError(
                f"a {type(value).__name__}, not a tensor (expected a state_dict, optionally wrapped "
                f"as {{'state_dict': ...}} or {{'model': ...}})",
                key=str(key), path=name,
            )
        tensors[str(key)] = value
    return tensors  # (none at all is a file a merge refuses, fedsoup.io.checks.check_has_tensors)


def open_weights_file(path: Path, name: str) -> Checkpoint:
    """Open one weights file or index by its suffix (``path`` exists; ``name`` is shown in errors)."""
    path = Path(path)
    _check_readable(path, name)
    if path.name.endswith(INDEX_SUFFIX):
        return ShardedCheckpoint(path, name)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return SafetensorsCheckpoint(path, name)
    if suffix in TORCH_SUFFIXES:
        return TorchCheckpoint(path, name)
    if suffix == NUMPY_SUFFIX:
        return NpzCheckpoint(path, name)
    raise MergeInputError(
        f"unknown checkpoint format {suffix or '(no suffix)'!r}; "
        f"expected .safetensors, .pt, .pth, .bin, .ckpt, .npz, *.index.json or a directory",
        path=name,
    )
