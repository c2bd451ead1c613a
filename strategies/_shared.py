"""Small helpers shared by the ClientSoup and the ServerStew."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["model_distance", "format_kwargs", "optimizer_name"]


def model_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """‖a − b‖ over the floating arrays (per-array norms summed in float64)."""
    return math.sqrt(math.fsum(float(torch.dist(a[k], b[k])) ** 2 for k in a if a[k].is_floating_point()))


def format_kwargs(kwargs: Mapping[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, type):
            return value.__qualname__
        if callable(value):
            return getattr(value, "__qualname__", repr(value))
        return repr(value)

    return ", ".join(f"{k}={fmt(v)}" for k, v in kwargs.items())


def optimizer_name(optimizer: Any) -> str:
    return optimizer if isinstance(optimizer, str) else f"{optimizer.__module__}.{optimizer.__qualname__}"
