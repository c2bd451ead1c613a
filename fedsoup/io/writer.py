"""The streaming, atomic checkpoint writer (safetensors, sharded above a size, or ``.pt``).

The safetensors header is computed from the shapes up front, then each tensor's bytes
are appended as soon as it is produced, so writing never needs the whole model in
memory. Every file goes to a temporary name (:func:`fedsoup.atomic.atomic_path`) and is
renamed only after all were written, the index (or the single weights file) last: a
failed or interrupted write never leaves a partial checkpoint behind, and a writer killed
outright leaves temporary files the next write of the same output removes
(:mod:`fedsoup.atomic`).

Overwriting (``force``) replaces only what fedsoup itself writes for that output: the
weights file, its index, the shard files of the same stem
(``<stem>-NNNNN-of-NNNNN.safetensors``) and the files it writes beside them (a model
directory's ``config.json``..., or one folder deep, its
``additional_chat_templates/<name>.jinja``). Only regular files: links, folders and every
other name (whatever an old index lists) are left alone, a link or file where such a
folder goes is refused (never written through), and all of it is decided before anything
is written. Never a file of the merge's own inputs (``inputs_to_keep``, compared by device
and inode, so through links and hard links): one of them among the files a write would
replace or remove is refused, even with ``force`` (:func:`check_keeps_inputs`). OS errors of
the write are :class:`~fedsoup.errors.OutputError` naming the output file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsoup.atomic import atomic_path
from fedsoup.errors import OptionError, OutputError, OutputExistsError
from fedsoup.io.formats import DTYPE_CODES, SAFETENSORS_SUFFIX, TensorInfo, dtype_str
from fedsoup.io.layout import OutputLayout
from fedsoup.rounding import round_to

__all__ = ["write_checkpoint", "write_safetensors", "plan_shards", "parse_size", "check_keeps_inputs"]

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
    return round_to(tensor, expected.dtype)  # once, also from float64 (torch's cast would round twice)


class _Sink:
    """An open output file whose OS errors name the destination, with an optional running hash."""

    def __init__(self, handle, destination: Path, digest=None) -> None:
        self._handle, self.destination, self.digest = handle, destination, digest
        self.error: OutputError | None = None  # the first failure, for writers that hide it (torch.save)

    def write(self, data) -> int:
        try:
            written = self._handle.write(data)
        except OSError as error:
            self.error = OutputError(self.destination, error)
            raise self.error from None
        if self.digest is not None:
            self.digest.update(data)
        return written

    def flush(self) -> None:
        try:
            self._handle.flush()
        except OSError as error:
            self.error = OutputError(self.destination, error)
            raise self.error from None


@contextlib.contextmanager
def _sink(tmp: Path, destination: Path, digest=None) -> Iterator[_Sink]:
    """``tmp`` opened for writing; every OS error (open, write, the last flush) is an OutputError."""
    try:
        handle = open(tmp, "wb")
    except OSError as error:
        raise OutputError(destination, error) from None
    sink = _Sink(handle, destination, digest)
    try:
        yield sink
        sink.flush()  # here, not in close(), so that a full disk is reported as such
    except BaseException:
        with contextlib.suppress(OSError):  # the buffer cannot go anywhere either: keep the first error
            handle.close()
        raise
    try:
        handle.close()
    except OSError as error:
        raise OutputError(destination, error) from None


def _write_safetensors_stream(
    sink: _Sink,
    infos: Mapping[str, TensorInfo],
    keys: Sequence[str],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str],
    on_tensor: Callable[[str, TensorInfo], None],
) -> None:
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian on disk
        raise RuntimeError("the streaming safetensors writer needs a little-endian machine")
    sink.write(_safetensors_header(infos, keys, metadata))
    for key in keys:
        tensor = _produced(key, infos[key], produce)
        sink.write(_tensor_bytes(tensor))
        del tensor
        on_tensor(key, infos[key])


def write_safetensors(
    destination: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``tensors`` to one safetensors file atomically; return its SHA-256 (hex).

    The hash is of the bytes written, computed while writing (the file is not read back).
    OS errors are :class:`~fedsoup.errors.OutputError` naming ``destination``.
    """
    destination = Path(destination)
    infos = {key: TensorInfo(tuple(tensor.shape), tensor.dtype) for key, tensor in tensors.items()}
    digest = hashlib.sha256()
    with atomic_path(destination) as tmp, _sink(tmp, destination, digest) as sink:
        _write_safetensors_stream(sink, infos, list(infos), tensors.__getitem__,
                                  {str(k): str(v) for k, v in (metadata or {}).items()}, lambda key, info: None)
    return digest.hexdigest()


@dataclass(frozen=True)
class _OutputPlan:
    """The files a write creates (commit point last) and the old files of the same output it removes."""

    shards: list[list[str]] | None  # tensor names per safetensors shard; None for .pt
    files: list[Path]  # what is written, renamed in this order, the commit point last
    stale: list[Path]  # fedsoup's own files of this output that the new one does not replace
    subfolders: list[Path]  # the folders inside the output folder that extra files go in


def _own_shard_pattern(layout: OutputLayout) -> re.Pattern[str]:
    stem = layout.main.name[: -len(SAFETENSORS_SUFFIX)]
    return re.compile(rf"^{re.escape(stem)}-\d{{5}}-of-\d{{5}}{re.escape(SAFETENSORS_SUFFIX)}$")


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_real_folder(path: Path) -> bool:
    """A folder, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _check_relative_name(option: str, name: str, *, depth: int) -> None:
    """Refuse a name that is not ``depth`` or fewer plain components (``config.json``,
    ``additional_chat_templates/tool_use.jinja``): nothing is written or removed outside
    the output folder."""
    parts = name.replace(os.sep, "/").split("/") if isinstance(name, str) else [""]
    if not 1 <= len(parts) <= depth or any(part in ("", ".", "..") for part in parts):
        what = "a file name" if depth == 1 else f"a file name or a relative path of at most {depth} plain components"
        raise OptionError(option, name, f"{option} entry {name!r}: {what}")


def _subfolders(folder: Path, extra_files: Mapping[str, bytes]) -> list[Path]:
    """The folders inside ``folder`` that the extra files one folder deep go in, in order."""
    return list(dict.fromkeys((folder / name).parent for name in extra_files if "/" in name))


def _own_files(layout: OutputLayout, sidecars: Sequence[str]) -> list[Path]:
    """fedsoup's own files of this output, whatever it writes this time: the weights file, its
    index, the sidecars, and the shard files of the same stem now in the folder."""
    folder = layout.main.parent
    own = [layout.main, layout.index, *(folder / name for name in sidecars)]
    if layout.kind == "safetensors":
        pattern = _own_shard_pattern(layout)
        with contextlib.suppress(OSError):
            own += sorted(folder / name for name in os.listdir(folder) if pattern.match(name))
    return list(dict.fromkeys(own))


def _identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``path`` is (links followed), or ``None`` when nothing is there."""
    try:
        found = os.stat(path)
    except (OSError, ValueError):
        return None
    return found.st_dev, found.st_ino


def _refuse_inputs(layout: OutputLayout, replaced: Sequence[Path], inputs_to_keep: Sequence[Path]) -> None:
    """Raise :class:`OutputError` (``path``: the output file) when a file in ``replaced`` is one of
    ``inputs_to_keep`` (the same file: device and inode), or when the output is a model
    directory that is a folder in ``inputs_to_keep`` (an input's model directory)."""
    kept: dict[tuple[int, int], Path] = {}
    for path in inputs_to_keep:
        identity = _identity(Path(path))
        if identity is not None:
            kept.setdefault(identity, Path(path))
    if not kept:
        return
    advice = "fedsoup never overwrites its inputs, even with --force; write the merge elsewhere"
    for path in replaced:
        identity = _identity(path)
        if identity in kept and not kept[identity].is_dir():
            raise OutputError(path, reason=f"is an input of this merge ({kept[identity]}): {advice}")
    folder = _identity(layout.main.parent) if layout.is_directory else None
    if folder in kept:
        raise OutputError(layout.main, reason=f"is an input of this merge (the model directory {kept[folder]}): "
                                              f"a model directory written there would replace that model; "
                                              f"{advice}")


def check_keeps_inputs(output: str | os.PathLike[str], inputs_to_keep: Sequence[str | os.PathLike[str]], *,
                       extra_files: Iterable[str] = (), sidecars: Sequence[str] = ()) -> None:
    """Refuse, before a merge reads anything, an output whose write would replace or remove one
    of ``inputs_to_keep``: what :func:`write_checkpoint` (given the same ``inputs_to_keep``)
    refuses once it knows the shards, checked on every file it may replace or remove whatever
    their number (the weights file, its index, the shards of the same stem, the ``sidecars``
    and the ``extra_files`` written beside them). A folder in ``inputs_to_keep`` is an input's
    model directory: a directory output there is refused too.

    Raises:
        OutputError: ``path`` is the output file that is an input, ``reason`` names the input.
    """
    layout = OutputLayout.of(output)
    folder = layout.main.parent
    replaced = [*_own_files(layout, tuple(sidecars)), *(folder / name for name in extra_files)]
    _refuse_inputs(layout, replaced, [Path(path) for path in inputs_to_keep])


def _plan_output(layout: OutputLayout, infos: Mapping[str, TensorInfo], max_shard_bytes: int,
                 extra_files: Mapping[str, bytes], sidecars: Sequence[str], force: bool,
                 inputs_to_keep: Sequence[Path] = ()) -> _OutputPlan:
    """Decide, before anything is written, what goes where and what an overwrite removes.

    Raises :class:`OutputExistsError` when any of it exists and ``force`` is off, and
    :class:`OutputError` when something fedsoup does not write (a folder, a link, a named
    pipe) is where a file or a sidecar goes, or when a file it would replace or remove is
    one of ``inputs_to_keep``, even with ``force``.
    """
    folder = layout.main.parent
    for name in extra_files:
        _check_relative_name("extra_files", name, depth=2)
    for name in sidecars:
        _check_relative_name("sidecars", name, depth=1)
    subfolders = _subfolders(folder, extra_files)
    for path in subfolders:  # checked first: a file's own check would look through a link here
        if os.path.lexists(path) and not _is_real_folder(path):
            kind = "a symbolic link" if path.is_symlink() else "a file" if _is_regular_file(path) else "not a folder"
            raise OutputError(path, reason=f"{kind} is in the way (fedsoup writes into a folder there, never "
                                           f"through a link or over a file)")
    shards = None if layout.kind == "torch" else plan_shards(infos, max_shard_bytes)
    if shards is None or len(shards) == 1:
        weights = [layout.main]
    else:
        weights = [*(layout.shard_path(i, len(shards)) for i in range(1, len(shards) + 1)), layout.index]
    extras = [folder / name for name in extra_files]
    files = [*extras, *weights]
    stale = [path for path in _own_files(layout, sidecars) if path not in files and _is_regular_file(path)]
    _refuse_inputs(layout, [*weights, *stale, *(folder / name for name in sidecars), *extras], inputs_to_keep)
    for path in [*files, *(folder / name for name in sidecars)]:  # a sidecar replaced later: refused now
        if os.path.lexists(path) and not _is_regular_file(path):
            kind = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "not a regular file"
            raise OutputError(path, reason=f"{kind} is in the way (fedsoup replaces only files it writes)")
    if not force and (stale or any(os.path.lexists(path) for path in files)):
        raise OutputExistsError(str(layout.target))
    return _OutputPlan(shards, files, stale, subfolders)


def _unlink_regular(path: Path) -> bool:
    """Remove ``path`` if it is a regular file (never a link or a folder); True if it was."""
    if not _is_regular_file(path):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def _drop_old_index_before_renames(index: Path):
    """An exit callback for the write's ExitStack, pushed last so that it runs first: once
    every file is written, an old index goes before the new shards are renamed over the old
    ones, so that no moment shows it beside shards it does not describe."""

    def drop(kind, error, trace) -> bool:
        if kind is None:
            _unlink_regular(index)
        return False  # never swallows an exception

    return drop


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        missing.append(parent)
    return missing[::-1]


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
    sidecars: Sequence[str] = (),
    before_rename: Callable[[], None] | None = None,
    inputs_to_keep: Sequence[str | os.PathLike[str]] = (),
) -> list[Path]:
    """Write the tensors ``produce(key)`` for every key of ``infos``, atomically; return the files.

    Tensors are produced (and, for safetensors, written) one at a time in the order of
    ``infos``, cast to ``infos[key].dtype``, so a lazy ``produce`` keeps memory at one
    tensor. Safetensors output is sharded as ``<stem>-0000i-of-0000n.safetensors`` with
    ``<name>.index.json`` when the total exceeds ``max_shard_bytes``. ``extra_files``
    (file name -> bytes, e.g. a model directory's ``config.json``) go beside the weights; a
    name may be one folder deep (``additional_chat_templates/tool_use.jinja``: plain
    components, no ``..``), the folder created if missing (and removed again on error), never
    written through a link or over a file.
    ``sidecars`` names files the caller writes beside this output afterwards (the report
    of a tensor-by-tensor merge): part of the output for ``force`` (an old one is removed
    with the old output) and for the existence check. ``before_rename`` is called once every
    file is written, before the first rename: what it raises leaves no new file and the old
    output as it was. ``inputs_to_keep``: the files the caller read to produce this output (and
    the model directories they are in): a write that would replace or remove one of them is
    refused, even with ``force`` (compared by device and inode, so through links).
    Every file is written under a temporary name and renamed only after all were
    written, the weights' commit point (index, or single file) last; on any error nothing
    is left behind (not even the folders it created).

    Raises:
        OutputExistsError: a file of this output exists and ``force`` is off.
        OutputError: the output cannot be written (permission, full disk, a folder or link
            where a file goes, one of ``inputs_to_keep``), naming the file; checked before
            writing where possible.
    """
    layout = OutputLayout.of(output)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    extra_files = dict(extra_files or {})
    folder = layout.main.parent
    plan = _plan_output(layout, infos, max_shard_bytes, extra_files, tuple(sidecars), force,
                        [Path(path) for path in inputs_to_keep])
    on_tensor = on_tensor or (lambda key, info: None)
    created = _missing_folders(folder) + [path for path in plan.subfolders if not os.path.lexists(path)]
    fresh = [path for path in plan.files if not os.path.lexists(path)]
    renaming = False
    try:
        for made in [folder, *plan.subfolders]:
            try:
                made.mkdir(parents=made == folder, exist_ok=True)
            except OSError as error:
                raise OutputError(made, error) from None
        with contextlib.ExitStack() as stack:
            # Entered first, renamed last: readers never see an index before its shards,
            # nor a directory's weights before its config.
            commit = stack.enter_context(atomic_path(plan.files[-1]))
            for name, data in extra_files.items():
                tmp = stack.enter_context(atomic_path(folder / name))
                with _sink(tmp, folder / name) as sink:
                    sink.write(data)
            if plan.shards is None:
                tensors = {}
                for key in infos:
                    tensors[key] = _produced(key, infos[key], produce)
                    on_tensor(key, infos[key])
                with _sink(commit, layout.main) as sink:
                    # A file object: torch.save on a path reports a full disk as "unexpected pos",
                    # and names its zip archive after the (random) temporary file.
                    try:
                        torch.save(tensors, sink)
                    except RuntimeError:
                        if sink.error is not None:
                            raise sink.error from None
                        raise
            elif len(plan.shards) == 1:
                with _sink(commit, layout.main) as sink:
                    _write_safetensors_stream(sink, infos, plan.shards[0], produce, {"format": "pt", **metadata},
                                              on_tensor)
            else:
                weight_map: dict[str, str] = {}
                for shard_path, shard_keys in zip(plan.files[len(extra_files):-1], plan.shards):
                    tmp = stack.enter_context(atomic_path(shard_path))
                    with _sink(tmp, shard_path) as sink:
                        _write_safetensors_stream(sink, infos, shard_keys, produce, {"format": "pt"}, on_tensor)
                    weight_map.update({key: shard_path.name for key in shard_keys})
                index = {
                    "metadata": {"total_size": sum(info.nbytes for info in infos.values()), **metadata},
                    "weight_map": weight_map,
                }
                with _sink(commit, layout.index) as sink:
                    sink.write((json.dumps(index, indent=2) + "\n").encode("utf-8"))
                stack.push(_drop_old_index_before_renames(layout.index))
            if before_rename is not None:
                before_rename()
            renaming = True
    except BaseException:
        if renaming:  # interrupted between the renames (SIGTERM): the files this write created go too
            for path in fresh:
                _unlink_regular(path)
        for made in reversed(created):
            with contextlib.suppress(OSError):
                made.rmdir()  # only if empty: never a file of anyone's
        raise
    # Only after the new checkpoint is complete: drop what is left of the old one.
    for path in plan.stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return list(plan.files)
