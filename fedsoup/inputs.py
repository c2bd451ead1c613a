"""Checking and normalising what ``fedsoup.merge`` and ``fedsoup.soup`` are given.

Everything here runs before any merging: ingredients become ``dict[str, Tensor]``
with equal keys, shapes and kinds (floating or not); weights are normalised to sum 1
(docs/design.md §1); the visiting order and the pivot initialisation ``w_0`` are
resolved; and NaN/Inf is traced back to the ingredient and tensor it came from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "StateDict",
    "as_state_dicts",
    "check_structures",
    "check_same_structure",
    "normalised_weights",
    "visiting_order",
    "resolve_pivot",
    "compute_dtype",
    "find_non_finite",
    "first_non_finite",
    "raise_if_not_finite",
]

StateDict = dict[str, torch.Tensor]


def as_tensor(value, index: int, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"ingredient {index}, tensor {key!r}: object arrays are not tensors")
        if not value.flags.writeable:
            return torch.tensor(value)
        # np.ascontiguousarray would make a 0-d array 1-d.
        return torch.from_numpy(value if value.flags.c_contiguous else np.ascontiguousarray(value))
    raise ValueError(
        f"ingredient {index}, tensor {key!r}: expected torch.Tensor or numpy.ndarray, "
        f"got {type(value).__name__}"
    )


def as_state_dicts(models) -> list[StateDict]:
    if isinstance(models, Mapping) or not isinstance(models, Sequence):
        raise ValueError("models must be a sequence of state dicts (Mapping[str, Tensor])")
    if len(models) == 0:
        raise ValueError("cannot merge an empty list of models")
    state_dicts = []
    for index, model in enumerate(models):
        if not isinstance(model, Mapping):
            raise ValueError(
                f"ingredient {index}: expected a mapping of tensors (e.g. model.state_dict()), "
                f"got {type(model).__name__}"
            )
        state_dicts.append({str(k): as_tensor(v, index, str(k)) for k, v in model.items()})
    return state_dicts


def check_same_structure(reference: StateDict, other: StateDict, name: str) -> None:
    """Raise ValueError naming ``name`` and the first key that does not match."""
    if other.keys() != reference.keys():
        missing = sorted(reference.keys() - other.keys())
        extra = sorted(other.keys() - reference.keys())
        parts = []
        if missing:
            parts.append(f"missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            parts.append(f"unexpected tensor {extra[0]!r}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
        raise ValueError(f"{name}: {', '.join(parts)} compared with ingredient 0")
    for key, ref in reference.items():
        tensor = other[key]
        if tensor.shape != ref.shape:
            raise ValueError(
                f"{name}, tensor {key!r}: shape {tuple(tensor.shape)} != {tuple(ref.shape)} of ingredient 0"
            )
        if tensor.is_floating_point() != ref.is_floating_point():
            raise ValueError(
                f"{name}, tensor {key!r}: dtype {tensor.dtype} cannot be merged with "
                f"{ref.dtype} of ingredient 0 (floating and non-floating)"
            )


def check_structures(state_dicts: list[StateDict]) -> None:
    for index, state_dict in enumerate(state_dicts[1:], start=1):
        check_same_structure(state_dicts[0], state_dict, f"ingredient {index}")


def normalised_weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    values = [float(w) for w in (weights.tolist() if hasattr(weights, "tolist") else weights)]
    if len(values) != n:
        raise ValueError(f"weights has {len(values)} entries for {n} ingredients")
    for index, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"ingredient {index}: weight must be finite and >= 0, got {value}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError("weights sum to zero: at least one ingredient needs a positive weight")
    return [value / total for value in values]


def visiting_order(n: int, order_by, descending: bool) -> list[int]:
    if order_by is None:
        return list(range(n))
    scores = [float(s) for s in (order_by.tolist() if hasattr(order_by, "tolist") else order_by)]
    if len(scores) != n:
        raise ValueError(f"order_by has {len(scores)} scores for {n} ingredients")
    for index, score in enumerate(scores):
        if math.isnan(score):
            raise ValueError(f"ingredient {index}: order_by score is NaN")
    # Python's sort is stable also with reverse=True: ties keep the given order.
    return sorted(range(n), key=scores.__getitem__, reverse=descending)


def resolve_pivot(pivot, state_dicts: list[StateDict], order: list[int]) -> StateDict | None:
    """The pivot initialisation ``w_0``; ``None`` stands for the soup."""
    if isinstance(pivot, str):
        if pivot == "soup":
            return None
        if pivot == "first":
            return state_dicts[order[0]]
        raise ValueError(f"unknown pivot {pivot!r}: use 'soup', 'first', an ingredient index or a state dict")
    if isinstance(pivot, bool):
        raise ValueError(f"pivot must be 'soup', 'first', an index or a state dict, got {pivot!r}")
    if isinstance(pivot, (int, np.integer)):
        index = int(pivot)
        if not -len(state_dicts) <= index < len(state_dicts):
            raise ValueError(f"pivot index {index} out of range for {len(state_dicts)} ingredients")
        return state_dicts[index]
    if isinstance(pivot, Mapping):
        explicit = {str(k): as_tensor(v, -1, str(k)) for k, v in pivot.items()}
        check_same_structure(state_dicts[0], explicit, "pivot")
        return explicit
    raise ValueError(f"pivot must be 'soup', 'first', an index or a state dict, got {type(pivot).__name__}")


def compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf.

    Any NaN/Inf makes the sum non-finite, and a sum is one cheap reduction
    (``isfinite(t).all()`` writes a bool tensor first); only a non-finite sum,
    which may also be an overflow of large values, needs the element-wise test.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def find_non_finite(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The first floating tensor's key holding NaN or Inf, or ``None``."""
    return next(
        (key for key, tensor in state_dict.items() if tensor.is_floating_point() and not _all_finite(tensor)),
        None,
    )


def first_non_finite(state_dicts: list[StateDict], names: list[str]) -> str | None:
    for name, state_dict in zip(names, state_dicts):
        key = find_non_finite(state_dict)
        if key is not None:
            return f"{name}, tensor {key!r}: contains NaN or Inf values"
    return None


def raise_if_not_finite(result: StateDict, state_dicts: list[StateDict], pivot: StateDict | None) -> None:
    """NaN/Inf in any ingredient reaches the result; only then look for the culprit."""
    bad_key = find_non_finite(result)
    if bad_key is None:
        return
    names = [f"ingredient {i}" for i in range(len(state_dicts))]
    culprit = first_non_finite(state_dicts, names)
    if culprit is None and pivot is not None:
        culprit = first_non_finite([pivot], ["pivot"])
    if culprit is not None:
        raise ValueError(culprit)
    raise ValueError(
        f"merge diverged: tensor {bad_key!r} of the result is NaN or Inf although every "
        "ingredient is finite; lower lr or change the optimizer settings"
    )
