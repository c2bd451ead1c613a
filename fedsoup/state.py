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

A checkpoint *directory* holds ``state.json`` (the skeleton plus the name of its
tensor file) and one ``state-<tag>.safetensors``. The tensor file is written first
under a fresh name, then ``state.json`` is replaced atomically: that rename is the
commit point, so a crash at any moment leaves either the previous checkpoint or the
new one, never a mix. Stale tensor files are removed after the commit.

This module imports torch, numpy and safetensors only (never Flower).
"""

from __future__ import annotations

import json
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

from fedsoup.atomic import atomic_path, atomic_write_text

__all__ = [
    "CHECKPOINT_FORMAT",
    "STATE_JSON",
    "flatten_state",
    "unflatten_state",
    "save_checkpoint",
    "load_checkpoint",
    "has_checkpoint",
]

CHECKPOINT_FORMAT = "fedsoup-state"
CHECKPOINT_VERSION = 1
STATE_JSON = "state.json"
_TENSOR_FILE_RE = re.compile(r"^state-[A-Za-z0-9_.-]+\.safetensors$")
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__")


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``state`` into ``(tensors, skeleton)``: safetensors-ready tensors and a JSON-able rest.

    Tensor names are the ``/``-joined path to the tensor (``"stew/state/0/exp_avg"``),
    so the safetensors file is readable on its own. Tensors are detached, moved to
    CPU and made contiguous; tensors sharing storage are cloned (safetensors refuses
    aliased tensors). Raises ``TypeError`` naming the path of an unsupported value.
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
                raise TypeError(f"state at '{'/'.join(path)}': object arrays are not supported")
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
        raise TypeError(
            f"state at '{'/'.join(path) or '<root>'}': cannot store a {type(value).__name__} "
            "without pickle (use tensors, numbers, strings, lists, tuples and dicts)"
        )

    skeleton = encode(state, ())
    return tensors, skeleton


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any, *, source: str = "state") -> Any:
    """Inverse of :func:`flatten_state`. Raises ``ValueError`` naming a missing tensor."""

    def tensor(name: str) -> torch.Tensor:
        try:
            return tensors[name]
        except KeyError:
            raise ValueError(f"{source}: tensor '{name}' is missing") from None

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


def save_checkpoint(
    directory: str | os.PathLike[str], state: Any, *, tag: str, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state`` to ``directory`` atomically; return the path of ``state.json``.

    ``tag`` names the tensor file (``state-<tag>.safetensors``, e.g. ``tag="round-00003"``);
    ``metadata`` (str -> str) is stored in the safetensors header for people inspecting
    the file. Older tensor files of the directory are deleted once the new checkpoint
    is committed.
    """
    directory = Path(directory)
    tensor_file = f"state-{tag}.safetensors"
    if not _TENSOR_FILE_RE.match(tensor_file):
        raise ValueError(f"checkpoint tag {tag!r}: use letters, digits, '_', '.', '-' only")
    tensors, skeleton = flatten_state(state)
    with atomic_path(directory / tensor_file) as tmp:
        safetensors.torch.save_file(
            tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, **dict(metadata or {})}
        )
    document = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "tensors": tensor_file,
        "state": skeleton,
    }
    state_json = directory / STATE_JSON
    atomic_write_text(state_json, json.dumps(document, indent=1, allow_nan=False) + "\n")
    for stale in directory.iterdir():
        if stale.name != tensor_file and _TENSOR_FILE_RE.match(stale.name):
            stale.unlink(missing_ok=True)
    return state_json


def load_checkpoint(directory: str | os.PathLike[str]) -> Any:
    """Read the state committed in ``directory`` by :func:`save_checkpoint`.

    Raises ``FileNotFoundError`` when there is no checkpoint and ``ValueError`` naming
    the file when it is not a FedSoup checkpoint or its tensors do not match.
    """
    directory = Path(directory)
    state_json = directory / STATE_JSON
    try:
        document = json.loads(state_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{state_json}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{state_json}: not a {CHECKPOINT_FORMAT} checkpoint")
    if document.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{state_json}: checkpoint version {document.get('version')!r} is not supported "
            f"(this fedsoup reads version {CHECKPOINT_VERSION})"
        )
    tensor_file = str(document.get("tensors", ""))
    # The name comes from a file on disk: never let it point outside the directory.
    if not _TENSOR_FILE_RE.match(tensor_file):
        raise ValueError(f"{state_json}: invalid tensor file name {tensor_file!r}")
    tensor_path = directory / tensor_file
    try:
        tensors = safetensors.torch.load_file(str(tensor_path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{tensor_path}: tensor file named by {state_json} is missing") from None
    except safetensors.SafetensorError as error:
        raise ValueError(f"{tensor_path}: unreadable safetensors file ({error})") from None
    return unflatten_state(tensors, document["state"], source=str(tensor_path))
