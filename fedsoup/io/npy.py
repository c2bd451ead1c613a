"""The one ``.npy`` reader: array headers without the data, and zero-copy views of ``np.save`` bytes.

Used by the ``.npz`` reader (headers of archive members) and by the Flower strategy
(Flower serialises every ``Array`` with ``np.save``; a view into the message's bytes
avoids ``Array.numpy()``'s copy). Object arrays are refused: they would need pickle.
"""

from __future__ import annotations

import io
import math
import re
from typing import BinaryIO

import numpy as np

from fedsoup.errors import MergeInputError

__all__ = ["read_npy_header", "npy_header", "npy_view"]

# Enough bytes for any header numpy writes for a plain array (it pads to 64 bytes).
_HEADER_PEEK = 4096
# The header ``np.save`` writes for a plain array, exactly (format 1.0: magic, version, a
# little-endian uint16 length, then this text padded with spaces to a multiple of 64).
_PLAIN_HEADER = re.compile(
    r"\{'descr': '([<>|=][a-zA-Z][0-9]*)', 'fortran_order': (True|False), 'shape': (\([0-9, ]*\)), \} *\n"
)


def read_npy_header(stream: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` data at ``stream``, which is left at the data.

    Raises :class:`~fedsoup.errors.MergeInputError` (a ``ValueError``) for anything but a version 1.0/2.0 header of a non-object dtype.

    The header ``np.save`` writes for a plain array is read by :data:`_PLAIN_HEADER` (a
    strict pattern; the shape must read back as exactly the ``repr`` of its tuple), about
    50x faster than NumPy's own parser (``ast.literal_eval``), which a federated round
    runs once per array of every reply; anything else goes to NumPy's parser.
    """
    fast = _plain_header(stream)
    if fast is not None:
        return fast
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


def _plain_header(stream: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """The common case of :func:`read_npy_header`, or ``None`` (``stream`` left where it was)."""
    start = stream.tell()
    prefix = stream.read(10)
    if len(prefix) == 10 and prefix[:8] == b"\x93NUMPY\x01\x00":
        text = stream.read(int.from_bytes(prefix[8:10], "little")).decode("latin1")
        match = _PLAIN_HEADER.fullmatch(text)
        if match is not None:
            shape = tuple(int(size) for size in match[3][1:-1].split(",") if size.strip())
            try:
                dtype = np.dtype(match[1])
            except TypeError:
                dtype = None
            if repr(shape) == match[3] and dtype is not None and not dtype.hasobject and dtype.str[1:] == match[1][1:]:
                return shape, match[2] == "True", dtype
    stream.seek(start)
    return None


NpyHeader = tuple[tuple[int, ...], bool, np.dtype, int]


def npy_header(data: bytes | bytearray | memoryview) -> NpyHeader:
    """``(shape, fortran_order, dtype, data_offset)`` of ``np.save`` bytes (read from their first bytes).

    Raises ``ValueError`` for an unsupported header or an object dtype.
    """
    head = io.BytesIO(bytes(memoryview(data)[:_HEADER_PEEK]))
    shape, fortran_order, dtype = read_npy_header(head)
    return shape, fortran_order, dtype, head.tell()


def npy_view(data: bytes | bytearray | memoryview, header: NpyHeader | None = None) -> np.ndarray:
    """A read-only NumPy view of ``np.save`` bytes, without copying the data.

    ``header``: :func:`npy_header` of ``data``, when the caller has read it already.
    Raises ``ValueError`` for an unsupported header, an object dtype or too little data.
    """
    shape, fortran_order, dtype, offset = npy_header(data) if header is None else header
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")
