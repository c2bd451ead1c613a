"""Checks on opened checkpoints, from headers alone (before any tensor data is read)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from fedsoup.errors import MergeInputError
from fedsoup.inputs import NO_TENSORS
from fedsoup.io.formats import dtype_str
from fedsoup.io.quantized import DEQUANTIZE_HINT, quantized_layout
from fedsoup.io.readers import Checkpoint
from fedsoup.report import counted
from fedsoup.structure import check_structure, structure_differences

__all__ = ["check_compatible", "check_unquantized", "check_has_tensors", "check_integers_agree", "COUNTERS", "differences",
           "check_finite", "tied_copies", "same_bytes", "mixed_float_dtypes"]

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


def mixed_float_dtypes(checkpoints: Sequence[Checkpoint], first: int = 0) -> list[str]:
    """The warning a merge with no output dtype gives when some tensor comes in different float
    dtypes (a bf16 and an fp32 checkpoint): at most one, naming the first such tensor, the
    dtypes and the inputs holding them, and the dtype written, that of input ``first`` (the
    first in visiting order). Over checkpoints that passed :func:`check_compatible`."""
    mixed = []
    for key, info in checkpoints[0].infos.items():
        if info.is_floating:
            dtypes: dict[torch.dtype, str] = {}  # each dtype with the first input that has it
            for checkpoint in checkpoints:
                dtypes.setdefault(checkpoint.infos[key].dtype, checkpoint.name)
            if len(dtypes) > 1:
                mixed.append((key, dtypes))
    if not mixed:
        return []
    key, dtypes = mixed[0]
    chosen = checkpoints[first].infos[key].dtype
    listed = ", ".join(f"{dtype_str(dtype)} in {name}" for dtype, name in dtypes.items())
    more = f" (and {counted(len(mixed) - 1, 'more tensor')})" if len(mixed) > 1 else ""
    return [f"the inputs' float dtypes differ: tensor {key!r} is {listed}{more}; writing {dtype_str(chosen)}, "
            f"the dtype of {checkpoints[first].name} (the first input in visiting order); pass dtype= (--dtype) "
            f"to choose"]


def tied_copies(checkpoints: Sequence[Checkpoint], embedding_rows: Collection[int] | None
                ) -> dict[int, dict[str, str]]:
    """The tied copies to leave out of the inputs: ``{input position: {tensor: the tensor it is a copy of}}``.

    A tied weight is one tensor under two names: GPT-2's ``lm_head.weight`` is its
    ``transformer.wte.weight`` (``tie_word_embeddings``). ``save_pretrained`` writes it once
    (safetensors hold no aliases); ``torch.save(model.state_dict())``, the ``.bin`` of
    transformers 4.x and of training scripts, writes both names. A tensor that some inputs
    hold and others do not is left out of those holding it only when, in every one of them,
    it is bitwise equal (:func:`same_bytes`: dtype, shape and bytes) to one same other tensor
    that every input holds, and that tensor is a word embedding: 2-D, with one of
    ``embedding_rows`` rows (the ``vocab_size`` of the first model's ``config.json``, when
    that model ties its word embeddings: :func:`fedsoup.io.hf.tied_embedding_rows`). The
    merge then writes it as ``save_pretrained`` does, once, and ``from_pretrained`` ties it back.

    ``from_pretrained`` ties word embeddings and nothing else, so only they are ties: the
    extra layers of a depth up-scaled model (its layer 24 a byte copy of layer 16) are
    tensors of their own, which a merge with the smaller model must refuse, not drop under the
    first model's config (a config of 32 layers over 24 layers of weights loads with 8 random
    layers and only a logged warning). They are left for :func:`check_compatible` to refuse,
    as any tensor some inputs lack, as are all of them when ``embedding_rows`` is empty (the
    embeddings are untied, or the config gives no ``vocab_size``). With ``embedding_rows``
    ``None`` (no input has a ``config.json``) nothing is left out either, but a 2-D copy is
    refused here, saying that a ``config.json`` beside the inputs would let it merge.

    Headers decide what is read: a tensor is compared only with the tensors of its input of
    its dtype and shape that every input holds, one pair at a time (a ``--low-memory`` merge
    stays within two tensors per input here), the smallest such tensors first. A tensor whose
    header matches none is left for :func:`check_compatible` to refuse. One whose header
    matches but whose bytes copy none of those tensors (a file claiming ``lm_head.weight``
    with values of its own) is refused here, at the first found: leaving it out would drop
    its values silently.

    Raises :class:`~fedsoup.errors.MergeInputError` with ``key`` (the tensor), ``path`` and
    ``ingredient`` (the input whose bytes are no copy, or the first holding a copy that no
    config allows to leave out).
    """
    if not checkpoints or (embedding_rows is not None and not embedding_rows):
        return {}
    everywhere = [key for key in checkpoints[0].infos if all(key in other.infos for other in checkpoints)]
    possible = []  # (tensor, the inputs holding it, the tensors its headers say it may be a copy of)
    for key in _held_by_some(checkpoints):
        holders = [index for index, checkpoint in enumerate(checkpoints) if key in checkpoint.infos]
        if not all(_embedding_shaped(checkpoints[index].infos[key].shape, embedding_rows) for index in holders):
            continue
        candidates = [tie for tie in everywhere
                      if all(checkpoints[index].infos[tie] == checkpoints[index].infos[key] for index in holders)]
        if candidates:
            possible.append((key, holders, candidates))
    left_out: dict[int, dict[str, str]] = {}
    for key, holders, candidates in sorted(possible, key=lambda entry: checkpoints[entry[1][0]].infos[entry[0]].nbytes):
        tie = _tie_of(key, checkpoints, holders, candidates)
        if embedding_rows is None:
            absent = next(other.name for other in checkpoints if key not in other.infos)
            raise MergeInputError(
                f"not in {absent}; it is a bitwise copy of {tie!r}, but with no config.json beside the inputs "
                f"nothing says it is a tied word embedding (tie_word_embeddings, vocab_size), the only copy a "
                f"merge may leave out: if it is one, merge the model directories or put the model's config.json "
                f"beside the weights files",
                ingredient=holders[0], key=key, path=checkpoints[holders[0]].name,
            )
        for index in holders:
            left_out.setdefault(index, {})[key] = tie
    return left_out


def _embedding_shaped(shape: Sequence[int], embedding_rows: Collection[int] | None) -> bool:
    """A word embedding's shape: (rows, width), rows one of ``embedding_rows`` (any when ``None``)."""
    return len(shape) == 2 and (embedding_rows is None or shape[0] in embedding_rows)


def _held_by_some(checkpoints: Sequence[Checkpoint]) -> list[str]:
    """The tensors some inputs hold and others do not, in the order the inputs list them."""
    held = [key for checkpoint in checkpoints for key in checkpoint.infos]
    return [key for key in dict.fromkeys(held) if not all(key in checkpoint.infos for checkpoint in checkpoints)]


def _tie_of(key: str, checkpoints: Sequence[Checkpoint], holders: Sequence[int], candidates: Sequence[str]) -> str:
    """The first of ``candidates`` that ``key`` is a bitwise copy of in every input of ``holders``."""
    for position, index in enumerate(holders):
        checkpoint = checkpoints[index]
        copy = checkpoint.get(key)
        matching = [tie for tie in candidates if same_bytes(copy, checkpoint.get(tie))]
        if not matching:
            absent = next(other.name for other in checkpoints if key not in other.infos)
            named = (" or ".join(repr(tie) for tie in candidates) if len(candidates) <= 3 else
                     f"any of the {len(candidates)} tensors of its dtype and shape that every input holds")
            where = f" (as in {checkpoints[holders[0]].name})" if position else ""
            raise MergeInputError(
                f"not in {absent}, and no tied copy: it is not bitwise equal (dtype, shape and bytes) to "
                f"{named}{where}, so leaving it out would lose its values (only a tied copy, such as GPT-2's "
                f"lm_head.weight beside transformer.wte.weight, may be left out)",
                ingredient=index, key=key, path=checkpoint.name,
            )
        candidates = matching
    return candidates[0]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: the same dtype, shape and bytes (``torch.equal`` calls ``-0.0`` and
    ``0.0`` equal, and NaN unequal to itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def check_has_tensors(checkpoints: Sequence[Checkpoint]) -> None:
    """Refuse a checkpoint that holds no tensors (any format), naming it.

    Its merge would be a file of no tensors that loads into no model; with other inputs it
    would be reported tensor by tensor as missing everything. Readers open such files
    (``fedsoup inspect`` describes them); a merge of models refuses them here.
    """
    for index, checkpoint in enumerate(checkpoints):
        if not checkpoint.infos:
            raise MergeInputError(NO_TENSORS, ingredient=index, path=checkpoint.name)


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
