"""Checks on opened checkpoints, from headers alone (before any tensor data is read)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsoup.errors import MergeInputError
from fedsoup.io.quantized import DEQUANTIZE_HINT, quantized_layout
from fedsoup.io.readers import Checkpoint
from fedsoup.structure import check_structure, structure_differences

__all__ = ["check_compatible", "check_unquantized", "check_has_tensors", "check_integers_agree", "COUNTERS", "differences", "check_finite"]

# Integer tensors that count something and may differ across inputs (the output keeps the
# first input's, in visiting order): BatchNorm's batch counter, an averaged model's count.
COUNTERS = ("num_batches_tracked", "n_averaged")


def differences(reference: Checkpoint, other: Checkpoint, limit: int | None = None) -> list[str]:
    """Why ``other`` cannot be merged with ``reference``: one line per tensor (``fedsoup inspect``)."""
    found = [
        f"{other.name}, tensor {key!r}: {reason}"
        for key, reason in structure_differences(reference.infos, other.infos, reference.name)
    ]
    return found[:limit] if limit is not None else found


def check_compatible(checkpoints: Sequence[Checkpoint], reference: Checkpoint | None = None) -> None:
    """Same tensor names, shapes and kinds (floating or not) everywhere.

    Raises :class:`~fedsoup.errors.MergeInputError` with the ``path``, ``ingredient``
    (position in ``checkpoints``) and ``key`` of the first difference.
    """
    if not checkpoints:
        raise MergeInputError("no input checkpoints")
    reference = reference or checkpoints[0]
    for index, checkpoint in enumerate(checkpoints):
        if checkpoint is not reference:
            check_structure(reference.infos, checkpoint.infos, ingredient=index, path=checkpoint.name,
                            reference_name=reference.name)


def check_has_tensors(checkpoints: Sequence[Checkpoint]) -> None:
    """Refuse a checkpoint that holds no tensors (any format), naming it.

    Its merge would be a file of no tensors that loads into no model; with other inputs it
    would be reported tensor by tensor as missing everything. Readers open such files
    (``fedsoup inspect`` describes them); a merge of models refuses them here.
    """
    for index, checkpoint in enumerate(checkpoints):
        if not checkpoint.infos:
            raise MergeInputError("holds no tensors", ingredient=index, path=checkpoint.name)


def check_unquantized(checkpoints: Sequence[Checkpoint]) -> None:
    """Refuse checkpoints holding a quantized layout (:mod:`fedsoup.io.quantized`), from headers."""
    for index, checkpoint in enumerate(checkpoints):
        found = quantized_layout(checkpoint.infos)
        if found is not None:
            key, kind = found
            raise MergeInputError(
                f"holds a quantized layout ({kind}): its tensors cannot be averaged one by one; {DEQUANTIZE_HINT}",
                ingredient=index, key=key, path=checkpoint.name,
            )


def check_integers_agree(key: str, tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Refuse integer (and bool) tensors that differ across inputs, unless ``key`` is a counter.

    A merge copies them from one input: token ids, position indices and masks must be
    the same everywhere, and packed quantized weights (int32 ``qweight``) averaged beside
    their float scales would be incoherent. Raises :class:`~fedsoup.errors.MergeInputError`
    naming the first input that differs from the first (``path``, ``ingredient``, ``key``).
    """
    if tensors[0].is_floating_point() or key.rsplit(".", 1)[-1] in COUNTERS:
        return
    for index, tensor in enumerate(tensors[1:], start=1):
        if not torch.equal(tensor, tensors[0]):
            raise MergeInputError(
                f"integer tensor differs from {names[0]}'s ({tensor.dtype}); integer tensors are copied, not "
                f"averaged, so they must agree (counters that may differ: {', '.join(COUNTERS)})",
                ingredient=index, key=key, path=names[index],
            )


def check_finite(tensor: torch.Tensor, name: str, key: str) -> torch.Tensor:
    """Refuse NaN/Inf in a floating tensor, naming the file and tensor."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise MergeInputError(f"contains {kind} values", key=key, path=name)
    return tensor
