"""The scale-aware default learning rate of adaptive optimizers (``lr=None``).

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

The ball guard of Proposition 2, which measures the same spreads, is :mod:`fedsoup.ball`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsoup.ball import KeySpread, Spreads
from fedsoup.optimizer_args import _constructor_defaults as constructor_defaults

__all__ = [
    "DEFAULT_LR_FRACTION",
    "SCALE_FREE_OPTIMIZERS",
    "is_scale_free",
    "scale_aware_lr",
    "first_step_gain",
    "schedule_peak",
    "default_lr",
]

# Largest step of the default schedule, as a fraction of the per-tensor scale ρ_t.
# Chosen from measurements (docs/defaults.md; python -m simulations.defaults_study).
DEFAULT_LR_FRACTION = 0.005

# A result this much (relatively) beyond the radius is float rounding, not a warning.

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

    args = {**dict(constructor_defaults(optimizer)), **optimizer_kwargs}  # read once per class
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


def scale_aware_lr(plan, spreads: Spreads, fraction: float | None = None) -> dict[str, float]:
    """The default ``η_0`` of every floating key (:func:`default_lr`) for ``plan``.

    A callable schedule gives ``η_k`` itself (``lr`` is ignored): then every key gets 1.0.
    """
    from fedsoup.schedules import plan_steps

    if callable(plan.options.schedule):
        return {key: 1.0 for key in spreads.keys}
    fraction = DEFAULT_LR_FRACTION if fraction is None else fraction
    gain = first_step_gain(plan.optimizer, plan.options.optimizer_kwargs)
    steps_per_epoch = math.ceil(len(plan.omega) / plan.options.batch_size)
    first_epoch = plan_steps(plan.order, plan.omega, 1, plan.options.batch_size, plan.options.shuffle, plan.seed)
    first_batch_weight = float(first_epoch.batch_weights[0])
    peak = schedule_peak(plan.options.schedule, plan.options.alpha, first_batch_weight, steps_per_epoch * plan.options.epochs)
    return {key: default_lr(spread, plan.omega, gain=gain, peak=peak, fraction=fraction)
            for key, spread in spreads.keys.items()}
