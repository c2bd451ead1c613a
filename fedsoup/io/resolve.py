"""What an input path means: the weights to open, and the Hugging Face directory they belong to.

transformers' ``save_pretrained`` writes a model directory: ``config.json`` beside the
weights, which are ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors``
listed by ``model.safetensors.index.json`` (``pytorch_model.bin`` and
``pytorch_model.bin.index.json`` in older releases). PEFT's writes an adapter directory:
``adapter_config.json`` beside ``adapter_model.safetensors`` (or ``.bin``). A user may name
the directory, the index, or the weights file itself; :func:`resolve_input` maps each
form to one :class:`ResolvedInput`, so a merge of ``*/model.safetensors`` knows the
configuration beside each file exactly as a merge of the directories does.

Every failure is a :class:`~fedsoup.errors.MergeInputError` whose ``path`` is the input as
the user spelled it.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsoup.errors import MergeInputError
from fedsoup.io.formats import INDEX_SUFFIX, NUMPY_SUFFIX, SAFETENSORS_SUFFIX, TORCH_SUFFIXES
from fedsoup.io.readers import Checkpoint, open_weights_file, refuse_special_file

__all__ = [
    "ResolvedInput", "resolve_input", "open_checkpoint", "load_state_dict", "expand_inputs", "index_shards",
    "MODEL_CONFIG", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "MODEL", "ADAPTER", "WEIGHTS",
]

MODEL_CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
# What an input is (ResolvedInput.kind).
MODEL, ADAPTER, WEIGHTS = "model", "adapter", "weights"

# The weights of a Hugging Face directory, by the names transformers and PEFT give them,
# in the order transformers' from_pretrained looks for them.
_MODEL_WEIGHTS = (
    "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin",
)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Files a training run saves beside the weights that are not the model's weights.
_NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"})
_SHARD_NAME = re.compile(r".+-\d{5}-of-\d{5}\.(safetensors|bin)$")


@dataclass(frozen=True)
class ResolvedInput:
    """One input, resolved.

    Attributes:
        name: the input as the user spelled it (every error's ``path``).
        weights: the file to open: a weights file or a ``*.index.json``.
        directory: the Hugging Face directory the weights belong to (a ``config.json`` or
            ``adapter_config.json`` beside them), or ``None`` for bare weights.
        kind: :data:`MODEL` (``config.json``), :data:`ADAPTER` (``adapter_config.json``
            beside ``adapter_model.*``) or :data:`WEIGHTS` (no configuration).
    """

    name: str
    weights: Path
    directory: Path | None
    kind: str

    @property
    def config_path(self) -> Path | None:
        """The configuration file beside the weights (``None`` for bare weights)."""
        if self.directory is None:
            return None
        return self.directory / (ADAPTER_CONFIG if self.kind == ADAPTER else MODEL_CONFIG)


def resolve_input(path: str | os.PathLike[str], *, name: str | None = None) -> ResolvedInput:
    """Resolve a directory, index file or weights file to a :class:`ResolvedInput`.

    - a directory: its weights by Hugging Face's names (the index before a single file,
      safetensors before ``.bin``), else its one checkpoint file;
    - a missing ``model.safetensors`` whose ``model.safetensors.index.json`` exists: the index;
    - one shard of a sharded checkpoint is refused (merging it would merge part of a model);
    - a named pipe, socket or device is refused as not a regular file (not as missing).
    """
    path = Path(path)
    name = name or str(path)
    if path.is_dir():
        weights = _weights_in_directory(path, name)
    elif path.is_file():
        weights = path
        _refuse_single_shard(path, name)
    else:
        refuse_special_file(path, name)
        sharded = path.with_name(path.name + INDEX_SUFFIX)
        if path.suffix == SAFETENSORS_SUFFIX and sharded.is_file():
            weights = sharded
        else:
            raise MergeInputError("no such file or directory", path=name)
    folder = weights.parent
    if weights.name.startswith("adapter_model") and (folder / ADAPTER_CONFIG).is_file():
        return ResolvedInput(name, weights, folder, ADAPTER)
    if (folder / MODEL_CONFIG).is_file():
        return ResolvedInput(name, weights, folder, MODEL)
    return ResolvedInput(name, weights, None, WEIGHTS)


def _weights_in_directory(folder: Path, name: str) -> Path:
    for known in _MODEL_WEIGHTS + ADAPTER_WEIGHTS:
        if (folder / known).is_file():
            return folder / known
    indexes = sorted(p for p in folder.glob("*" + INDEX_SUFFIX) if p.is_file())  # (a named pipe would block)
    if len(indexes) > 1:
        safetensors_indexes = [p for p in indexes if p.name.endswith(SAFETENSORS_SUFFIX + INDEX_SUFFIX)]
        indexes = safetensors_indexes if len(safetensors_indexes) == 1 else indexes
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        raise MergeInputError(f"several index files ({', '.join(p.name for p in indexes)}); name one", path=name)
    for suffixes in ((SAFETENSORS_SUFFIX,), TORCH_SUFFIXES, (NUMPY_SUFFIX,)):
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)
        found = [p for p in found if p.name not in _NOT_WEIGHTS]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise MergeInputError(f"several checkpoint files ({', '.join(p.name for p in found)}); name one", path=name)
    raise MergeInputError("directory holds no checkpoint (.safetensors, *.index.json, .pt, .bin, .npz)", path=name)


def _refuse_single_shard(path: Path, name: str) -> None:
    """A file listed by an index beside it is one shard of a model, never a model."""
    if not _SHARD_NAME.fullmatch(path.name):
        return
    for index in sorted(path.parent.glob("*" + INDEX_SUFFIX)):
        if not index.is_file():  # (a named pipe would block)
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if isinstance(weight_map, dict) and path.name in weight_map.values():
            raise MergeInputError(
                f"is one shard of {index}; give the index file or its directory to merge the whole model",
                path=name,
            )


def index_shards(weights: Path) -> list[Path]:
    """The shard files an index (``*.index.json``) lists beside it, for what a merge must keep
    (:func:`fedsoup.io.hf.files_read`); empty for a weights file, or an index that cannot be
    read (refused when opened) or names a shard outside its folder (refused when opened)."""
    if not weights.name.endswith(INDEX_SUFFIX) or not weights.is_file():
        return []
    try:
        weight_map = json.loads(weights.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return []
    names = weight_map.values() if isinstance(weight_map, dict) else ()
    return [weights.parent / name for name in dict.fromkeys(names)
            if isinstance(name, str) and name and not Path(name).is_absolute() and ".." not in Path(name).parts]


def open_checkpoint(path: str | os.PathLike[str], *, name: str | None = None) -> Checkpoint:
    """Open a checkpoint file or directory for reading; raise :class:`MergeInputError` if unusable.

    ``model.safetensors`` also finds a sharded ``model.safetensors.index.json`` next to it.
    """
    resolved = resolve_input(path, name=name)
    return open_weights_file(resolved.weights, resolved.name)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint (any supported format) into memory."""
    with open_checkpoint(path) as checkpoint:
        return checkpoint.load_all()


def expand_inputs(patterns: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Expand shell-style globs (``ckpt/*.safetensors``, ``runs/**/model.pt``), sorted per pattern.

    A pattern without wildcards is kept as given (its absence is reported when opened);
    a glob that matches nothing is an error, so a typo never silently drops inputs.
    """
    paths: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise MergeInputError("no file matches this pattern", path=pattern)
            paths.extend(matches)
        else:
            paths.append(pattern)
    return paths
