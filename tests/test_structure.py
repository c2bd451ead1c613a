"""The one structure check: on tensors, arrays, header infos and dtype strings alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsoup.errors import MergeInputError
from fedsoup.io import TensorInfo
from fedsoup.structure import check_structure, is_floating_dtype, structure_differences


class ArrayLike:
    """What a Flower ``Array`` exposes without deserialising: shape and a NumPy dtype string."""

    def __init__(self, shape, dtype: str):
        self.shape, self.dtype = shape, dtype


def test_every_kind_of_value_is_checked_from_shape_and_dtype_alone():
    reference = {"w": torch.zeros(2, 3), "n": torch.tensor(1)}
    for other in (
        {"w": np.zeros((2, 3), np.float16), "n": np.array(2)},
        {"w": TensorInfo((2, 3), torch.bfloat16), "n": TensorInfo((), torch.int64)},
        {"w": ArrayLike((2, 3), "<f4"), "n": ArrayLike((), "int64")},
    ):
        assert list(structure_differences(reference, other)) == []
        check_structure(reference, other)


def test_differences_in_order_and_the_first_raised_with_its_culprit():
    reference = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    other = {"b": np.zeros(4, np.float32), "c": ArrayLike((1,), "int32"), "z": torch.zeros(1)}
    assert list(structure_differences(reference, other, "the global model")) == [
        ("a", "missing (present in the global model)"),
        ("z", "not in the global model"),
        ("b", "has shape (4,), but the global model has (3,)"),
        ("c", "is int32, but the global model has float32 (floating and non-floating tensors cannot be merged)"),
    ]
    with pytest.raises(MergeInputError, match=r"^c\.pt, tensor 'a': missing \(present in ingredient 0\) "
                                              r"\(and 3 more differences\)$") as info:
        check_structure(reference, other, ingredient=4, path="c.pt")
    assert (info.value.ingredient, info.value.key, info.value.path) == (4, "a", "c.pt")


def test_unknown_dtype_is_a_difference_not_a_crash():
    assert list(structure_differences({"w": torch.zeros(1)}, {"w": ArrayLike((1,), "no-such-dtype")})) == [
        ("w", "has unknown dtype 'no-such-dtype'")
    ]
    assert is_floating_dtype("float64") and not is_floating_dtype(np.dtype("int8")) and is_floating_dtype(torch.half)
