"""The streaming, atomic checkpoint writer (safetensors, sharded above a size, or ``.pt``).

The safetensors header is computed from the shapes up front, then each tensor's bytes
are appended as soon as it is produced, so writing never needs the whole model in
memory. Every file goes to a temporary name (:func:`fedsoup.atomic.atomic_path`) and is
renamed only after all were written, the index (or the single weights file) last: a
failed or interrupted write never leaves a partial checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from fedsoup.atomic import atomic_path
from fedsoup.errors import OptionError, OutputExistsError
from fedsoup.io.formats import DTYPE_CODES, TensorInfo, dtype_str
from fedsoup.io.layout import OutputLayout

__all__ = ["write_checkpoint", "plan_shards", "parse_size"]

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
            raise OptionError("shard_size", text,
                              f"size {text!r}: expected a number of bytes, optionally with KB/MB/GB/KiB/MiB/GiB")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _SIZE_UNITS[unit])
    if size <= 0:
        raise OptionError("shard_size", text, f"size {text!r} must be positive")
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
        if info.dtype not in DTYPE_CODES:
            raise OptionError("dtype", info.dtype,
                              f"tensor {key!r}: dtype {dtype_str(info.dtype)} cannot be stored in safetensors")
        header[key] = {
            "dtype": DTYPE_CODES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def _produced(key: str, expected: TensorInfo, produce: Callable[[str], torch.Tensor]) -> torch.Tensor:
    tensor = produce(key)
    if tuple(tensor.shape) != expected.shape:
        raise RuntimeError(f"tensor {key!r}: produced shape {tuple(tensor.shape)} != planned {expected.shape}")
    return tensor if tensor.dtype == expected.dtype else tensor.to(expected.dtype)


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
            tensor = _produced(key, infos[key], produce)
            handle.write(_tensor_bytes(tensor))
            del tensor
            on_tensor(key, infos[key])


def write_checkpoint(
    output: str | os.PathLike[str],
    infos: Mapping[str, TensorInfo],
    produce: Callable[[str], torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int = 5 * 10**9,
    force: bool = False,
    on_tensor: Callable[[str, TensorInfo], None] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> list[Path]:
    """Write the tensors ``produce(key)`` for every key of ``infos``, atomically; return the files.

    Tensors are produced (and, for safetensors, written) one at a time in the order of
    ``infos``, cast to ``infos[key].dtype``, so a lazy ``produce`` keeps memory at one
    tensor. Safetensors output is sharded as ``<stem>-0000i-of-0000n.safetensors`` with
    ``<name>.index.json`` when the total exceeds ``max_shard_bytes``. ``extra_files``
    (file name -> bytes, e.g. a model directory's ``config.json``) go beside the weights.
    Every file is written under a temporary name and renamed only after all were
    written, the weights' commit point (index, or single file) last; on any error nothing
    is left behind. An existing checkpoint raises
    :class:`~fedsoup.errors.OutputExistsError` unless ``force``.
    """
    layout = OutputLayout.of(output)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    extra_files = dict(extra_files or {})
    folder = layout.main.parent
    previous = layout.existing()
    if not force and (previous or any((folder / name).exists() for name in extra_files)):
        raise OutputExistsError(str(layout.target))
    on_tensor = on_tensor or (lambda key, info: None)
    keys = list(infos)
    stale_shards = layout.old_shards() if force else []
    written: list[Path] = []
    with contextlib.ExitStack() as stack:
        # Entered first, renamed last: readers never see an index before its shards,
        # nor a directory's weights before its config.
        if layout.kind == "torch":
            commit = stack.enter_context(atomic_path(layout.main))
        else:
            shards = plan_shards(infos, max_shard_bytes)
            commit = stack.enter_context(atomic_path(layout.main if len(shards) == 1 else layout.index))
        for name, data in extra_files.items():
            stack.enter_context(atomic_path(folder / name)).write_bytes(data)
            written.append(folder / name)
        if layout.kind == "torch":
            tensors = {}
            for key in keys:
                tensors[key] = _produced(key, infos[key], produce)
                on_tensor(key, infos[key])
            torch.save(tensors, commit)
            written.append(layout.main)
        elif len(shards) == 1:
            _write_safetensors_stream(commit, infos, shards[0], produce, {"format": "pt", **metadata}, on_tensor)
            written.append(layout.main)
        else:
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
            commit.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            written.append(layout.index)
    # Only after the new checkpoint is complete: drop what is left of the old one.
    keep = set(written)
    for path in [*previous, *stale_shards]:
        if path not in keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return written
