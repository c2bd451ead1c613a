"""``fedsoup.inspect_files``: what checkpoints hold and why they cannot be merged (``fedsoup inspect``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from fedsoup.io.checks import differences
from fedsoup.io.formats import dtype_str
from fedsoup.io.resolve import expand_inputs, open_checkpoint

__all__ = ["inspect_files"]


def inspect_files(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Describe checkpoints from their headers (no tensor data is read for safetensors and ``.npz``).

    Returns ``{"checkpoints": [{"file", "format", "tensors", "parameters", "bytes",
    "metadata", "keys": {key: {"dtype", "shape"}}}, ...], "differences": [line, ...]}``,
    where ``differences`` lists every tensor that keeps an input from being merged with
    the first. Raises :class:`~fedsoup.errors.MergeInputError` for an unreadable file.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    reports = []
    with contextlib.ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(item)) for item in expand_inputs(inputs)]
        for checkpoint in checkpoints:
            reports.append({
                "file": checkpoint.name,
                "format": checkpoint.format,
                "tensors": len(checkpoint.infos),
                "parameters": checkpoint.numel,
                "bytes": checkpoint.nbytes,
                "metadata": checkpoint.metadata,
                "keys": {key: {"dtype": dtype_str(info.dtype), "shape": list(info.shape)}
                         for key, info in checkpoint.infos.items()},
            })
        mismatches = [line for other in checkpoints[1:] for line in differences(checkpoints[0], other)]
    return {"checkpoints": reports, "differences": mismatches}
