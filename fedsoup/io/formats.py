"""File formats: suffixes, safetensors dtype codes, and :class:`TensorInfo` (shape and dtype from headers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedsoup.inputs import DTYPE_NAMES as _DTYPE_NAMES

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
NUMPY_SUFFIX = ".npz"
INDEX_SUFFIX = ".index.json"
# The one top-level wrapper key (checked in this order) holding the tensors of a
# training checkpoint, e.g. PyTorch Lightning's {"state_dict": ..., "epoch": ...}.
WRAPPER_KEYS = ("state_dict", "model")

# safetensors dtype codes (the format's spec); little-endian on disk.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
CODE_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}

# Output dtypes by the names users type (--dtype bf16): fedsoup.inputs.output_dtype reads them.
DTYPE_NAMES = _DTYPE_NAMES


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ("," if len(shape) == 1 else "") + ")"


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
