"""``fedsoup.merge_files``: everything ``fedsoup merge`` does, as one library call (docs/design.md §2, §4).

Order of work, so that a mistake costs as little as possible: options are validated
(nothing read yet), inputs are resolved (which files they are), the output is checked (never
a file any input reads, even with ``force``; an existing one is kept unless ``force``),
inputs are opened and checked against each other from their headers, and only then
is tensor data read, merged and streamed to temporary files that are renamed into
place when all are complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsoup.atomic import atomic_write_text
from fedsoup.errors import MergeInputError, MergeWarning, OptionError, OutputExistsError
from fedsoup.io.checks import (check_compatible, check_has_tensors, check_unquantized, mixed_float_dtypes,
                               tied_copies)
from fedsoup.io.formats import TensorInfo, dtype_str
from fedsoup.io.hf import (
    carried_names, check_model_inputs, files_read, first_model, model_directory_files, tied_embedding_rows,
    tokenizer_differences, uncarried_files, with_config_cause,
)
from fedsoup.io.layout import OutputLayout
from fedsoup.io.readers import Checkpoint, open_weights_file, without_tensors
from fedsoup.io.resolve import ADAPTER, ResolvedInput, expand_inputs, open_checkpoint, resolve_input
from fedsoup.lora.driver import merge_adapter_files
from fedsoup.plan import planned_steps
from fedsoup.io.writer import check_keeps_inputs, parse_size, write_checkpoint
from fedsoup.inputs import output_dtype, per_ingredient
from fedsoup.offline.producers import LowMemoryProducer, Progress, choose_low_memory, in_memory_producer
from fedsoup.offline.tables import FILE_SETTINGS, per_input_values
from fedsoup.options import MergeOptions
from fedsoup.report import MergeReport
from fedsoup.structure import check_structure

__all__ = ["merge_files", "run_merge_files", "MergeReport", "DEFAULT_SHARD_SIZE", "report_sidecar"]

log = logging.getLogger("fedsoup")

DEFAULT_SHARD_SIZE = "5GB"  # as Hugging Face's save_pretrained
# PEFT adapter inputs are merged as their products s·B·A, exactly (rank Σ r_i), unless told
# otherwise: the measurements behind this choice are in docs/api.md, "LoRA adapters".
DEFAULT_ADAPTER_MODE = "products"
# Where a tensor-by-tensor merge writes its report (the header was written before it ended),
# and any merge into a .pt file (which has no header).
REPORT_SIDECAR_SUFFIX = ".fedsoup.json"


def report_sidecar(layout: OutputLayout) -> Path:
    """``<weights file>.fedsoup.json`` beside the output: the report of a merge whose header
    was written before the merge ended (tensor by tensor). docs/cli.md."""
    return layout.main.with_name(layout.main.name + REPORT_SIDECAR_SUFFIX)


def merge_files(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    force: bool = False,
    low_memory: bool | None = None,
    shard_size: int | str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    metrics: str | os.PathLike[str] | None = None,
    copy_config: bool = True,
    progress: bool = False,
    **merge_options: Any,
) -> Path:
    """Merge checkpoint files with :func:`fedsoup.merge` and write the result; return the output path.

    Args:
        inputs: files, model directories or globs (``"ckpts/*.safetensors"``): safetensors
            (single or sharded with ``*.index.json``), ``.pt``/``.pth``/``.bin``/``.ckpt``
            (``torch.load(weights_only=True)`` only), ``.npz``.
        output: ``.safetensors`` (sharded above ``shard_size``), ``.pt``, or a directory
            (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
            ``model.safetensors.index.json``).
        force: overwrite an existing output (else :class:`~fedsoup.errors.OutputExistsError`);
            never a file the merge reads (an input's weights, shards, index or carried files,
            the pivot, the metrics file: :class:`~fedsoup.errors.OutputError`, even with force).
        low_memory: ``True`` merges tensor by tensor (peak memory ~N x the largest tensor;
            exact for element-wise optimizers, refused otherwise), ``False`` in memory,
            ``None`` tensor by tensor only when memory is short.
        shard_size: largest safetensors shard (``"5GB"``, ``"512MiB"``, bytes); default 5GB.
        device: where the merge runs (``fedsoup.merge(device=...)``).
        dtype: dtype of the output's floating tensors (``"bf16"``, ``torch.float16``...);
            ``None`` keeps what ``fedsoup.merge`` returns (the first ingredient's in
            visiting order), with a :class:`~fedsoup.errors.MergeWarning` when the
            inputs' float dtypes differ.
        metrics: a CSV/JSON file with one row per input; ``weights``/``order_by`` may
            then name a column (``weights="num_examples"``).
        copy_config: with model directories (``config.json`` beside the weights) as
            inputs and a directory as output, carry the first input's configuration
            and tokenizer files over, so the output loads with ``from_pretrained``
            (``False``: a :class:`~fedsoup.errors.MergeWarning` names the files not carried).
        progress: a progress bar on stderr (when it is a terminal).
        **merge_options: the options of :func:`fedsoup.merge` and the optimizer's
            arguments (:class:`~fedsoup.options.MergeOptions`); ``pivot`` may also be
            a checkpoint path.
        base: with PEFT adapter inputs (``adapter_config.json`` beside ``adapter_model.*``),
            a model directory to add the merged update to (a model directory is written);
            without it an adapter directory is written. Adapters are merged as
            ``merge_options["lora"]`` says: ``"products"`` (default: exact, rank ``Σ r_i``,
            or ``lora_rank`` by a truncated SVD) or ``"factors"`` (FedAvg on A and B).

    Raises:
        fedsoup.UnknownOptionError, fedsoup.OptionError: bad options, before any file is read.
        fedsoup.OutputExistsError: the output exists and ``force`` is off.
        fedsoup.OutputError: the output would write or remove a file the merge reads, with
            ``path`` (the output file; the input in ``reason``), even with ``force``; or
            cannot be written (permission, full disk).
        fedsoup.MergeInputError: a bad input, with ``path`` (the file), ``key`` (the tensor)
            and ``ingredient`` (its position in the inputs).
    """
    return run_merge_files(
        inputs, output, force=force, low_memory=low_memory, shard_size=shard_size, device=device, dtype=dtype,
        metrics=metrics, copy_config=copy_config, progress=progress, **merge_options,
    ).output


def _check_flag(name: str, value: Any, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        kinds = "true, false or None" if allow_none else "true or false"
        raise OptionError(name, value, f"option {name!r} must be {kinds}, got {value!r}")


def _split_file_options(merge_options: dict[str, Any]) -> tuple[MergeOptions, Any, Any, str | None]:
    """Validate the merge options (once: the merge calls trust them); the call's inputs
    ``weights``/``order_by`` (numbers, or a metrics column) and a pivot checkpoint path are
    kept aside, resolved once the inputs are known."""
    settings = dict(merge_options)
    weights, order_by = settings.pop("weights", None), settings.pop("order_by", None)
    for name, value in (("weights", weights), ("order_by", order_by)):
        if not isinstance(value, str):
            per_ingredient(name, value)  # a bad list fails before any file is read
    pivot = settings.get("pivot", "soup")
    pivot_path = None
    if isinstance(pivot, os.PathLike) or (isinstance(pivot, str) and pivot not in ("soup", "first")):
        pivot_path = os.fspath(pivot)
        settings["pivot"] = "soup"
    options = MergeOptions.from_dict(settings, also_valid=(*FILE_SETTINGS, "weights", "order_by"))
    return options, weights, order_by, pivot_path


def _first_visited(order_by: Sequence[float] | None, descending: bool, n: int) -> int:
    if order_by is None:
        return 0
    return sorted(range(n), key=order_by.__getitem__, reverse=descending)[0]  # stable, as fedsoup.merge


def _output_infos(checkpoints: Sequence[Checkpoint], first: int, dtype: torch.dtype | None) -> dict[str, TensorInfo]:
    """The written tensors: each key as ``fedsoup.merge`` returns it, floating ones in ``dtype`` if given."""
    infos = {}
    for key, info in checkpoints[0].infos.items():
        chosen = checkpoints[first].infos[key]
        if dtype is not None and chosen.is_floating:
            chosen = TensorInfo(chosen.shape, dtype)
        infos[key] = chosen
    if dtype is None:
        _warn_mixed_dtypes(checkpoints, first)
    return infos


def _warn_mixed_dtypes(checkpoints: Sequence[Checkpoint], first: int) -> None:
    """One warning when some tensor comes in different float dtypes (a bf16 and an fp32 checkpoint)."""
    for message in mixed_float_dtypes(checkpoints, first):
        warnings.warn(message, MergeWarning, stacklevel=5)  # at the caller of merge_files


def _warn_tokenizers(resolved: Sequence[ResolvedInput]) -> None:
    """One warning when the model inputs' tokenizers map ids to other tokens (:func:`tokenizer_differences`)."""
    for message in tokenizer_differences(resolved):
        warnings.warn(message, MergeWarning, stacklevel=4)  # at the caller of merge_files


def _warn_not_carried(resolved: Sequence[ResolvedInput], layout: OutputLayout, output) -> None:
    """An output that carries none of the model directory's files (a single weights file, or a
    directory written with ``copy_config=False``): say which, and how to get them."""
    first = first_model(resolved)
    files = uncarried_files(first)
    if first is None or not files:
        return
    if layout.is_directory:  # asked for (--no-copy-config): told, not refused
        how = (f"the output {output} is a model directory written with copy_config=False (--no-copy-config): "
               f"{', '.join(files)} of {first.directory} are not carried, and from_pretrained needs them; "
               f"merge without --no-copy-config to carry them, or copy them in")
    else:
        how = (f"the output {output} is a single weights file: {', '.join(files)} of {first.directory} "
               f"are not carried, and from_pretrained needs them; give a directory as the output "
               f"(-o {Path(output).with_suffix('')}/) to write a model directory that loads")
    warnings.warn(how, MergeWarning, stacklevel=4)  # at the caller of merge_files


def _refuse_existing_output(layout: OutputLayout, force: bool) -> None:
    """An existing output (its weights, index or report sidecar) is kept unless ``force``."""
    if (layout.existing() or report_sidecar(layout).is_file()) and not force:
        raise OutputExistsError(str(layout.target))


def _files_to_keep(resolved: Sequence[ResolvedInput], pivot_path: str | None, metrics: str | None) -> list[Path]:
    """Every file this merge reads (:func:`~fedsoup.io.hf.files_read`), the pivot's and the
    metrics file included: none of them is ever written or removed (docs/design.md §4). A
    pivot that does not resolve is left to be refused where it is opened."""
    kept = files_read(resolved)
    if pivot_path is not None:
        with contextlib.suppress(MergeInputError):
            kept += files_read([resolve_input(pivot_path)])
    if metrics is not None:
        kept.append(Path(metrics))
    return kept


def run_merge_files(inputs, output, *, force=False, low_memory=None, shard_size=None, device=None, dtype=None,
                    metrics=None, copy_config=True, progress=False, **merge_options: Any) -> MergeReport:
    """:func:`merge_files`, returning the :class:`~fedsoup.report.MergeReport` (same arguments).

    The report is also written with the output: in the safetensors header
    (``fedsoup.report``) of an in-memory merge, in ``<weights file>.fedsoup.json``
    (:func:`report_sidecar`) beside a tensor-by-tensor one, whose header was written first,
    and beside a ``.pt`` output, which has no header.
    """
    started = time.perf_counter()
    if device is not None:
        merge_options["device"] = device
    base = merge_options.pop("base", None)
    options, weights, order_by, pivot_path = _split_file_options(merge_options)
    for name, value in (("force", force), ("copy_config", copy_config), ("progress", progress)):
        _check_flag(name, value)
    _check_flag("low_memory", low_memory, allow_none=True)
    max_shard_bytes = parse_size(DEFAULT_SHARD_SIZE if shard_size is None else shard_size)
    out_dtype = output_dtype(dtype)
    if inputs is None or (not isinstance(inputs, (str, os.PathLike)) and len(inputs) == 0):
        raise OptionError("inputs", inputs, "no inputs: give checkpoint files or directories (or 'inputs' in the config)")
    if output is None or str(output) == "":
        raise OptionError("output", output, "no output: give -o OUTPUT (or 'output' in the config)")
    layout = OutputLayout.of(output)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    names = expand_inputs(inputs)
    if not names:
        raise OptionError("inputs", inputs, "no inputs: give checkpoint files or directories (or 'inputs' in the config)")
    metrics = None if metrics is None else os.fspath(metrics)

    resolved = [resolve_input(item) for item in names]
    check_model_inputs(resolved)
    if any(item.kind == ADAPTER for item in resolved):  # (check_model_inputs refused a mix with models)
        _refuse_existing_output(layout, force)
        if order_by is not None or pivot_path is not None:
            raise OptionError("order_by" if order_by is not None else "pivot", order_by or pivot_path,
                              "PEFT adapters are merged without per-input scores or a pivot checkpoint")
        weights = per_input_values("weights", weights, names, metrics) if weights is not None else None
        return _merge_adapter_inputs(resolved, output, options, weights, base=base, force=force, dtype=out_dtype,
                                     max_shard_bytes=max_shard_bytes, started=started, low_memory=low_memory)
    for name, value in (("lora", options.lora), ("lora_rank", options.lora_rank), ("base", base)):
        if value is not None:
            raise OptionError(name, value, f"option {name!r} applies to PEFT adapter inputs (adapter_config.json "
                              f"beside adapter_model.*), and {names[0]} is not one")
    # Before any weights are read: no file of the output may be one of the inputs', even with force
    # (an adapter merge checks its own output, in merge_adapter_files).
    inputs_to_keep = _files_to_keep(resolved, pivot_path, metrics)
    first = first_model(resolved)
    carried = carried_names(first.directory) if copy_config and layout.is_directory and first is not None else []
    check_keeps_inputs(output, inputs_to_keep, extra_files=carried, sidecars=[report_sidecar(layout).name])
    _refuse_existing_output(layout, force)  # after: an input as the output is told as such, not as "use --force"

    with _recorded() as caught, contextlib.ExitStack() as stack:
        checkpoints = [stack.enter_context(open_weights_file(item.weights, item.name)) for item in resolved]
        check_has_tensors(checkpoints)
        embedding_rows = tied_embedding_rows(resolved)
        checkpoints, notes = _leave_out_tied_copies(checkpoints, embedding_rows)
        try:
            check_compatible(checkpoints)
        except MergeInputError as error:  # other tensors: say so from the configs too, when they differ
            raise with_config_cause(error, resolved) from None
        check_unquantized(checkpoints)
        call = {  # what this merge merges: the per-input numbers, resolved against the inputs
            "weights": per_input_values("weights", weights, names, metrics) if weights is not None else None,
            "order_by": per_input_values("order_by", order_by, names, metrics) if order_by is not None else None,
        }
        metadata_call = dict(call)
        call["dtype"] = out_dtype  # rounded once into it by the merge, never through the inputs' dtype
        pivot = None
        if pivot_path is not None:
            pivot = stack.enter_context(open_checkpoint(pivot_path))
            checkpoints, pivot, pivot_notes = _pivot_without_tied_copies(checkpoints, pivot, embedding_rows)
            check_structure(checkpoints[0].infos, pivot.infos, path=pivot.name, reference_name=checkpoints[0].name)
            notes += pivot_notes
        for note in notes:  # once the files passed the checks: a refused merge prints its refusal alone
            log.info("%s", note)
        low = choose_low_memory(low_memory, options, checkpoints)
        infos = _output_infos(checkpoints, _first_visited(call["order_by"], options.descending, len(names)), out_dtype)
        float_dtypes = {info.dtype for info in infos.values() if info.is_floating}
        extra_files = {}
        if copy_config and layout.is_directory:
            extra_files = model_directory_files(resolved, float_dtypes.pop() if len(float_dtypes) == 1 else None)
        else:
            _warn_not_carried(resolved, layout, output)
        _warn_tokenizers(resolved)
        metadata = {
            "fedsoup.version": _version(),
            "fedsoup.inputs": json.dumps(names),
            "fedsoup.merge": json.dumps(
                {**options.describe(), **metadata_call, "pivot": pivot.name if pivot else options.describe()["pivot"],
                 "low_memory": low, "dtype": None if out_dtype is None else dtype_str(out_dtype)},
                sort_keys=True,
            ),
        }
        total_bytes = sum(info.nbytes for info in infos.values())
        if low:
            produce = LowMemoryProducer(checkpoints, options, call, pivot, names)
            bar = Progress(total_bytes, "merging", progress)
        else:
            produce, merged = in_memory_producer(checkpoints, options, call, pivot, names, progress)
            # The merge is done before the header is written: its report, with the MergeWarnings
            # raised so far (reading, checking, merging), goes in the header.
            report = _with_warnings(merged, caught)
            metadata["fedsoup.report"] = json.dumps(report.to_dict(), sort_keys=True)
            bar = Progress(total_bytes, "writing", progress)
        try:
            files = write_checkpoint(output, infos, produce, metadata=metadata, max_shard_bytes=max_shard_bytes,
                                     force=force, on_tensor=bar.update, extra_files=extra_files,
                                     sidecars=[report_sidecar(layout).name], inputs_to_keep=inputs_to_keep,
                                     before_rename=lambda: _check_unchanged([*checkpoints, pivot]))
        finally:
            bar.close()
    sidecar = report_sidecar(layout)
    if low or layout.kind != "safetensors":
        # Tensor by tensor, the header was written before the merge ended (and a .pt file has
        # no header): the report (Prop. 2's ball summed over every tensor and checked once, as
        # in memory) goes to a sidecar file.
        merged = produce.report() if low else merged
        report = _with_warnings(merged or MergeReport("soup", options.optimizer_class.__name__, options.epochs, 0), caught)
        atomic_write_text(sidecar, json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
        files = [*files, sidecar]
    elif sidecar.is_file():  # (force) an earlier merge's report, ours and now wrong: the header has this one
        sidecar.unlink()
    return dataclasses.replace(
        report, output=layout.target, files=files, inputs=names, tensors=len(infos),
        parameters=sum(info.numel for info in infos.values()), seconds=time.perf_counter() - started,
        low_memory=low,
    )


def _leave_out_tied_copies(checkpoints: Sequence[Checkpoint], embedding_rows: Collection[int] | None
                           ) -> tuple[list[Checkpoint], list[str]]:
    """The inputs without the tied copies some hold and others leave out
    (:func:`~fedsoup.io.checks.tied_copies`), and a note naming each one left out."""
    left_out = tied_copies(checkpoints, embedding_rows)
    notes = [f"{checkpoints[index].name}: left out "
             f"{', '.join(f'{key!r} (a copy of {tie!r})' for key, tie in copies.items())}: tied weights, written "
             f"once as save_pretrained writes them; from_pretrained ties them back"
             for index, copies in left_out.items()]
    return [without_tensors(checkpoint, left_out.get(index, {})) for index, checkpoint in enumerate(checkpoints)], notes


def _pivot_without_tied_copies(checkpoints: Sequence[Checkpoint], pivot: Checkpoint,
                               embedding_rows: Collection[int] | None
                               ) -> tuple[list[Checkpoint], Checkpoint, list[str]]:
    """The inputs and a pivot file without the tied copies one side holds and the other leaves
    out (a pivot saved as a ``.bin`` beside safetensors inputs, or the other way round): the
    pivot is one more file for :func:`~fedsoup.io.checks.tied_copies`, but no ingredient."""
    try:
        (*inputs, pivot), notes = _leave_out_tied_copies([*checkpoints, pivot], embedding_rows)
    except MergeInputError as error:
        if error.ingredient != len(checkpoints):
            raise
        raise MergeInputError(error.reason, key=error.key, path=error.path) from None
    return inputs, pivot, notes


def _check_unchanged(checkpoints: Sequence[Checkpoint | None]) -> None:
    """Every input (and pivot) as it was when opened, now that all is read: the output is
    renamed into place only then (docs/design.md §4, Reading)."""
    for checkpoint in checkpoints:
        if checkpoint is not None:
            checkpoint.check_unchanged()


def _merge_adapter_inputs(resolved: Sequence[ResolvedInput], output, options: MergeOptions, weights, *, base,
                          force: bool, dtype: torch.dtype | None, max_shard_bytes: int, started: float,
                          low_memory: bool | None = None) -> MergeReport:
    """PEFT adapters, merged by :mod:`fedsoup.lora` (``options.lora``, default
    :data:`DEFAULT_ADAPTER_MODE`) into an adapter directory, or into ``base``'s model directory
    (streamed tensor by tensor; ``low_memory=True`` refuses a merge that holds the dense updates)."""
    names = [item.name for item in resolved]
    mode = options.lora or DEFAULT_ADAPTER_MODE
    metadata = {"fedsoup.version": _version(), "fedsoup.inputs": json.dumps(names),
                "fedsoup.merge": json.dumps({**options.describe(), "lora": mode, "weights": weights}, sort_keys=True)}
    written = merge_adapter_files(resolved, output, mode=mode, rank=options.lora_rank, base=base, options=options,
                                  weights=weights, force=force, dtype=dtype, max_shard_bytes=max_shard_bytes,
                                  metadata=metadata, low_memory=low_memory)
    return MergeReport(f"lora-{written.lora.how}", options.optimizer_class.__name__, options.epochs,
                       planned_steps(options, len(names)),
                       output=Path(output), files=written.files, inputs=names, tensors=written.tensors,
                       parameters=written.parameters, seconds=time.perf_counter() - started, lora=written.lora,
                       low_memory=written.low_memory)


@contextlib.contextmanager
def _recorded():
    """Record the warnings raised in the block (yielded: the list grows as they are raised, so
    a report written mid-way holds those raised so far), and show every one of them at the end
    as it would have been shown (filters, file and line kept)."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield caught
    finally:
        for warning in caught:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _with_warnings(report: MergeReport, caught: Sequence[warnings.WarningMessage]) -> MergeReport:
    """``report`` with the text of every :class:`MergeWarning` in ``caught`` before its own warnings."""
    raised = tuple(str(w.message) for w in caught if issubclass(w.category, MergeWarning))
    return dataclasses.replace(report, warnings=(*raised, *report.warnings))


def _version() -> str:
    import fedsoup

    return fedsoup.__version__
