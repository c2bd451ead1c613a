"""Learning-rate schedules and the step plan of AME (docs/design.md §1; paper Sections 3.1 and A.3).

A schedule maps the step ``k`` (1-based, counted over all epochs) and ``V_k``, the
summed (normalised) weight of every ingredient visited in steps ``1..k``, to ``eta_k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedsoup.errors import OptionError, closest_name

Schedule = Callable[[int, float], float]

SCHEDULES = ("constant", "harmonic", "poly")


def make_schedule(
    schedule: str | Callable[[int], float], lr: float, alpha: float = -1.1
) -> Schedule:
    r"""Build ``eta(k, V_k)`` from a schedule name or a callable ``k -> eta_k``.

    - ``"constant"``: :math:`\eta_k = \eta_0`.
    - ``"harmonic"``: :math:`\eta_k = \eta_0 / V_k`; with SGD and ``lr=1`` one epoch
      is exactly the weighted soup (Section 3.1): step ``k`` moves ``w`` to the mean
      of everything seen so far.
    - ``"poly"``: :math:`\eta_k = \eta_0 k^\alpha` (Prop. 2 wants :math:`\alpha < -1`;
      :math:`\alpha=-1` is the per-step :math:`\eta_0/k` decay).
    - a callable: :math:`\eta_k` = ``schedule(k)`` (``lr`` is ignored).
    """
    if callable(schedule):
        user_schedule = schedule
        return lambda k, visited: float(user_schedule(k))
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise OptionError(
            "schedule", schedule, f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)} or a callable k -> lr",
            suggestion=closest_name(str(schedule), SCHEDULES),
        )
    if not math.isfinite(lr) or lr < 0:
        raise OptionError("lr", lr, f"lr must be a finite number >= 0, got {lr!r}")
    if schedule == "constant":
        return lambda k, visited: lr
    if schedule == "harmonic":
        return lambda k, visited: lr / visited
    if not math.isfinite(alpha):
        raise OptionError("alpha", alpha, f"alpha must be finite, got {alpha!r}")
    return lambda k, visited: lr * float(k) ** alpha


@dataclass(frozen=True)
class StepPlan:
    """Every step of a merge as arrays (docs/design.md §1): step ``k`` (from 1) visits the
    ingredients ``members[starts[k-1]:starts[k]]``, whose summed weight is
    ``batch_weights[k-1]`` (``Ω_{B_k}``); ``visited[k-1]`` is ``V_k``."""

    members: np.ndarray  # int64, every epoch's visiting order, concatenated
    starts: np.ndarray  # int64 [S + 1]
    batch_weights: np.ndarray  # float64 [S]
    visited: np.ndarray  # float64 [S]

    def __len__(self) -> int:
        return self.batch_weights.size

    def __iter__(self) -> Iterator[tuple[int, list[int], float, float]]:
        """``(k, B_k, Ω_{B_k}, V_k)`` for every step."""
        members, starts = self.members.tolist(), self.starts.tolist()
        for index, (weight, visited) in enumerate(zip(self.batch_weights.tolist(), self.visited.tolist())):
            yield index + 1, members[starts[index] : starts[index + 1]], weight, visited


def plan_steps(
    order: list[int], omega: list[float], epochs: int, batch_size: int, shuffle: bool, seed: int
) -> StepPlan:
    """The batches ``B_k`` of every epoch, their weights ``Ω_{B_k}`` and ``V_k``.

    Each epoch visits ``order``, or with ``shuffle`` a fresh permutation of it drawn from
    a ``torch.Generator`` seeded once with ``seed``, cut into batches of ``batch_size``
    (the last may be smaller).
    """
    n = len(order)
    order_tensor = torch.tensor(order, dtype=torch.int64)
    generator = torch.Generator().manual_seed(int(seed))
    rows = [order_tensor[torch.randperm(n, generator=generator)] if shuffle else order_tensor for _ in range(epochs)]
    members = torch.cat(rows).numpy()
    starts = (np.arange(epochs, dtype=np.int64)[:, None] * n + np.arange(0, n, batch_size)).reshape(-1)
    batch_weights = np.add.reduceat(np.asarray(omega, dtype=np.float64)[members], starts)
    visited = np.cumsum(batch_weights)  # sequential: V_k = V_{k-1} + Ω_{B_k}
    return StepPlan(members, np.append(starts, members.size), batch_weights, visited)
