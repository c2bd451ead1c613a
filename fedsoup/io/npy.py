"""The one ``.npy`` reader: array headers without the data, and zero-copy views of ``np.save`` bytes.

Used by the ``.npz`` reader (headers of archive members) and by the Flower strategy
(Flower serialises every ``Array`` with ``np.save``; a view into the message's bytes
avoids ``Array.numpy()``'s copy). Object arrays are refused: they would need pickle.
"""

from __future__ import annotations

import io
import math
from typing import BinaryIO

import numpy as np

from fedsoup.errors import MergeInputError

__all__ = ["read_npy_header", "npy_view"]

# Enough bytes for any header numpy writes for a plain array (it pads to 64 bytes).
_HEADER_PEEK = 4096


def read_npy_header(stream: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` data at ``stream``, which is left at the data.

    Raises :class:`~fedsoup.errors.MergeInputError` (a ``ValueError``) for anything but a version 1.0/2.0 header of a non-object dtype.
    """
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise MergeInputError(f".npy format version {version[0]}.{version[1]} is not supported")
    if dtype.hasobject:
        raise MergeInputError(f"dtype {dtype} holds Python objects (would need pickle)")
    return tuple(int(size) for size in shape), bool(fortran_order), dtype


def npy_view(data: bytes | bytearray | memoryview) -> np.ndarray:
    """A read-only NumPy view of ``np.save`` bytes, without copying the data.

    Raises ``ValueError`` for an unsupported header, an object dtype or too little data.
    """
    head = io.BytesIO(bytes(memoryview(data)[:_HEADER_PEEK]))
    shape, fortran_order, dtype = read_npy_header(head)
    count = math.prod(shape)
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=head.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")
