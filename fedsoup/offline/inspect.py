"""``fedsoup.inspect_files``: what checkpoints hold and why they cannot be merged (``fedsoup inspect``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from fedsoup.errors import MergeInputError
from fedsoup.io.checks import check_has_tensors, check_unquantized, differences, tied_copies
from fedsoup.io.formats import dtype_str
from fedsoup.io.hf import check_model_inputs, tied_embedding_rows
from fedsoup.io.readers import Checkpoint, without_tensors
from fedsoup.io.resolve import expand_inputs, open_checkpoint, resolve_input

__all__ = ["inspect_files"]


def inspect_files(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Describe checkpoints from their headers (no tensor data is read for safetensors and ``.npz``,
    but a tensor some inputs hold and others do not and the tensors it may be a tied copy of,
    :func:`~fedsoup.io.checks.tied_copies`).

    Returns ``{"checkpoints": [{"file", "format", "tensors", "parameters", "bytes",
    "metadata", "keys": {key: {"dtype", "shape"}}}, ...], "differences": [line, ...],
    "refusals": [line, ...], "tied_copies": [{"file", "tensor", "copy_of"}, ...],
    "mergeable": bool}``, where ``differences`` lists every tensor that keeps an input
    from being merged with the first, ``tied_copies`` the tensors a merge leaves out as tied
    copies (GPT-2's ``lm_head.weight`` in a ``.bin`` beside safetensors), ``refusals`` what else
    :func:`~fedsoup.merge_files` would refuse (a model mixed with an adapter, differing
    ``model_type``, a quantized layout), and ``mergeable`` is true when both are empty.
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
        try:
            check_model_inputs([resolve_input(item) for item in names])
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
        mismatches, left_out = [], {}
        if not refused_by_configs:
            mismatches, refused, left_out = _differences(checkpoints, names)
            refusals += refused
    tied = [{"file": checkpoints[index].name, "tensor": key, "copy_of": tie}
            for index, copies in left_out.items() for key, tie in copies.items()]
    return {"checkpoints": reports, "differences": mismatches, "refusals": refusals, "tied_copies": tied,
            "mergeable": not mismatches and not refusals}


def _differences(checkpoints: Sequence[Checkpoint], names: Sequence[str]
                 ) -> tuple[list[str], list[str], dict[int, dict[str, str]]]:
    """Every tensor that keeps an input from being merged with the first, the refusal of a tied
    copy that is no copy, and the tied copies ``merge_files`` leaves out (no difference)."""
    try:
        left_out = tied_copies(checkpoints, tied_embedding_rows([resolve_input(item) for item in names]))
    except MergeInputError as error:
        left_out, refused = {}, [" ".join(str(error).split())]
    else:
        refused = []
    views = [without_tensors(checkpoint, left_out.get(i, {})) for i, checkpoint in enumerate(checkpoints)]
    return [line for other in views[1:] for line in differences(views[0], other)], refused, left_out
