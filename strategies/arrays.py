"""A reply's arrays, read as what they *are*: zero-copy views of Flower ``Array`` bytes, checked.

Flower serialises every ``Array`` with ``np.save``; a reply's metadata (``dtype``,
``shape``) is the sender's claim. :func:`read_arrays` checks the claim against the
server's own model and the bytes against the claim before a reply takes part in a
round (docs/design.md §3, "Robustness"); :class:`ArrayProblem` says why not.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from fedsoup.errors import MergeInputError
from fedsoup.inputs import find_non_finite
from fedsoup.io.npy import npy_header, npy_view
from fedsoup.structure import check_structure

__all__ = ["ArrayProblem", "read_arrays", "to_tensor_dict", "to_array_record", "OutputCache"]

class ArrayProblem(Exception):
    """A reply's arrays cannot take part in the round; the message is the reason."""


def read_arrays(
    record: ArrayRecord,
    reference: Mapping[str, Any] | None,
    reference_name: str = "the global model",
    structure: Callable[..., None] | None = None,
) -> dict[str, torch.Tensor]:
    """A reply's arrays as tensors viewing the message bytes, each checked against ``reference``.

    1. Structure, on the metadata, before any data is read: the keys and shapes of
       ``reference`` (``structure``: by default ``fedsoup.structure``, the check
       ``fedsoup.merge`` uses; a LoRA round's allows other ranks) and the
       same dtype *kind* (float, int, unsigned, bool, complex) per array.
    2. Each array's bytes: its ``.npy`` header must equal its metadata (dtype, shape,
       C or Fortran order aside) and the byte length must be exactly header + data.
    3. Values: floating arrays must be finite *in the reference's dtype* (a float64
       1e300 sent for a float32 array is not).

    ``reference`` is the global model (or, without one, the structure most replies have);
    no reply is ever judged against another reply.
    """
    if reference is not None:
        try:
            (structure or check_structure)(reference, dict(record.items()), reference_name=reference_name)
        except MergeInputError as error:
            raise ArrayProblem(f"array {error.key!r} {error.reason}" if error.key is not None else error.reason) from None
        for key, array in record.items():
            got, expected = _kind(array.dtype), _kind(reference[key].dtype)
            if got != expected:
                raise ArrayProblem(
                    f"array {key!r} is {_KIND_NAMES.get(got, got)} ({array.dtype}), "
                    f"but {reference_name} has {_KIND_NAMES.get(expected, expected)} ({_dtype_name(reference[key].dtype)})"
                )
    tensors = {}
    with _read_only_views():
        for key, array in record.items():
            view = _checked_view(key, array)
            if view.dtype.kind not in _KIND_NAMES:  # void, structured, object, str: no tensor holds them
                raise ArrayProblem(f"array {key!r} has dtype {view.dtype} (kind {view.dtype.kind!r}), not a tensor dtype")
            try:
                tensors[key] = _to_tensor(view)
            except (TypeError, ValueError) as error:  # a NumPy dtype torch has no type for
                raise ArrayProblem(f"array {key!r} cannot be a tensor ({error})") from None
            if reference is not None and tensors[key].is_floating_point():
                target = _torch_dtype(reference[key].dtype)
                value = tensors[key] if tensors[key].dtype == target else tensors[key].to(target)
                if find_non_finite({key: value}) is not None:
                    where = "" if value is tensors[key] else f" in {_dtype_name(target)}"
                    raise ArrayProblem(f"array {key!r} contains NaN or Inf{where}")
    return tensors


def _checked_view(key: str, array: Array) -> np.ndarray:
    """A read-only view of ``array``'s bytes after checking that its header agrees with its metadata."""
    if array.stype != SType.NUMPY:
        raise ArrayProblem(f"array {key!r} has serialisation type {array.stype!r}, not {SType.NUMPY!r}")
    data = memoryview(array.data)
    try:
        header = npy_header(data)
        declared = np.dtype(array.dtype)
    except Exception as error:  # noqa: BLE001 - any decoding failure means a bad reply
        raise ArrayProblem(f"array {key!r} cannot be read ({error})") from None
    shape, _, dtype, offset = header
    if dtype != declared:
        raise ArrayProblem(f"array {key!r} holds {dtype.name} data, but its metadata says {declared.name}")
    if shape != tuple(int(n) for n in array.shape):
        raise ArrayProblem(f"array {key!r} holds shape {shape}, but its metadata says {tuple(array.shape)}")
    expected_bytes = offset + dtype.itemsize * math.prod(shape)
    if data.nbytes != expected_bytes:
        raise ArrayProblem(f"array {key!r} cannot be read (it has {data.nbytes} bytes, its header needs {expected_bytes})")
    return npy_view(data, header)


_KIND_NAMES = {"f": "floating", "i": "signed integer", "u": "unsigned integer", "b": "bool", "c": "complex"}


def _kind(dtype: Any) -> str:
    """NumPy's dtype kind letter for a torch or NumPy dtype (or dtype string); ``"?"`` if unknown."""
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return "f"
        if dtype.is_complex:
            return "c"
        if dtype == torch.bool:
            return "b"
        return "i" if dtype.is_signed else "u"
    try:
        return np.dtype(dtype).kind
    except TypeError:
        return "?"


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype).newbyteorder("="))).dtype  # a reference may be big-endian


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else np.dtype(dtype).name


def to_tensor_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord the strategy sends (no checks) as tensors viewing its bytes."""
    with _read_only_views():
        return {key: _to_tensor(_array_view(array)) for key, array in record.items()}


def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as a Flower ArrayRecord (on the CPU, dtypes kept)."""
    return ArrayRecord({key: Array(t.detach().cpu().numpy()) for key, t in tensors.items()})


def _array_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of a Flower ``Array``'s bytes (``Array.numpy()`` copies them).

    Flower serialises arrays with ``np.save`` (no pickle); anything ``fedsoup.io.npy``
    does not read (another serialisation type, an unknown header) goes through
    Flower's own ``Array.numpy()``.
    """
    if array.stype == SType.NUMPY:
        try:
            return npy_view(array.data)
        except ValueError:
            pass
    return array.numpy()


@contextlib.contextmanager
def _read_only_views() -> Iterator[None]:
    """Read-only views of a message's bytes: torch warns that it cannot mark the tensor
    read-only. Nothing here writes to its inputs (fedsoup.merge is pure). One filter per
    record, not per array: a round reads thousands of arrays."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        yield


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor viewing ``array`` (in native byte order); call inside :func:`_read_only_views`."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(array)


class OutputCache:
    """The strategy's last output ArrayRecord and the tensors it was made from.

    Flower hands the strategy's own output back as the next round's ``arrays``: reading
    it again (or serialising the same tensors twice) is avoided by identity, never by value.
    """

    def __init__(self) -> None:
        self._last: tuple[ArrayRecord, dict[str, Array], dict[str, torch.Tensor]] | None = None

    def to_tensors(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """``arrays`` as tensors: our own last output's tensors if it is that record, unchanged."""
        last = self._last
        if (
            last is not None
            and last[0] is arrays
            and arrays.keys() == last[1].keys()
            and all(arrays[k] is last[1][k] for k in arrays)
        ):
            return last[2]
        return to_tensor_dict(arrays)

    def to_arrays(self, tensors: dict[str, torch.Tensor]) -> ArrayRecord:
        """``tensors`` as an ArrayRecord (the cached one if these are the last output's tensors)."""
        last = self._last
        if last is not None and last[2] is tensors:
            return last[0]
        record = to_array_record(tensors)
        self._last = (record, dict(record.items()), tensors)
        return record
