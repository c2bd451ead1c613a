"""Learning-rate schedules and the step plan of AME (docs/design.md §1; paper Sections 3.1 and A.3).

A schedule maps the step ``k`` (1-based, counted over all epochs) and ``V_k``, the
summed (normalised) weight of every ingredient visited in steps ``1..k``, to ``eta_k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

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
        raise ValueError(
            f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)} or a callable k -> lr"
        )
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if schedule == "constant":
        return lambda k, visited: lr
    if schedule == "harmonic":
        return lambda k, visited: lr / visited
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    return lambda k, visited: lr * float(k) ** alpha


def epoch_batches(
    order: list[int], epochs: int, batch_size: int, shuffle: bool, seed: int
) -> Iterator[list[list[int]]]:
    """Each epoch's batches ``B_k`` of ingredient indices, in visiting order.

    With ``shuffle`` every epoch is a fresh permutation of ``order`` drawn from a
    ``torch.Generator`` seeded once with ``seed`` (docs/design.md §1).
    """
    n = len(order)
    generator = torch.Generator().manual_seed(int(seed))
    for _epoch in range(epochs):
        epoch_order = order
        if shuffle:
            epoch_order = [order[i] for i in torch.randperm(n, generator=generator).tolist()]
        yield [epoch_order[start : start + batch_size] for start in range(0, n, batch_size)]


def plan_steps(
    order: list[int], omega: list[float], epochs: int, batch_size: int, shuffle: bool, seed: int
) -> Iterator[tuple[int, list[int], float, float]]:
    """``(k, B_k, Ω_{B_k}, V_k)`` for every step: the batch, its summed weight and ``V_k``."""
    k, visited = 0, 0.0
    for batches in epoch_batches(order, epochs, batch_size, shuffle, seed):
        for batch in batches:
            k += 1
            batch_weight = math.fsum(omega[j] for j in batch)
            visited += batch_weight
            yield k, batch, batch_weight, visited
