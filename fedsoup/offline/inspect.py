"""``fedsoup.inspect_files``: what checkpoints hold and why they cannot be merged (``fedsoup inspect``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from fedsoup.errors import MergeInputError
from fedsoup.io.checks import check_has_tensors, check_unquantized, differences, mixed_float_dtypes, tied_copies
from fedsoup.io.formats import dtype_str
from fedsoup.io.hf import check_model_inputs, config_differences, tied_embedding_rows, tokenizer_differences
from fedsoup.io.readers import Checkpoint, without_tensors
from fedsoup.io.resolve import ResolvedInput, expand_inputs, open_checkpoint, resolve_input

__all__ = ["inspect_files"]


def inspect_files(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Describe checkpoints from their headers (no tensor data is read for safetensors and ``.npz``,
    but a tensor some inputs hold and others do not and the tensors it may be a tied copy of,
    :func:`~fedsoup.io.checks.tied_copies`).

    Returns ``{"checkpoints": [{"file", "format", "tensors", "parameters", "bytes",
    "metadata", "keys": {key: {"dtype", "shape"}}}, ...], "differences": [line, ...],
    "refusals": [line, ...], "tied_copies": [{"file", "tensor", "copy_of"}, ...],
    "warnings": [line, ...], "mergeable": bool}``, where ``differences`` lists every tensor
    that keeps an input from being merged with the first, ``tied_copies`` the tensors a merge
    leaves out as tied copies (GPT-2's ``lm_head.weight`` in a ``.bin`` beside safetensors),
    ``refusals`` what else :func:`~fedsoup.merge_files` would refuse (a model mixed with an
    adapter, differing ``model_type``, a quantized layout), ``warnings`` the
    :class:`~fedsoup.errors.MergeWarning` texts a merge of them into a directory with no
    options gives, computed by the functions the merge uses (float dtypes that differ,
    :func:`~fedsoup.io.checks.mixed_float_dtypes`, given once the tensors match; ``config.json``
    fields that differ, :func:`~fedsoup.io.hf.config_differences`; tokenizers that map ids to
    other tokens, :func:`~fedsoup.io.hf.tokenizer_differences`), and ``mergeable`` is true when
    ``differences`` and ``refusals`` are empty (warnings do not keep a merge from running).
    When the configuration files alone refuse the inputs (a model beside an adapter, other
    architectures, a declared quantization), that refusal stands alone: their tensors are
    not compared name by name (an adapter holds none of a model's tensors, so every one of
    them would be listed as missing).
    Raises :class:`~fedsoup.errors.MergeInputError` for an unreadable file.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    names = expand_inputs(inputs)
    refusals = []
    reports = []
    with contextlib.ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(item)) for item in names]
        # the checks merge_files runs before it reads tensor data
        refused_by_configs = False
        resolved = [resolve_input(item) for item in names]
        try:
            check_model_inputs(resolved)
        except MergeInputError as error:
            refusals.append(" ".join(str(error).split()))
            refused_by_configs = True
        for check in (check_has_tensors, check_unquantized):
            try:
                check(checkpoints)
            except MergeInputError as error:
                refusals.append(" ".join(str(error).split()))
        for checkpoint in checkpoints:
            reports.append({
                "file": checkpoint.name,
                "format": checkpoint.format,
                "tensors": len(checkpoint.infos),
                "parameters": checkpoint.numel,
                "bytes": checkpoint.nbytes,
                "metadata": checkpoint.metadata,
                "keys": {key: {"dtype": dtype_str(info.dtype), "shape": list(info.shape)}
                         for key, info in checkpoint.infos.items()},
            })
        mismatches, left_out, warned = [], {}, []
        if not refused_by_configs:
            mismatches, refused, left_out, views = _differences(checkpoints, resolved)
            refusals += refused
            if not mismatches and not refused:  # (the order merge_files gives them in)
                warned += mixed_float_dtypes(views)
            warned += config_differences(resolved) + tokenizer_differences(resolved)
    tied = [{"file": checkpoints[index].name, "tensor": key, "copy_of": tie}
            for index, copies in left_out.items() for key, tie in copies.items()]
    return {"checkpoints": reports, "differences": mismatches, "refusals": refusals, "tied_copies": tied,
            "warnings": warned, "mergeable": not mismatches and not refusals}


def _differences(checkpoints: Sequence[Checkpoint], resolved: Sequence[ResolvedInput]
                 ) -> tuple[list[str], list[str], dict[int, dict[str, str]], list[Checkpoint]]:
    """Every tensor that keeps an input from being merged with the first, the refusal of a tied
    copy that is no copy, the tied copies ``merge_files`` leaves out (no difference), and the
    inputs as the merge sees them (without those copies)."""
    try:
        left_out = tied_copies(checkpoints, tied_embedding_rows(resolved))
    except MergeInputError as error:
        left_out, refused = {}, [" ".join(str(error).split())]
    else:
        refused = []
    views = [without_tensors(checkpoint, left_out.get(i, {})) for i, checkpoint in enumerate(checkpoints)]
    return [line for other in views[1:] for line in differences(views[0], other)], refused, left_out, views
