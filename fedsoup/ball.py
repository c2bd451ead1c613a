"""The ball guard of Proposition 2, and the spreads of the ingredients it and the lr default read.

The guard (Proposition 2). The ball centred at the soup ``s`` whose radius is the
farthest of the ingredients and the pivot,
``R = max(max_i ‖x_i − s‖, ‖w_0 − s‖)`` (over the whole model), holds everything a
convex combination of the inputs can reach; ``project=True`` keeps the merge inside it.
A merge that ends outside it, ``‖w − s‖ > R``, went farther from the soup than any
ingredient is: :func:`ball_warning` says by how much and what to change, and the merge
logs it as one WARNING on the ``"fedsoup"`` logger and returns it in its
:class:`~fedsoup.report.MergeReport`. A merge done in parts (tensor by tensor,
``--low-memory``) sums the parts' balls (:meth:`BallCheck.extend`, exact in any split) and
checks the model-level ball once, at the end: the same decision as in memory. Nothing is
kept in module state: every figure travels in the returned values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["KeySpread", "Spreads", "BallCheck", "measure_spreads", "ball_warning", "ball_from_distances", "SPREAD_CHUNK"]

# A result this much (relatively) beyond the radius is float rounding, not a warning.
_BALL_TOLERANCE = 1e-5


@dataclass(frozen=True)
class KeySpread:
    """The spread of one tensor key: ``‖x_i − s‖²`` per ingredient and ``‖w_0 − s‖²``."""

    ingredient_sq: tuple[float, ...]
    pivot_sq: float
    numel: int

    def mean_sq_to_pivot(self, omega: Sequence[float]) -> float:
        """``Σ ω_i ‖x_i − w_0‖²`` by the parallel-axis identity (``s`` is the weighted mean)."""
        return math.fsum(w * d for w, d in zip(omega, self.ingredient_sq)) + self.pivot_sq


@dataclass
class BallCheck:
    """Proposition 2's ball over a whole model, summed key by key (exact in any split).

    ``extend`` adds the figures of other keys of the same model.
    """

    ingredient_sq: list[float] = field(default_factory=list)
    pivot_sq: float = 0.0
    result_sq: float = 0.0

    def extend(self, other: BallCheck) -> None:
        """Add another part of the same model (other keys, same ingredients)."""
        if not self.ingredient_sq:
            self.ingredient_sq = [0.0] * len(other.ingredient_sq)
        self.ingredient_sq = [a + b for a, b in zip(self.ingredient_sq, other.ingredient_sq)]
        self.pivot_sq += other.pivot_sq
        self.result_sq += other.result_sq

    @property
    def radius(self) -> float:
        """``R = max(max_i ‖x_i − s‖, ‖w_0 − s‖)``."""
        return math.sqrt(max(max(self.ingredient_sq, default=0.0), self.pivot_sq))

    @property
    def distance(self) -> float:
        """``‖w − s‖``: how far the merge ended from the soup."""
        return math.sqrt(self.result_sq)

    def outside(self) -> bool:
        radius = self.radius
        return self.distance > radius * (1 + _BALL_TOLERANCE) + 1e-30



def ball_warning(ball: BallCheck, *, lr_given: bool, describe: str = "") -> str | None:
    """The WARNING for a merge that ended outside the ball (what to change), or ``None``."""
    if not ball.outside():
        return None
    radius, distance = ball.radius, ball.distance
    ratio = distance / radius if radius > 0 else math.inf
    advice = "lower lr" if lr_given else "pass a smaller lr than the scale-aware default"
    return (
        f"AME merge{describe} ended outside the ball of Proposition 2: {distance:.4g} from the soup, {ratio:.3g}x "
        f"the ball's radius {radius:.4g} (the farthest ingredient or pivot), i.e. farther than any ingredient. "
        f"Fix: {advice}, or pass project=True to keep the merge inside the ball."
    )


def ball_from_distances(distances: Mapping[str, Sequence[float]]) -> BallCheck:
    """The ball from per-key rows ``[‖x_j − s‖² (some or all j), ‖w_0 − s‖², ‖w − s‖²]``
    (:func:`fedsoup.fused.merge_fused`). With only some ingredients, its radius is a lower
    bound of ``R``: a merge inside it is inside the ball."""
    ball = BallCheck()
    for row in distances.values():
        ball.extend(BallCheck([float(d) for d in row[:-2]], float(row[-2]), float(row[-1])))
    return ball



@dataclass
class Spreads:
    """Per key: the weighted soup ``s_t`` and the :class:`KeySpread` around it."""

    soups: dict[str, torch.Tensor]
    keys: dict[str, KeySpread]

    def ball(self, result: Mapping[str, torch.Tensor]) -> BallCheck:
        """Proposition 2's ball of the whole model, with ``‖w − s‖²`` of ``result``."""
        ball = BallCheck()
        for key, spread in self.keys.items():
            soup = self.soups[key]
            distance = float(torch.dist(result[key].to(soup.device, soup.dtype), soup))
            ball.extend(BallCheck(list(spread.ingredient_sq), spread.pivot_sq, distance * distance))
        return ball


# Elements per chunk of :func:`measure_spreads`: N chunks of this size stay in a core's
# L2 cache between the soup's read and the distances' read of the same chunk.
SPREAD_CHUNK = 1 << 15


def measure_spreads(plan) -> Spreads:
    """Soup and spread of every floating key of a :class:`fedsoup.plan.MergePlan`.

    One read of the ingredients from memory: chunk by chunk, the weighted sum and then
    ``‖x_i − s‖²`` of the same (cache-resident) chunk; small keys in one stacked matrix.
    Distances are of differences, so a spread of 1e-4 around weights of size 1 stays
    exact in float32. The same key gives the same numbers in any split of the model.
    """
    from fedsoup import fused

    compiled = None
    if plan.device.type == "cpu" and fused.available():
        # The fused path's compiled pass: one read of the ingredients, per-key numbers
        # that do not depend on the split of the model or the thread count.
        compiled = fused.soup_and_distances(plan.state_dicts, list(plan.omega))
    soups, keys = {}, {}
    for key in plan.float_keys:
        dtype, device = plan.compute_dtype(key), plan.device
        if compiled is not None:
            soup, squares = compiled[0][key], compiled[1][key].tolist()
        else:
            tensors = [sd[key].to(device, dtype).reshape(-1) for sd in plan.state_dicts]
            if len(tensors) * tensors[0].numel() <= SPREAD_CHUNK:
                soup, squares = _small_key_spread(tensors, plan.omega)
            else:
                soup, squares = _chunked_key_spread(tensors, plan.omega)
        soup = soup.view(plan.first[key].shape)
        pivot_sq = 0.0
        if plan.pivot is not None:
            pivot_sq = float(torch.dist(plan.pivot[key].to(device, dtype), soup)) ** 2
        soups[key] = soup
        keys[key] = KeySpread(tuple(squares), pivot_sq, soup.numel())
    return Spreads(soups, keys)


def _small_key_spread(tensors: list[torch.Tensor], omega: Sequence[float]) -> tuple[torch.Tensor, list[float]]:
    """All ingredients of a small key as one ``[N, n]`` matrix: four kernel launches, not 2N."""
    stacked = torch.stack(tensors)
    weights = torch.tensor(omega, dtype=stacked.dtype, device=stacked.device).unsqueeze(1)
    soup = torch.sum(stacked * weights, dim=0)
    return soup, torch.sum((stacked - soup) ** 2, dim=1).tolist()


def _chunked_key_spread(tensors: list[torch.Tensor], omega: Sequence[float]) -> tuple[torch.Tensor, list[float]]:
    """Chunk by chunk: the weighted sum, then every ``‖x_i − s‖²`` of the cached chunk."""
    soup = torch.empty_like(tensors[0])
    squares = [0.0] * len(tensors)
    for start in range(0, soup.numel(), SPREAD_CHUNK):
        part = slice(start, start + SPREAD_CHUNK)
        chunk = soup[part]
        torch.mul(tensors[0][part], omega[0], out=chunk)
        for tensor, weight in zip(tensors[1:], omega[1:]):
            chunk.add_(tensor[part], alpha=weight)
        for i, tensor in enumerate(tensors):
            squares[i] += float(torch.dist(tensor[part], chunk)) ** 2
    return soup, squares

