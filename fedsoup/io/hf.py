"""Hugging Face model directories: a ``config.json`` beside the weights.

A merge of model directories into a directory gives a directory that
``AutoModel.from_pretrained`` loads: the first input's configuration and tokenizer
files are carried over (the weights keep Hugging Face's names, see
:class:`fedsoup.io.layout.OutputLayout`). When the inputs' ``config.json`` differ
beyond bookkeeping fields, a :class:`~fedsoup.errors.MergeWarning` names the first
input that differs and the fields. The config's ``torch_dtype`` is set to the dtype the
weights are written in.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from fedsoup.errors import MergeInputError, MergeWarning
from fedsoup.io.formats import dtype_str, one_line

__all__ = ["CONFIG_NAME", "CARRIED_FILES", "is_model_directory", "model_directory_files"]

CONFIG_NAME = "config.json"
# What transformers' save_pretrained writes beside the weights for a model, its
# generation defaults, tokenizer (fast and slow, BPE/WordPiece/SentencePiece) and processor.
CARRIED_FILES = (
    CONFIG_NAME,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)
# Config fields that say where or with what a model was saved, not what it is.
_BOOKKEEPING = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype"})


def is_model_directory(path: str | os.PathLike[str]) -> bool:
    """True for a directory holding a ``config.json`` (as ``save_pretrained`` writes)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def _read_config(directory: str) -> dict:
    path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MergeInputError(f"unreadable {CONFIG_NAME} ({one_line(error)})", path=str(path)) from None
    if not isinstance(config, dict):
        raise MergeInputError(f"{CONFIG_NAME} is not a JSON object", path=str(path))
    return config


def _differing_fields(reference: dict, other: dict) -> list[str]:
    keys = (reference.keys() | other.keys()) - _BOOKKEEPING
    return sorted(key for key in keys if reference.get(key) != other.get(key))


def model_directory_files(inputs: Sequence[str], weights_dtype: torch.dtype | None) -> dict[str, bytes]:
    """The files to write beside the merged weights when ``inputs[0]`` is a model directory.

    Returns ``{file name: bytes}`` (empty when ``inputs[0]`` is no model directory). The
    first input's files are kept byte for byte, except ``config.json`` whose
    ``torch_dtype`` (or ``dtype``) is set to ``weights_dtype`` when given.
    """
    first = inputs[0]
    if not is_model_directory(first):
        return {}
    config = _read_config(first)
    for other in inputs[1:]:
        if not is_model_directory(other):
            continue
        fields = _differing_fields(config, _read_config(other))
        if fields:
            shown = ", ".join(fields[:5]) + (f" and {len(fields) - 5} more" if len(fields) > 5 else "")
            warnings.warn(
                f"{other}/{CONFIG_NAME} differs from {first}/{CONFIG_NAME} ({shown}); "
                f"the output carries the configuration of {first}",
                MergeWarning, stacklevel=4,  # at the caller of merge_files
            )
            break
    files = {}
    for name in CARRIED_FILES:
        path = Path(first) / name
        if path.is_file():
            try:
                files[name] = path.read_bytes()
            except OSError as error:
                raise MergeInputError(f"cannot read ({one_line(error)})", path=str(path)) from None
    dtype_keys = [key for key in ("torch_dtype", "dtype") if key in config]
    if weights_dtype is not None and any(config[key] != dtype_str(weights_dtype) for key in dtype_keys):
        for key in dtype_keys:
            config[key] = dtype_str(weights_dtype)
        files[CONFIG_NAME] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return files
