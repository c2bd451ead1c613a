"""PEFT adapter directories read and written by their documented format (no PEFT import).

An adapter directory, as ``PeftModel.save_pretrained`` writes it, holds
``adapter_config.json`` and ``adapter_model.safetensors`` (or, from older PEFT or
``safe_serialization=False``, ``adapter_model.bin``). Either the directory or its weights
file names the adapter. The merged adapter is written as such a directory, atomically
(weights and config renamed into place together, the weights last), so
``PeftModel.from_pretrained(base, output)`` loads it; merged into a base model, the
output is a model directory with the base's ``config.json`` and tokenizer files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from fedsoup.errors import MergeInputError
from fedsoup.io.formats import TensorInfo, one_line
from fedsoup.io.hf import model_directory_files
from fedsoup.io.readers import load_state_dict
from fedsoup.io.writer import write_checkpoint
from fedsoup.lora.config import ADAPTER_CONFIG_NAME, config_bytes, parse_adapter_config
from fedsoup.lora.pairs import Adapter, split_adapter

__all__ = [
    "ADAPTER_WEIGHTS_NAMES",
    "adapter_directory",
    "is_adapter",
    "read_adapter",
    "load_adapter",
    "write_adapter",
    "write_model",
]

ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_directory(path: str | os.PathLike[str]) -> Path | None:
    """The adapter directory ``path`` names (the directory, or its weights file), else ``None``."""
    path = Path(path)
    if path.is_dir():
        return path if (path / ADAPTER_CONFIG_NAME).is_file() else None
    if path.name in ADAPTER_WEIGHTS_NAMES and (path.parent / ADAPTER_CONFIG_NAME).is_file():
        return path.parent
    return None


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """True for a PEFT adapter directory or its weights file (``adapter_config.json`` beside it)."""
    return adapter_directory(path) is not None


def read_adapter(path: str | os.PathLike[str], *, ingredient: int | None = None,
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of the adapter at ``path`` (a directory or its weights file).

    The weights are ``adapter_model.safetensors``, else ``adapter_model.bin`` (read with
    ``torch.load(weights_only=True)`` only), or the weights file named. Raises
    :class:`~fedsoup.errors.MergeInputError` naming the file.
    """
    name = os.fspath(path)
    directory = adapter_directory(path)
    if directory is None:
        raise MergeInputError(f"not a PEFT adapter (no {ADAPTER_CONFIG_NAME} beside it)", path=name,
                              ingredient=ingredient)
    config_path = directory / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MergeInputError(f"unreadable {ADAPTER_CONFIG_NAME} ({one_line(error)})", path=str(config_path),
                              ingredient=ingredient) from None
    if Path(path).is_file():
        weights = Path(path)
    else:
        found = [directory / w for w in ADAPTER_WEIGHTS_NAMES if (directory / w).is_file()]
        if not found:
            raise MergeInputError(f"adapter directory holds {ADAPTER_CONFIG_NAME} but no weights "
                                  f"({' or '.join(ADAPTER_WEIGHTS_NAMES)})", path=name, ingredient=ingredient)
        weights = found[0]
    try:
        state_dict = load_state_dict(weights)
    except MergeInputError as error:
        raise error.at(path=str(weights), ingredient=ingredient) from None
    return config, state_dict


def load_adapter(path: str | os.PathLike[str], *, ingredient: int | None = None) -> Adapter:
    """Read, check and split the adapter at ``path`` (:func:`read_adapter`, then pairs)."""
    config, state_dict = read_adapter(path, ingredient=ingredient)
    name = os.fspath(path)
    settings = parse_adapter_config(config, ingredient=ingredient, path=name)
    return split_adapter(state_dict, settings, ingredient=ingredient, path=name)


def _infos(state_dict: Mapping[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {key: TensorInfo(tuple(t.shape), t.dtype) for key, t in state_dict.items()}


def write_adapter(output: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], config: Mapping,
                  *, force: bool = False, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write an adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``.

    Atomic as a whole (:func:`fedsoup.io.writer.write_checkpoint`); an existing adapter
    there raises :class:`~fedsoup.errors.OutputExistsError` unless ``force``.
    """
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise MergeInputError("the output of an adapter merge is a directory, and this is a file", path=str(output))
    return write_checkpoint(
        folder / ADAPTER_WEIGHTS_NAMES[0], _infos(state_dict), lambda key: state_dict[key],
        metadata=metadata, force=force, extra_files={ADAPTER_CONFIG_NAME: config_bytes(config)},
    )


def write_model(output: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor],
                base: str | os.PathLike[str], *, force: bool = False, metadata: Mapping[str, str] | None = None,
                max_shard_bytes: int = 5 * 10**9) -> list[Path]:
    """Write a model directory: the weights under Hugging Face's names, ``base``'s config and tokenizer."""
    extra = model_directory_files([os.fspath(base)], None)
    return write_checkpoint(
        os.path.join(os.fspath(output), ""), _infos(state_dict), lambda key: state_dict[key], metadata=metadata, force=force,
        extra_files=extra, max_shard_bytes=max_shard_bytes,
    )
