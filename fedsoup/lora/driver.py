"""Adapter files in, adapter (or model) directory out: what ``merge_files`` does with PEFT adapters.

Order of work, as for any file merge: the output is checked first (never a file of an
adapter or of the base, even with ``force``; an existing one is kept unless ``force``), then every adapter is read and checked, then merged, and only a
complete result is written, atomically. Adapters are small (a few MB to a few hundred
MB), so they are read whole; a base model (several GB) is read one tensor at a time, each
written as it is merged (:func:`fedsoup.lora.into_base.base_producer`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsoup.errors import MergeInputError, OptionError, OutputExistsError
from fedsoup.io.formats import TORCH_SUFFIXES
from fedsoup.io.layout import HF_WEIGHTS_NAME
from fedsoup.io.readers import open_weights_file
from fedsoup.io.hf import carried_names, files_read
from fedsoup.io.resolve import ResolvedInput, resolve_input
from fedsoup.io.writer import check_keeps_inputs
from fedsoup.lora.config import ADAPTER_CONFIG_NAME
from fedsoup.lora.files import ADAPTER_WEIGHTS_NAMES, base_model_input, load_adapter, stream_model, write_adapter
from fedsoup.lora.into_base import base_producer
from fedsoup.lora.modes import dense_update_refusal, merge_adapters
from fedsoup.lora.report import LoraReport
from fedsoup.options import MergeOptions

__all__ = ["AdapterFilesReport", "merge_adapter_files"]


@dataclass(frozen=True)
class AdapterFilesReport:
    """What :func:`merge_adapter_files` wrote, and the LoRA report of the merge."""

    output: Path
    files: list[Path]
    inputs: list[str]
    lora: LoraReport
    tensors: int
    parameters: int
    low_memory: bool = True  # the merge held about the adapters (plus one base tensor at a time)


def _refuse_existing(output: Path, names: Sequence[str], force: bool) -> None:
    if force:
        return
    if any((output / name).exists() for name in names):
        raise OutputExistsError(str(output))


def _files_to_keep(inputs: Sequence[str | os.PathLike[str] | ResolvedInput], base: ResolvedInput | None
                   ) -> list[Path]:
    """Every file the merge reads (:func:`fedsoup.io.hf.files_read`: the adapters' and the
    base's), never written or removed, even with ``force``. An adapter that does not resolve is
    left to be refused where it is read (naming its position)."""
    resolved = [] if base is None else [base]
    for item in inputs:
        with contextlib.suppress(MergeInputError):
            resolved.append(item if isinstance(item, ResolvedInput) else resolve_input(item))
    return files_read(resolved)


# Output names that say "a file": an adapter merge refuses them rather than make a folder of that name.
WEIGHTS_FILE_SUFFIXES = (".safetensors", ".npz", *TORCH_SUFFIXES)


def merge_adapter_files(inputs: Sequence[str | os.PathLike[str] | ResolvedInput], output: str | os.PathLike[str], *,
                        mode: str = "products", rank: int | None = None, base: str | os.PathLike[str] | None = None,
                        options: MergeOptions | None = None, weights: Sequence[float] | None = None,
                        force: bool = False, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10**9,
                        metadata: dict[str, str] | None = None, low_memory: bool | None = None,
                        ) -> AdapterFilesReport:
    """Merge PEFT adapters (directories or their weights files) and write the result.

    Without ``base``: an adapter directory at ``output`` (``adapter_config.json`` and
    ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads. With ``base``
    (a model directory): the base with the merged update added, as a model directory
    carrying the base's config and tokenizer files. ``mode``, ``rank``, ``options`` and
    ``weights`` are :func:`fedsoup.lora.merge_adapters`'. ``dtype``: the floating tensors
    are written in it, each rounded once from its float32/float64 result by the merge (the
    base tensors the adapters do not touch, by the writer; default: the adapters', the base's).
    ``metadata`` goes into the weights file, with the LoRA report under ``fedsoup.lora``.
    An input already resolved (:func:`fedsoup.io.resolve.resolve_input`) is not resolved again.

    Memory: the adapters, read whole, and with ``base`` one base tensor and one ``ΔW`` at a time
    (the base is read and written tensor by tensor, whatever ``low_memory``), but AME over
    products (``products`` with a non-soup optimizer), which merges every adapter's dense update
    at once: ``low_memory=True`` refuses it (:class:`~fedsoup.errors.OptionError`,
    ``option="low_memory"``) rather than hold more than it promises.
    """
    output = Path(output)
    names = [item.name if isinstance(item, ResolvedInput) else os.fspath(item) for item in inputs]
    options = MergeOptions() if options is None else options
    if output.exists() and not output.is_dir():
        raise MergeInputError("an adapter merge writes a directory; this output is a file", path=str(output))
    if not output.is_dir() and output.suffix.lower() in WEIGHTS_FILE_SUFFIXES:
        # A directory named like a weights file is what a caller asking for a file would least expect.
        raise MergeInputError("an adapter merge writes a directory (adapter_config.json and "
                              "adapter_model.safetensors, or a model directory with base); "
                              f"name a directory, e.g. {output.with_suffix('')}/", path=str(output))
    if base is not None and rank is not None:
        raise OptionError("lora_rank", rank, "option 'lora_rank' does not apply to a merge into the base model "
                          "(the whole merged update is added to the base weights)")
    held_dense = dense_update_refusal(mode, options)
    if low_memory and held_dense is not None:
        raise OptionError("low_memory", True, f"--low-memory holds the adapters and one base tensor at a time, "
                          f"which this merge cannot: {held_dense}; merge without --low-memory, or with the "
                          "soup (or --lora factors)")
    base_input = None if base is None else base_model_input(base)
    # Before anything is read, and before "exists" (which would invite --force): never an input.
    inputs_to_keep = _files_to_keep(inputs, base_input)
    if base_input is None:
        check_keeps_inputs(output / ADAPTER_WEIGHTS_NAMES[0], inputs_to_keep, extra_files=[ADAPTER_CONFIG_NAME])
    else:
        check_keeps_inputs(os.path.join(output, ""), inputs_to_keep, extra_files=carried_names(base_input.directory))
    _refuse_existing(output, (ADAPTER_CONFIG_NAME, *ADAPTER_WEIGHTS_NAMES) if base is None
                     else ("config.json", HF_WEIGHTS_NAME, HF_WEIGHTS_NAME + ".index.json"), force)
    adapters = [load_adapter(item, ingredient=index) for index, item in enumerate(inputs)]
    record = dict(metadata or {})
    if base_input is None:
        merged = merge_adapters(adapters, mode=mode, rank=rank, options=options, weights=weights, names=names,
                                dtype=dtype)
        state_dict, report = merged.state_dict, merged.report
        record["fedsoup.lora"] = json.dumps(report.describe(), sort_keys=True)
        files = write_adapter(output, state_dict, merged.config, force=force, metadata=record, dtype=dtype,
                              inputs_to_keep=inputs_to_keep)
        shapes = [tuple(tensor.shape) for tensor in state_dict.values()]
    else:
        # Open until written: each base tensor is mapped alone (Checkpoint.get), merged and
        # written before the next is read, and unmapped once written; a base written to in
        # place meanwhile is refused before the output is renamed.
        with open_weights_file(base_input.weights, base_input.name) as checkpoint:
            produce, report = base_producer(adapters, checkpoint.infos, checkpoint.get, mode=mode, options=options,
                                            weights=weights, names=names, dtype=dtype)
            record["fedsoup.lora"] = json.dumps(report.describe(), sort_keys=True)
            files = stream_model(output, checkpoint.infos, produce, base_input, force=force, metadata=record,
                                 max_shard_bytes=max_shard_bytes, dtype=dtype, before_rename=checkpoint.check_unchanged,
                                 inputs_to_keep=inputs_to_keep)
            shapes = [info.shape for info in checkpoint.infos.values()]
    return AdapterFilesReport(output, files, names, report, len(shapes), sum(math.prod(shape) for shape in shapes),
                              low_memory=held_dense is None)

