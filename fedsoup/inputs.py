"""Checking and normalising what ``fedsoup.merge`` and ``fedsoup.soup`` are given.

Everything here runs before any merging: ingredients become ``dict[str, Tensor]``
with equal keys, shapes and kinds (floating or not); weights are normalised to sum 1
(docs/design.md §1); the visiting order and the pivot initialisation ``w_0`` are
resolved; and NaN/Inf is traced back to the ingredient and tensor it came from.
Bad data raises :class:`~fedsoup.errors.MergeInputError` (``ingredient``, ``key``);
bad option values :class:`~fedsoup.errors.OptionError`.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedsoup.errors import MergeInputError, OptionError
from fedsoup.report import counted
from fedsoup.structure import check_structure

__all__ = [
    "StateDict",
    "NO_TENSORS",
    "as_state_dicts",
    "check_structures",
    "normalised_weights",
    "visiting_order",
    "resolve_pivot",
    "compute_dtype",
    "output_dtype",
    "find_non_finite",
    "first_non_finite",
    "raise_if_not_finite",
]

StateDict = dict[str, torch.Tensor]
# The reason an ingredient (a state dict, a file) of no tensors is refused: its merge is no model.
NO_TENSORS = "holds no tensors"


def as_tensor(value, index: int | None, key: str) -> torch.Tensor:
    """``value`` as a tensor; ``index`` is the ingredient (``None`` for the pivot)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise MergeInputError("object arrays are not tensors", ingredient=index, key=key)
        if not value.flags.writeable:
            return torch.tensor(value)
        # np.ascontiguousarray would make a 0-d array 1-d.
        return torch.from_numpy(value if value.flags.c_contiguous else np.ascontiguousarray(value))
    raise MergeInputError(
        f"expected torch.Tensor or numpy.ndarray, got {type(value).__name__}", ingredient=index, key=key
    )


def as_state_dicts(models) -> list[StateDict]:
    if isinstance(models, Mapping) or not isinstance(models, Sequence):
        raise MergeInputError("models must be a sequence of state dicts (Mapping[str, Tensor])")
    if len(models) == 0:
        raise MergeInputError("cannot merge an empty list of models")
    state_dicts = []
    for index, model in enumerate(models):
        if not isinstance(model, Mapping):
            raise MergeInputError(
                f"expected a mapping of tensors (e.g. model.state_dict()), got {type(model).__name__}",
                ingredient=index,
            )
        if not model:  # a model of nothing, as merge_files refuses a file of no tensors
            raise MergeInputError(NO_TENSORS, ingredient=index)
        state_dicts.append({str(k): as_tensor(v, index, str(k)) for k, v in model.items()})
    return state_dicts


def check_structures(state_dicts: list[StateDict]) -> None:
    """Same keys, shapes and kinds for all (:func:`fedsoup.structure.check_structure`).

    The error blames the ingredient that differs: the reference is the structure most
    ingredients share (the earliest such ingredient names it), so one odd ingredient is
    named whatever its position, even first. Without a majority (e.g. two ingredients
    that differ) the earliest structure is the reference.
    """
    signatures = [
        frozenset((key, tuple(t.shape), t.is_floating_point()) for key, t in state_dict.items())
        for state_dict in state_dicts
    ]
    counts = Counter(signatures)
    top = max(counts.values())
    reference = next(i for i, signature in enumerate(signatures) if counts[signature] == top)
    if 2 * top <= len(signatures):  # no strict majority: the first structure is the reference
        reference = 0
    for index, state_dict in enumerate(state_dicts):
        if index != reference and signatures[index] != signatures[reference]:
            check_structure(
                state_dicts[reference], state_dict, ingredient=index, reference_name=f"ingredient {reference}"
            )


def per_ingredient(name: str, value) -> list[float] | None:
    """``None``, or one number per ingredient (a sequence, array or tensor), as floats."""
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence) or not all(
            isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in value):
        raise OptionError(name, value, f"{name} must be a list of numbers (one per ingredient), got {value!r}")
    return [float(v) for v in value]


def normalised_weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    values = per_ingredient("weights", weights)
    if len(values) != n:
        raise OptionError("weights", weights, f"weights has {counted(len(values), 'entry', 'entries')} for {counted(n, 'ingredient')}")
    for index, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise MergeInputError(f"weight must be finite and >= 0, got {value}", ingredient=index)
    total = math.fsum(values)
    if total <= 0:
        raise OptionError("weights", weights, "weights sum to zero: at least one ingredient needs a positive weight")
    return [value / total for value in values]


def visiting_order(n: int, order_by, descending: bool) -> list[int]:
    if order_by is None:
        return list(range(n))
    scores = per_ingredient("order_by", order_by)
    if len(scores) != n:
        raise OptionError("order_by", order_by, f"order_by has {counted(len(scores), 'score')} for {counted(n, 'ingredient')}")
    for index, score in enumerate(scores):
        if math.isnan(score):
            raise MergeInputError("order_by score is NaN", ingredient=index)
    # Python's sort is stable also with reverse=True: ties keep the given order.
    return sorted(range(n), key=scores.__getitem__, reverse=descending)


def resolve_pivot(pivot, state_dicts: list[StateDict], order: list[int]) -> StateDict | None:
    """The pivot initialisation ``w_0``; ``None`` stands for the soup."""
    if isinstance(pivot, str):
        if pivot == "soup":
            return None
        if pivot == "first":
            return state_dicts[order[0]]
        raise OptionError("pivot", pivot, f"unknown pivot {pivot!r}: use 'soup', 'first', an ingredient index or a state dict")
    if isinstance(pivot, bool):
        raise OptionError("pivot", pivot, f"pivot must be 'soup', 'first', an index or a state dict, got {pivot!r}")
    if isinstance(pivot, (int, np.integer)):
        index = int(pivot)
        if not -len(state_dicts) <= index < len(state_dicts):
            raise OptionError("pivot", pivot, f"pivot index {index} out of range for {counted(len(state_dicts), 'ingredient')}")
        return state_dicts[index]
    if isinstance(pivot, Mapping):
        explicit = {str(k): as_tensor(v, None, str(k)) for k, v in pivot.items()}
        try:
            check_structure(state_dicts[0], explicit)
        except MergeInputError as error:
            raise MergeInputError(f"pivot {error.reason}", key=error.key) from None
        return explicit
    raise OptionError("pivot", pivot, f"pivot must be 'soup', 'first', an index or a state dict, got {type(pivot).__name__}")


def compute_dtype(tensors: Sequence[torch.Tensor], output: torch.dtype | None = None) -> torch.dtype:
    """float64 if any input (or the ``output`` dtype asked for) is float64, else float32 (bf16/fp16 are upcast)."""
    wide = output == torch.float64 or any(t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


# Output dtypes by the names users type (--dtype bf16).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The floating dtype a merge writes (a ``torch.dtype`` or a name such as ``"bf16"``), or ``None``: the inputs'."""
    if dtype is None:
        return None
    resolved = DTYPE_NAMES.get(dtype.lower().removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point or not _castable(resolved):
        raise OptionError("dtype", dtype, f"dtype {dtype!r}: use a floating dtype such as "
                          "float32, float16, bfloat16 (fp32, fp16, bf16) or float64")
    return resolved


def _castable(dtype: torch.dtype) -> bool:
    """Whether torch casts a float into ``dtype`` (not into float4_e2m1fn_x2, two values a byte)."""
    try:
        torch.zeros(1).to(dtype)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf.

    Any NaN/Inf makes the sum non-finite, and a sum is one cheap reduction
    (``isfinite(t).all()`` writes a bool tensor first); only a non-finite sum,
    which may also be an overflow of large values, needs the element-wise test. The
    sum is tested as a Python float (no second kernel: a federated round tests thousands
    of small arrays).
    """
    if tensor.dtype.itemsize == 1:  # FP8: torch has no sum (nor isfinite) for it; exact upcast
        tensor = tensor.to(torch.float32)
    if math.isfinite(tensor.sum().item()):
        return True
    return bool(torch.isfinite(tensor).all())


def find_non_finite(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The first floating tensor's key holding NaN or Inf, or ``None``."""
    return next(
        (key for key, tensor in state_dict.items() if tensor.is_floating_point() and not _all_finite(tensor)),
        None,
    )


def first_non_finite(state_dicts: list[StateDict]) -> MergeInputError | None:
    """The error to raise for the first ingredient holding NaN or Inf (``ingredient``, ``key``), or ``None``."""
    for index, state_dict in enumerate(state_dicts):
        key = find_non_finite(state_dict)
        if key is not None:
            return MergeInputError("contains NaN or Inf values", ingredient=index, key=key)
    return None


def raise_if_not_finite(result: StateDict, state_dicts: list[StateDict], pivot: StateDict | None,
                        dtype: torch.dtype | None = None) -> None:
    """NaN/Inf in any ingredient reaches the result; only then look for the culprit: an
    ingredient, the pivot, values beyond the range of the ``dtype`` asked for, or the merge."""
    bad_key = find_non_finite(result)
    if bad_key is None:
        return
    culprit = first_non_finite(state_dicts)
    if culprit is not None:
        raise culprit
    pivot_key = find_non_finite(pivot) if pivot is not None else None
    if pivot_key is not None:
        raise MergeInputError("pivot contains NaN or Inf values", key=pivot_key)
    if dtype is not None:
        largest = torch.finfo(dtype).max
        if any(float(sd[bad_key].double().abs().max()) > largest for sd in state_dicts if sd[bad_key].numel()):
            name = str(dtype).removeprefix("torch.")
            raise OptionError("dtype", name, f"tensor {bad_key!r} holds values beyond {name}'s range "
                              f"(±{largest:g}): the merge cannot be written in {name}; choose a wider dtype")
    raise OptionError(
        "lr", None,
        f"merge diverged: tensor {bad_key!r} of the result is NaN or Inf although every "
        "ingredient is finite; lower lr or change the optimizer settings",
    )
