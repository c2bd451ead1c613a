"""The one structure check of merge inputs: same tensor names, shapes and kinds.

Used by :func:`fedsoup.merge` (on tensors), the checkpoint readers (on header
information, before any tensor is read) and the Flower strategy (on a reply's array
metadata, before it is deserialised). A value is anything with ``.shape`` and
``.dtype``: a ``torch.Tensor``, a ``numpy.ndarray``, a :class:`fedsoup.io.TensorInfo`,
or a Flower ``Array`` (whose dtype is a NumPy dtype string). Two tensors can be merged
when both are floating point or both are not (the dtype itself may differ: a bf16 and
an fp32 ingredient merge in float32).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from fedsoup.errors import MergeInputError

__all__ = ["is_floating_dtype", "structure_differences", "check_structure"]


def is_floating_dtype(dtype: Any) -> bool:
    """True for a floating-point torch dtype, NumPy dtype or NumPy dtype string (``"<f4"``).

    Raises ``TypeError`` for something that is not a dtype.
    """
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return np.dtype(dtype).kind == "f"


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(size) for size in value.shape)


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _dtype_str(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def structure_differences(
    reference: Mapping[str, Any], other: Mapping[str, Any], reference_name: str = "ingredient 0"
) -> Iterator[tuple[str, str]]:
    """Every ``(key, reason)`` that keeps ``other`` from being merged with ``reference``.

    Missing keys first, then unexpected keys, then shapes and kinds in ``reference``'s
    order. Only ``.shape`` and ``.dtype`` are looked at: no tensor data is read.
    """
    for key in reference:
        if key not in other:
            yield key, f"missing (present in {reference_name})"
    for key in other:
        if key not in reference:
            yield key, f"not in {reference_name}"
    for key, expected in reference.items():
        got = other.get(key)
        if got is None:
            continue
        if _shape(got) != _shape(expected):
            yield key, f"has shape {_shape_str(_shape(got))}, but {reference_name} has {_shape_str(_shape(expected))}"
            continue
        try:
            floating = is_floating_dtype(got.dtype)
        except TypeError:
            yield key, f"has unknown dtype {got.dtype!r}"
            continue
        if floating != is_floating_dtype(expected.dtype):
            yield key, (
                f"is {_dtype_str(got.dtype)}, but {reference_name} has {_dtype_str(expected.dtype)} "
                "(floating and non-floating tensors cannot be merged)"
            )


def check_structure(
    reference: Mapping[str, Any],
    other: Mapping[str, Any],
    *,
    ingredient: int | None = None,
    path: str | None = None,
    reference_name: str = "ingredient 0",
) -> None:
    """Raise :class:`~fedsoup.errors.MergeInputError` at the first difference.

    The error's ``key`` is the tensor, ``ingredient``/``path`` say which input it is; the
    message adds how many more differences there are.
    """
    differences = structure_differences(reference, other, reference_name)
    first = next(differences, None)
    if first is None:
        return
    more = sum(1 for _ in differences)
    key, reason = first
    if more:
        reason += f" (and {more} more difference{'s' if more > 1 else ''})"
    raise MergeInputError(reason, ingredient=ingredient, key=key, path=path)
