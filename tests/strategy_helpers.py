"""Helpers shared by the strategy tests: a Flower ``ArrayRecord`` compared as NumPy arrays."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord


def as_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` of a Flower ``ArrayRecord``."""
    return {k: a.numpy() for k, a in arrays.items()}


def assert_same_model(got: ArrayRecord, expected: ArrayRecord) -> None:
    """The same keys, dtypes and values, bit for bit."""
    got, expected = as_numpy(got), as_numpy(expected)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
