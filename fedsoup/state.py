"""Pickle-free, atomic persistence of nested training state (safetensors + JSON).

A *state* is a nested structure of ``dict``, ``list``, ``tuple``, ``str``, ``int``,
``float``, ``bool``, ``None``, ``torch.Tensor`` and ``numpy.ndarray``: exactly what
``torch.optim.Optimizer.state_dict()`` returns, plus model state dicts and counters.
It is split into

* the tensors, written to one ``.safetensors`` file (raw little-endian buffers, no
  code execution on load), and
* a JSON *skeleton* holding everything else, where each tensor is replaced by
  ``{"__tensor__": "<name in the safetensors file>"}``.

Types JSON cannot tell apart are tagged so that a round trip is exact: tuples
(``{"__tuple__": [...]}``), dicts with non-string keys such as the integer parameter
ids of an optimizer state (``{"__items__": [[key, value], ...]}``) and non-finite
floats (``{"__float__": "nan"}``).

A checkpoint *directory* holds ``state.json`` (the skeleton, the name of its tensor
file and that file's SHA-256) and one ``state-<tag>.safetensors``. The tensor file is
written first under a fresh name, then ``state.json`` is replaced atomically: that
rename is the commit point, so a crash at any moment leaves either the previous
checkpoint or the new one, never a mix. Stale tensor files are removed after the
commit, and temporary files of a writer that was killed outright by the next save
(:mod:`fedsoup.atomic`). Loading verifies the checksum (a flipped byte is a
:class:`~fedsoup.errors.CheckpointError` naming the file); a checkpoint written before
checksums existed loads with a warning. Tensor files without a ``state.json`` (a run
killed before its first commit, or a deleted ``state.json``) are refused, never taken
for an empty directory.

This module imports torch, numpy and safetensors only (never Flower).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from fedsoup.atomic import atomic_write_text
from fedsoup.errors import CheckpointError, OptionError, StateError, os_reason
from fedsoup.io.writer import write_safetensors

__all__ = [
    "CHECKPOINT_FORMAT",
    "STATE_JSON",
    "flatten_state",
    "unflatten_state",
    "save_checkpoint",
    "load_checkpoint",
    "has_checkpoint",
    "orphan_tensor_files",
]

CHECKPOINT_FORMAT = "fedsoup-state"
CHECKPOINT_VERSION = 1
STATE_JSON = "state.json"
_TENSOR_FILE_RE = re.compile(r"^state-[A-Za-z0-9_.-]+\.safetensors$")
_CHECKSUM_PREFIX = "sha256:"
_LOG = logging.getLogger("fedsoup")
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__")


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``state`` into ``(tensors, skeleton)``: safetensors-ready tensors and a JSON-able rest.

    Tensor names are the ``/``-joined path to the tensor (``"stew/state/0/exp_avg"``),
    so the safetensors file is readable on its own. Tensors are detached, moved to
    CPU and made contiguous; tensors sharing storage are cloned (safetensors refuses
    aliased tensors). Raises :class:`~fedsoup.errors.StateError` whose ``key`` is the path of
    an unsupported value (``"opt/hook"``).
    """
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()

    def tensor_name(path: tuple[str, ...]) -> str:
        name = "/".join(path) or "tensor"
        unique, n = name, 1
        while unique in tensors:  # e.g. int key 0 and str key "0" in the same dict
            unique, n = f"{name}#{n}", n + 1
        return unique

    def store(tensor: torch.Tensor, path: tuple[str, ...]) -> str:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() > 0:
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen_storages:
                tensor = tensor.clone()
            else:
                seen_storages.add(storage)
        name = tensor_name(path)
        tensors[name] = tensor
        return name

    def encode(value: Any, path: tuple[str, ...]) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, torch.Tensor):
            return {"__tensor__": store(value, path)}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise StateError("object arrays cannot be stored without pickle", key="/".join(path))
            return {"__ndarray__": store(torch.from_numpy(np.ascontiguousarray(value)), path)}
        if isinstance(value, np.generic):
            return encode(value.item(), path)
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, (*path, str(i))) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, (*path, str(i))) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and k not in _MARKERS for k in value):
                return {k: encode(v, (*path, k)) for k, v in value.items()}
            return {
                "__items__": [
                    [encode(k, (*path, "key")), encode(v, (*path, str(k)))]
                    for k, v in value.items()
                ]
            }
        raise StateError(
            f"cannot store a {type(value).__name__} without pickle (use tensors, numbers, strings, lists, "
            "tuples and dicts)",
            key="/".join(path) or "<root>",
        )

    skeleton = encode(state, ())
    return tensors, skeleton


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any, *, source: str = "state") -> Any:
    """Inverse of :func:`flatten_state`. Raises :class:`~fedsoup.errors.CheckpointError`
    (a ``ValueError``) naming a missing tensor, with ``source`` as its path."""

    def tensor(name: str) -> torch.Tensor:
        try:
            return tensors[name]
        except KeyError:
            raise CheckpointError(source, "is missing", tensor=name) from None

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (marker, payload), = value.items()
            if marker == "__tensor__":
                return tensor(payload)
            if marker == "__ndarray__":
                return tensor(payload).numpy()
            if marker == "__tuple__":
                return tuple(decode(v) for v in payload)
            if marker == "__items__":
                return {_hashable(decode(k)): decode(v) for k, v in payload}
            if marker == "__float__":
                return float(payload)
        return {k: decode(v) for k, v in value.items()}

    return decode(skeleton)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def has_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` holds a committed checkpoint (its ``state.json``)."""
    return (Path(directory) / STATE_JSON).is_file()


def orphan_tensor_files(directory: str | os.PathLike[str]) -> list[str]:
    """Names of checkpoint tensor files in ``directory`` when it has no ``state.json``.

    Non-empty means the checkpoint cannot be used: a run killed between writing its first
    tensor file and committing it, or a deleted ``state.json``.
    """
    directory = Path(directory)
    if has_checkpoint(directory) or not directory.is_dir():
        return []
    return sorted(entry.name for entry in os.scandir(directory) if _TENSOR_FILE_RE.match(entry.name))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    directory: str | os.PathLike[str], state: Any, *, tag: str, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state`` to ``directory`` atomically; return the path of ``state.json``.

    ``tag`` names the tensor file (``state-<tag>.safetensors``, e.g. ``tag="round-00003"``);
    ``metadata`` (str -> str) is stored in the safetensors header for people inspecting
    the file; ``state.json`` records the tensor file's SHA-256. Older tensor files of the
    directory are deleted once the new checkpoint is committed. OS errors (permission, a
    full disk) are :class:`~fedsoup.errors.OutputError` naming the file; the previous
    checkpoint is then kept.
    """
    directory = Path(directory)
    tensor_file = f"state-{tag}.safetensors"
    if not _TENSOR_FILE_RE.match(tensor_file):
        raise OptionError("tag", tag, f"checkpoint tag {tag!r}: use letters, digits, '_', '.', '-' only")
    tensors, skeleton = flatten_state(state)
    digest = write_safetensors(  # its atomic write sweeps dead writers' temp files first
        directory / tensor_file, tensors, {"format": CHECKPOINT_FORMAT, **dict(metadata or {})})
    document = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "tensors": tensor_file,
        "checksums": {tensor_file: _CHECKSUM_PREFIX + digest},
        "state": skeleton,
    }
    state_json = directory / STATE_JSON
    atomic_write_text(state_json, json.dumps(document, indent=1, allow_nan=False) + "\n")
    for stale in directory.iterdir():
        if stale.name != tensor_file and _TENSOR_FILE_RE.match(stale.name):
            stale.unlink(missing_ok=True)
    return state_json


def _read_document(directory: Path) -> dict[str, Any]:
    state_json = directory / STATE_JSON
    orphans = orphan_tensor_files(directory)
    if orphans:
        names = ", ".join(orphans)
        raise CheckpointError(
            state_json,
            f"missing, but {names} {'is' if len(orphans) == 1 else 'are'} there: a run was killed before it committed its first checkpoint, "
            f"or state.json was deleted; the tensors cannot be restored without it. To start fresh, "
            f"delete {names} from {directory} (or use another checkpoint directory)",
        )
    try:
        text = state_json.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{state_json}: no checkpoint") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(state_json, f"cannot be read: {os_reason(error)}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(state_json, f"not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(state_json, f"not a {CHECKPOINT_FORMAT} checkpoint")
    if document.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            state_json,
            f"checkpoint version {document.get('version')!r} is not supported "
            f"(this fedsoup reads version {CHECKPOINT_VERSION})",
        )
    return document


def _verify(state_json: Path, tensor_path: Path, checksums: Any) -> None:
    """Compare the tensor file with the checksum ``state.json`` recorded for it."""
    if checksums is None:
        _LOG.warning("%s: written without checksums (by an older fedsoup): %s is loaded unverified; "
                     "the next checkpoint saved will carry them", state_json, tensor_path.name)
        return
    expected = checksums.get(tensor_path.name) if isinstance(checksums, dict) else None
    if not isinstance(expected, str) or not expected.startswith(_CHECKSUM_PREFIX):
        raise CheckpointError(state_json, f"no valid checksum recorded for {tensor_path.name}")
    try:
        found = _CHECKSUM_PREFIX + _sha256(tensor_path)
    except FileNotFoundError:
        raise CheckpointError(tensor_path, f"missing (named by {state_json})") from None
    except OSError as error:
        raise CheckpointError(tensor_path, f"cannot be read: {os_reason(error)}") from None
    if found != expected:
        raise CheckpointError(
            tensor_path,
            f"checksum mismatch: the file changed after it was written (damaged disk or copy?); "
            f"{state_json} recorded {expected}, the file has {found}",
        )


def load_checkpoint(directory: str | os.PathLike[str]) -> Any:
    """Read the state committed in ``directory`` by :func:`save_checkpoint`, verifying its checksum.

    Raises ``FileNotFoundError`` when there is no checkpoint, and
    :class:`~fedsoup.errors.CheckpointError` (a ``ValueError``) naming the file when it is
    not a FedSoup checkpoint, its tensor file does not match the recorded checksum or the
    state, or tensor files are there without their ``state.json``.
    """
    directory = Path(directory)
    state_json = directory / STATE_JSON
    document = _read_document(directory)
    tensor_file = str(document.get("tensors", ""))
    # The name comes from a file on disk: never let it point outside the directory.
    if not _TENSOR_FILE_RE.match(tensor_file):
        raise CheckpointError(state_json, f"invalid tensor file name {tensor_file!r}")
    tensor_path = directory / tensor_file
    _verify(state_json, tensor_path, document.get("checksums"))
    try:
        tensors = safetensors.torch.load_file(str(tensor_path))
    except FileNotFoundError:
        raise CheckpointError(tensor_path, f"missing (named by {state_json})") from None
    except safetensors.SafetensorError as error:
        raise CheckpointError(tensor_path, f"unreadable safetensors file ({error})") from None
    return unflatten_state(tensors, document["state"], source=str(tensor_path))
