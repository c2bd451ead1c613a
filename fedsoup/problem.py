"""A checked AME merge problem: what every merge path (reference, torch fast paths,
fused kernel) is handed once ``fedsoup.merge`` has validated its arguments."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsoup.inputs import StateDict, compute_dtype
from fedsoup.schedules import Schedule, make_schedule

__all__ = ["Problem", "LearningRate"]

# One base learning rate for every tensor, or one per tensor key.
LearningRate = float | Mapping[str, float]


@dataclass
class Problem:
    """Ingredients ``x_i`` with normalised weights ``ω_i``, the visiting order, the pivot
    initialisation ``w_0`` (``None``: the soup) and the optimizer settings (docs/design.md §1)."""

    state_dicts: list[StateDict]
    omega: list[float]
    order: list[int]
    pivot: StateDict | None
    optimizer: type[torch.optim.Optimizer]
    optimizer_kwargs: dict[str, Any]
    lr: LearningRate = 1.0
    schedule: str | Callable[[int], float] = "harmonic"
    alpha: float = -1.1
    epochs: int = 1
    batch_size: int = 1
    shuffle: bool = False
    seed: int = 0
    adaptive_pivot: bool = True
    amplification: float | Callable[[int], float] = 1.0
    greedy: bool = False
    evaluate: Callable[[StateDict], float] | None = None
    project: bool = False
    device: torch.device = torch.device("cpu")
    _schedules: dict[float, Schedule] = field(default_factory=dict, repr=False)

    @property
    def first(self) -> StateDict:
        """The first ingredient in visiting order (source of the non-floating tensors)."""
        return self.state_dicts[self.order[0]]

    @property
    def float_keys(self) -> list[str]:
        return [key for key, tensor in self.first.items() if tensor.is_floating_point()]

    def compute_dtype(self, key: str) -> torch.dtype:
        return compute_dtype([sd[key] for sd in self.state_dicts])

    def base_lr(self, key: str) -> float:
        """``η_0`` of a tensor: the one ``lr`` or its entry in a per-key mapping."""
        return float(self.lr[key]) if isinstance(self.lr, Mapping) else float(self.lr)

    def step_size(self, base_lr: float, k: int, visited: float) -> float:
        """``η_k`` for a tensor whose base learning rate is ``base_lr``."""
        schedule = self._schedules.get(base_lr)
        if schedule is None:
            schedule = self._schedules[base_lr] = make_schedule(self.schedule, base_lr, self.alpha)
        return schedule(k, visited)

    def step_sizes(self, base_lr: float, visited: np.ndarray) -> np.ndarray:
        """``η_k`` of every step ``k = 1..len(visited)`` (``visited``: ``V_k``), as an array."""
        if callable(self.schedule) or self.schedule not in ("constant", "harmonic"):
            return np.array([self.step_size(base_lr, k, v) for k, v in enumerate(visited.tolist(), start=1)])
        if self.schedule == "constant":
            return np.full(visited.size, float(base_lr))
        return float(base_lr) / visited  # harmonic: the same float division as lr / V_k

    def zeta(self, k: int) -> float:
        """The amplification ``ζ_k``."""
        return float(self.amplification(k)) if callable(self.amplification) else float(self.amplification)

    def result(self, merged: Mapping[str, torch.Tensor]) -> StateDict:
        """The merged state dict on ``device``: floating tensors from ``merged`` (buffers the
        merge owns) in each key's input dtype, the others cloned from the first ingredient
        in visiting order."""
        return {
            key: merged[key].to(self.device, tensor.dtype) if key in merged else tensor.to(self.device, copy=True)
            for key, tensor in self.first.items()
        }
