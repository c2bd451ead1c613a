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

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from fedsoup.errors import MergeInputError
from fedsoup.io.formats import TensorInfo
from fedsoup.io.hf import config_bytes, model_directory_files, read_config
from fedsoup.io.readers import open_weights_file
from fedsoup.io.resolve import ADAPTER, ADAPTER_WEIGHTS, MODEL, ResolvedInput, resolve_input
from fedsoup.io.writer import write_checkpoint
from fedsoup.lora.checks import rounded_into
from fedsoup.lora.config import ADAPTER_CONFIG_NAME, parse_adapter_config
from fedsoup.lora.pairs import Adapter, split_adapter

__all__ = [
    "ADAPTER_WEIGHTS_NAMES",
    "read_adapter",
    "load_adapter",
    "write_adapter",
    "base_model_input",
    "write_model",
    "stream_model",
]

ADAPTER_WEIGHTS_NAMES = ADAPTER_WEIGHTS  # what fedsoup.io.resolve recognises, written first-named


def read_adapter(path: str | os.PathLike[str] | ResolvedInput, *, ingredient: int | None = None,
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of the adapter at ``path`` (a directory or its weights file).

    The input forms are :func:`fedsoup.io.resolve.resolve_input`'s: the directory (its
    ``adapter_model.safetensors``, else ``adapter_model.bin``, read with
    ``torch.load(weights_only=True)`` only) or the weights file; or a :class:`ResolvedInput`
    a caller has resolved already (not resolved again). Raises
    :class:`~fedsoup.errors.MergeInputError` naming the input as given.
    """
    try:
        resolved = path if isinstance(path, ResolvedInput) else _resolve_adapter(path)
        if resolved.kind != ADAPTER:
            raise MergeInputError(f"not a PEFT adapter (no {ADAPTER_CONFIG_NAME} beside adapter_model.*)",
                                  path=resolved.name)
        config = read_config(resolved.config_path)
        with open_weights_file(resolved.weights, resolved.name) as checkpoint:
            state_dict = checkpoint.load_all()
    except MergeInputError as error:
        raise error.at(ingredient=ingredient) from None
    return config, state_dict


def _resolve_adapter(path: str | os.PathLike[str]) -> ResolvedInput:
    name = os.fspath(path)
    folder = Path(path)
    if folder.is_dir() and (folder / ADAPTER_CONFIG_NAME).is_file() \
            and not any((folder / w).is_file() for w in ADAPTER_WEIGHTS_NAMES):
        raise MergeInputError(f"adapter directory holds {ADAPTER_CONFIG_NAME} but no weights "
                              f"({' or '.join(ADAPTER_WEIGHTS_NAMES)})", path=name)
    return resolve_input(path, name=name)


def load_adapter(path: str | os.PathLike[str] | ResolvedInput, *, ingredient: int | None = None) -> Adapter:
    """Read, check and split the adapter at ``path`` (:func:`read_adapter`, then pairs)."""
    config, state_dict = read_adapter(path, ingredient=ingredient)
    name = path.name if isinstance(path, ResolvedInput) else os.fspath(path)
    settings = parse_adapter_config(config, ingredient=ingredient, path=name)
    return split_adapter(state_dict, settings, ingredient=ingredient, path=name)


def _infos(tensors: Mapping[str, torch.Tensor | TensorInfo], dtype: torch.dtype | None) -> dict[str, TensorInfo]:
    """The tensors (or their infos) as written: floating ones in ``dtype`` when given, the others as they are."""
    return {key: TensorInfo(tuple(t.shape), dtype if dtype is not None and t.dtype.is_floating_point else t.dtype)
            for key, t in tensors.items()}


def _producer(read: Callable[[str], torch.Tensor], dtype: torch.dtype | None) -> Callable[[str], torch.Tensor]:
    """What the writer writes for each key: the tensor, or (``dtype``) the tensor rounded once
    into ``dtype`` (:func:`fedsoup.lora.checks.rounded_into`: a merged tensor is already in it,
    a base tensor the adapters do not touch is rounded here), refused with
    :class:`~fedsoup.errors.OptionError` (``option="dtype"``) where a finite value overflows
    it: nothing is written then (the writer is atomic)."""
    if dtype is None:
        return read

    def produce(key: str) -> torch.Tensor:
        tensor = read(key)
        return rounded_into(key, tensor, dtype) if tensor.is_floating_point() else tensor

    return produce


def write_adapter(output: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], config: Mapping,
                  *, force: bool = False, metadata: Mapping[str, str] | None = None,
                  dtype: torch.dtype | None = None, inputs_to_keep: Sequence[Path] = ()) -> list[Path]:
    """Write an adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``.

    Atomic as a whole (:func:`fedsoup.io.writer.write_checkpoint`); an existing adapter
    there raises :class:`~fedsoup.errors.OutputExistsError` unless ``force``. ``dtype``: the
    floating tensors are written in it, each rounded once (a value it cannot hold is refused:
    :class:`~fedsoup.errors.OptionError`, ``option="dtype"``; default: as they are).
    ``inputs_to_keep``: the files the merge read, never replaced, even with ``force``
    (:func:`fedsoup.io.writer.write_checkpoint`'s).
    """
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise MergeInputError("the output of an adapter merge is a directory, and this is a file", path=str(output))
    return write_checkpoint(
        folder / ADAPTER_WEIGHTS_NAMES[0], _infos(state_dict, dtype), _producer(state_dict.__getitem__, dtype),
        metadata=metadata, force=force, extra_files={ADAPTER_CONFIG_NAME: config_bytes(config)},
        inputs_to_keep=inputs_to_keep,
    )


def base_model_input(base: str | os.PathLike[str]) -> ResolvedInput:
    """The base model of a merge into the base: a model directory (or its weights file), else refused."""
    resolved = resolve_input(base)
    if resolved.kind != MODEL:
        raise MergeInputError("the base model is not a model directory (no config.json beside its weights)",
                              path=os.fspath(base))
    return resolved


def write_model(output: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor],
                base: str | os.PathLike[str] | ResolvedInput, *, force: bool = False,
                metadata: Mapping[str, str] | None = None, max_shard_bytes: int = 5 * 10**9,
                dtype: torch.dtype | None = None, before_rename: Callable[[], None] | None = None,
                inputs_to_keep: Sequence[Path] = ()) -> list[Path]:
    """Write a model directory: the weights under Hugging Face's names, ``base``'s config and
    tokenizer (``base``: a path, or :func:`base_model_input`'s answer). ``dtype``: the
    floating tensors are written in it, each rounded once (default: as they are).
    ``before_rename``, ``inputs_to_keep``: :func:`fedsoup.io.writer.write_checkpoint`'s."""
    return stream_model(output, state_dict, state_dict.__getitem__, base, force=force, metadata=metadata,
                        max_shard_bytes=max_shard_bytes, dtype=dtype, before_rename=before_rename,
                        inputs_to_keep=inputs_to_keep)


def stream_model(output: str | os.PathLike[str], infos: Mapping[str, TensorInfo | torch.Tensor],
                 produce: Callable[[str], torch.Tensor], base: str | os.PathLike[str] | ResolvedInput, *,
                 force: bool = False, metadata: Mapping[str, str] | None = None, max_shard_bytes: int = 5 * 10**9,
                 dtype: torch.dtype | None = None, before_rename: Callable[[], None] | None = None,
                 inputs_to_keep: Sequence[Path] = ()) -> list[Path]:
    """:func:`write_model` tensor by tensor: ``produce(key)`` is called once per key of ``infos``
    (the shapes and dtypes it returns), in that order, and each tensor written before the next is
    produced (:func:`fedsoup.io.writer.write_checkpoint`), so memory holds one tensor at a time."""
    written = _infos(infos, dtype)
    float_dtypes = {info.dtype for info in written.values() if info.is_floating}
    base_input = base if isinstance(base, ResolvedInput) else base_model_input(base)
    # config.json names the dtype written (a --dtype cast included), as a plain model merge's does.
    extra = model_directory_files([base_input], float_dtypes.pop() if len(float_dtypes) == 1 else None)
    return write_checkpoint(
        os.path.join(os.fspath(output), ""), written, _producer(produce, dtype), metadata=metadata, force=force,
        extra_files=extra, max_shard_bytes=max_shard_bytes, before_rename=before_rename,
        inputs_to_keep=inputs_to_keep,
    )
