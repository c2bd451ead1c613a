"""Safe defaults for AME: a scale-aware learning rate and the ball guard of Proposition 2.

Why a scale-aware learning rate. Plain SGD moves ``w`` by ``η·g``: its step scales with
the pseudogradient ``g = Σ_B ω_j (p − x_j)``, so ``lr = 1`` means the same thing for any
ingredients (with the harmonic schedule one epoch *is* the soup, paper Section 3.1).
Adaptive optimizers (Adam, Adagrad, RMSprop, ...) divide ``g`` by a running estimate of
its own size, so they move every coordinate by about ``η`` per step *whatever the size
of g*. A fixed ``lr`` is then right for one spread of ingredients and wrong for every
other: client updates in a federated round differ by ~1e-3, fine-tuned experts by ~1e-1,
and ``lr = 1`` throws either far outside the region the ingredients span.

The default therefore measures the ingredients, per tensor key ``t``::

    ρ_t² = Σ_i ω_i ‖x_i,t − w_0,t‖² / numel_t          (mean square distance to the pivot)
         = Σ_i ω_i ‖x_i,t − s_t‖² / numel_t + ‖w_0,t − s_t‖² / numel_t

(the second line is the parallel-axis identity, ``s = Σ ω_i x_i`` the weighted soup;
with the default pivot ``w_0 = s`` the second term is zero), and picks ``η_0`` so that
the largest step of the schedule moves a coordinate by a fixed fraction of that scale::

    η_0,t = DEFAULT_LR_FRACTION · ρ_t / (G · max_k η_k/η_0)

where ``G`` is the optimizer's first-step gain (how far one step of ``lr = 1`` moves a
coordinate whose gradient is 1: 1 for Adam and Adagrad, ``1/√(1−α) = 10`` for RMSprop,
which has no bias correction) and ``max_k η_k/η_0`` the schedule's peak (``1/V_1`` for
``"harmonic"``: the first step is the largest). No step then moves a coordinate by more
than ``DEFAULT_LR_FRACTION · ρ_t``; the schedule decays the later ones. Being per tensor,
the scale follows layers that moved little (and a tensor on which every ingredient and
the pivot agree gets ``η = 0``: nothing to do), and a tensor-by-tensor merge
(``--low-memory``) computes exactly the same learning rates as the in-memory one.

Why the fraction is small (``DEFAULT_LR_FRACTION = 0.005``). Being sign-like, an
adaptive step moves *every* coordinate by about ``η``, including the many on which the
ingredients nearly agree; measured on the project's own settings (digits experts of the
Table 1 protocol, the clients of a federated round), accuracy stays at the soup's only
while the merge stays within about 1% of the ingredients' spread from the soup, and
falls fast beyond (c = 0.1 lost 30-50 points). At c = 0.005 the merge moves ~1% of the
spread (measurably, not "doing nothing"), the digits federated demo equals FedAvg and
Appendix F's Cauchy experiment keeps its effect (simulations/defaults_study.py). The
price: from a pivot far from the soup (FedSoup's ``soup_pivot="global"``, the (10, 10)
start of Appendix F with the harmonic schedule) steps this small cannot travel to the
ingredients; give an ``lr`` there, or start at the soup.

Optimizers whose step scales with ``g`` (SGD with any options, ASGD, Adadelta, LBFGS,
unknown classes) keep ``lr = 1``.

The guard (Proposition 2). The ball centred at the soup ``s`` whose radius is the
farthest of the ingredients and the pivot,
``R = max(max_i ‖x_i − s‖, ‖w_0 − s‖)`` (over the whole model), holds everything a
convex combination of the inputs can reach; ``project=True`` keeps the merge inside it.
A merge that ends outside it, ``‖w − s‖ > R``, went farther from the soup than any
ingredient is: :func:`check_ball` logs one WARNING on the ``"fedsoup"`` logger saying by
how much and what to change. Inside :func:`ball_guard_over_tensors` (a tensor-by-tensor
merge), the per-tensor squares are summed and the model-level ball is checked once, at
the end: the same decision as in memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DEFAULT_LR_FRACTION",
    "SCALE_FREE_OPTIMIZERS",
    "KeySpread",
    "Spreads",
    "BallCheck",
    "is_scale_free",
    "measure_spreads",
    "scale_aware_lr",
    "first_step_gain",
    "schedule_peak",
    "default_lr",
    "check_ball",
    "ball_guard_over_tensors",
    "ball_from_distances",
    "collecting",
]

logger = logging.getLogger("fedsoup")

# Largest step of the default schedule, as a fraction of the per-tensor scale ρ_t.
# Chosen from measurements (docs/defaults.md; python -m simulations.defaults_study).
DEFAULT_LR_FRACTION = 0.005

# A result this much (relatively) beyond the radius is float rounding, not a warning.
_BALL_TOLERANCE = 1e-5


def _scale_free_classes() -> frozenset[type[torch.optim.Optimizer]]:
    from fedsoup.optim import FedAdagrad, FedAdam, FedYogi

    optim = torch.optim
    return frozenset({
        optim.Adam, optim.AdamW, optim.NAdam, optim.RAdam, optim.Adamax, optim.Adagrad,
        optim.RMSprop, optim.Rprop, FedAdam, FedYogi, FedAdagrad,
    })


# Optimizers whose step is (about) ``lr`` per coordinate whatever the size of the gradient.
SCALE_FREE_OPTIMIZERS: frozenset[type[torch.optim.Optimizer]] = _scale_free_classes()


def is_scale_free(optimizer: type[torch.optim.Optimizer]) -> bool:
    """True when ``optimizer`` normalises the gradient (the scale-aware ``lr`` applies)."""
    return isinstance(optimizer, type) and issubclass(optimizer, tuple(SCALE_FREE_OPTIMIZERS))


@dataclass(frozen=True)
class KeySpread:
    """The spread of one tensor key: ``‖x_i − s‖²`` per ingredient and ``‖w_0 − s‖²``."""

    ingredient_sq: tuple[float, ...]
    pivot_sq: float
    numel: int

    def mean_sq_to_pivot(self, omega: Sequence[float]) -> float:
        """``Σ ω_i ‖x_i − w_0‖²`` by the parallel-axis identity (``s`` is the weighted mean)."""
        return math.fsum(w * d for w, d in zip(omega, self.ingredient_sq)) + self.pivot_sq


def first_step_gain(optimizer: type[torch.optim.Optimizer], optimizer_kwargs: Mapping[str, Any]) -> float:
    """How far one step with ``lr = 1`` moves a coordinate whose gradient is 1.

    1 for the bias-corrected Adam family (NAdam: 1.06, its look-ahead), Adagrad, Rprop
    and FedAdagrad;
    ``1/√(1−α)`` for RMSprop (no bias correction; ``1/√(α(1−α))`` centered);
    ``(1−β_1)/√(1−β_2)`` for Flower's FedYogi and ``√(1+β_2)/(1+β_1)`` for its FedAdam. From the constructor's defaults and the
    caller's arguments, without building the optimizer (a first ``torch.optim``
    construction costs seconds of imports).
    """
    from fedsoup.optim import FedAdam, FedYogi

    args = {**_constructor_defaults(optimizer), **optimizer_kwargs}
    if issubclass(optimizer, torch.optim.RMSprop):
        alpha = float(args.get("alpha", 0.99))
        second_moment = alpha * (1 - alpha) if args.get("centered") else 1 - alpha
        return 1.0 / math.sqrt(second_moment) if second_moment > 0 else 1.0
    if issubclass(optimizer, torch.optim.NAdam):  # Nesterov's look-ahead adds μ_2 m̂ to g
        beta1, psi = float(args.get("betas", (0.9, 0.999))[0]), float(args.get("momentum_decay", 4e-3))
        mu1, mu2 = (beta1 * (1 - 0.5 * 0.96 ** (t * psi)) for t in (1, 2))
        return 1 + mu2 * (1 - beta1) / (1 - mu1 * mu2)
    if issubclass(optimizer, FedAdam):  # Flower's bias correction at t + 1 = 2, no eps
        beta1, beta2 = (float(b) for b in args.get("betas", (0.9, 0.99)))
        return math.sqrt(1 + beta2) / (1 + beta1)
    if issubclass(optimizer, FedYogi):
        beta1, beta2 = (float(b) for b in args.get("betas", (0.9, 0.99)))
        return (1 - beta1) / math.sqrt(1 - beta2) if beta1 < 1 and beta2 < 1 else 1.0
    return 1.0


def _constructor_defaults(optimizer: type) -> dict[str, Any]:
    try:
        parameters = inspect.signature(optimizer.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def schedule_peak(schedule: str, alpha: float, first_batch_weight: float, steps: int) -> float:
    """``max_k η_k / η_0``: the largest step size of a named schedule, relative to ``lr``.

    ``"harmonic"`` (``η_0/V_k``, ``V_k`` growing): ``1/V_1``, the first step;
    ``"constant"``: 1; ``"poly"`` (``η_0 k^α``): 1, or ``K^α`` for a growing ``α > 0``.
    """
    if schedule == "harmonic":
        return 1.0 / first_batch_weight if first_batch_weight > 0 else 1.0
    if schedule == "poly" and alpha > 0:
        return float(steps) ** alpha
    return 1.0


def default_lr(
    spread: KeySpread,
    omega: Sequence[float],
    *,
    gain: float,
    peak: float,
    fraction: float = DEFAULT_LR_FRACTION,
) -> float:
    r"""The scale-aware ``η_0`` of one tensor key (see the module docstring).

    .. math::
        \eta_{0,t} = \frac{c\,\rho_t}{G \cdot \max_k \eta_k/\eta_0}, \qquad
        \rho_t = \sqrt{\textstyle\sum_i \omega_i \|x_{i,t} - w_{0,t}\|^2 / n_t}

    with ``c = fraction``, ``G = gain`` (:func:`first_step_gain`) and ``peak``
    (:func:`schedule_peak`): no step moves a coordinate by more than about ``c·ρ_t``.
    """
    rho = math.sqrt(max(spread.mean_sq_to_pivot(omega), 0.0) / max(spread.numel, 1))
    return fraction * rho / (gain * peak)


@dataclass
class BallCheck:
    """Proposition 2's ball over a whole model, summed key by key (exact in any split).

    ``add`` takes one key's :class:`KeySpread` and ``‖w_t − s_t‖²`` of the result.
    """

    ingredient_sq: list[float] = field(default_factory=list)
    pivot_sq: float = 0.0
    result_sq: float = 0.0
    lr_given: bool = True

    def add(self, spread: KeySpread, result_sq: float) -> None:
        if not self.ingredient_sq:
            self.ingredient_sq = [0.0] * len(spread.ingredient_sq)
        self.ingredient_sq = [a + b for a, b in zip(self.ingredient_sq, spread.ingredient_sq)]
        self.pivot_sq += spread.pivot_sq
        self.result_sq += result_sq

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


_collector: contextvars.ContextVar[BallCheck | None] = contextvars.ContextVar("fedsoup_ball", default=None)


def check_ball(ball: BallCheck, *, lr_given: bool, describe: str = "") -> bool:
    """Log one WARNING if the merge ended outside the ball; True when it did.

    Inside :func:`ball_guard_over_tensors` the check is deferred: ``ball`` is added to
    the model-wide one, which is checked once when the block ends.
    """
    collecting = _collector.get()
    if collecting is not None:
        collecting.extend(ball)
        collecting.lr_given = collecting.lr_given or lr_given
        return False
    if not ball.outside():
        return False
    radius, distance = ball.radius, ball.distance
    ratio = distance / radius if radius > 0 else math.inf
    advice = "lower lr" if lr_given else "pass a smaller lr than the scale-aware default"
    logger.warning(
        "AME merge%s ended outside the ball of Proposition 2: %.4g from the soup, %.3gx the "
        "ball's radius %.4g (the farthest ingredient or pivot), i.e. farther than any "
        "ingredient. Fix: %s, or pass project=True to keep the merge inside the ball.",
        describe, distance, ratio, radius, advice,
    )
    return True


def collecting() -> bool:
    """True inside :func:`ball_guard_over_tensors`: the model-wide ball then needs every
    ingredient's distance, not a bound."""
    return _collector.get() is not None


def ball_from_distances(distances: Mapping[str, Sequence[float]]) -> BallCheck:
    """The ball from per-key rows ``[‖x_j − s‖² (some or all j), ‖w_0 − s‖², ‖w − s‖²]``
    (:func:`fedsoup.fused.merge_fused`). With only some ingredients, its radius is a lower
    bound of ``R``: a merge inside it is inside the ball."""
    ball = BallCheck()
    for row in distances.values():
        ball.extend(BallCheck([float(d) for d in row[:-2]], float(row[-2]), float(row[-1])))
    return ball


@contextlib.contextmanager
def ball_guard_over_tensors(describe: str = "") -> Iterator[BallCheck]:
    """Check the ball once for a merge done tensor by tensor (``--low-memory``).

    Every ``fedsoup.merge`` call inside the block adds its keys' squared distances to one
    model-wide :class:`BallCheck` instead of checking its own tensors; at the end of the
    block the whole model is checked once, exactly as the in-memory merge does.
    """
    ball = BallCheck(lr_given=False)
    token = _collector.set(ball)
    try:
        yield ball
    finally:
        _collector.reset(token)
    if ball.ingredient_sq:
        check_ball(ball, lr_given=ball.lr_given, describe=describe)


# ---------------------------------------------------------------------------
# On a checked merge problem (the hook of ``fedsoup.merge``)
# ---------------------------------------------------------------------------


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


def measure_spreads(problem) -> Spreads:
    """Soup and spread of every floating key of a :class:`fedsoup.problem.Problem`.

    One read of the ingredients from memory: chunk by chunk, the weighted sum and then
    ``‖x_i − s‖²`` of the same (cache-resident) chunk; small keys in one stacked matrix.
    Distances are of differences, so a spread of 1e-4 around weights of size 1 stays
    exact in float32. The same key gives the same numbers in any split of the model.
    """
    from fedsoup import fused

    compiled = None
    if problem.device.type == "cpu" and fused.available():
        # The fused path's compiled pass: one read of the ingredients, per-key numbers
        # that do not depend on the split of the model or the thread count.
        compiled = fused.soup_and_distances(problem.state_dicts, list(problem.omega))
    soups, keys = {}, {}
    for key in problem.float_keys:
        dtype, device = problem.compute_dtype(key), problem.device
        if compiled is not None:
            soup, squares = compiled[0][key], compiled[1][key].tolist()
        else:
            tensors = [sd[key].to(device, dtype).reshape(-1) for sd in problem.state_dicts]
            if len(tensors) * tensors[0].numel() <= SPREAD_CHUNK:
                soup, squares = _small_key_spread(tensors, problem.omega)
            else:
                soup, squares = _chunked_key_spread(tensors, problem.omega)
        soup = soup.view(problem.first[key].shape)
        pivot_sq = 0.0
        if problem.pivot is not None:
            pivot_sq = float(torch.dist(problem.pivot[key].to(device, dtype), soup)) ** 2
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


def scale_aware_lr(problem, spreads: Spreads, fraction: float | None = None) -> dict[str, float]:
    """The default ``η_0`` of every floating key (:func:`default_lr`) for ``problem``.

    A callable schedule gives ``η_k`` itself (``lr`` is ignored): then every key gets 1.0.
    """
    from fedsoup.schedules import plan_steps

    if callable(problem.schedule):
        return {key: 1.0 for key in spreads.keys}
    fraction = DEFAULT_LR_FRACTION if fraction is None else fraction
    gain = first_step_gain(problem.optimizer, problem.optimizer_kwargs)
    steps_per_epoch = math.ceil(len(problem.omega) / problem.batch_size)
    first_epoch = plan_steps(problem.order, problem.omega, 1, problem.batch_size, problem.shuffle, problem.seed)
    first_batch_weight = float(first_epoch.batch_weights[0])
    peak = schedule_peak(problem.schedule, problem.alpha, first_batch_weight, steps_per_epoch * problem.epochs)
    return {key: default_lr(spread, problem.omega, gain=gain, peak=peak, fraction=fraction)
            for key, spread in spreads.keys.items()}
