"""Amortized Model Ensembling (AME): merging models by optimizing over pseudogradients.

Paper: "On Defining Neural Averaging", Algorithm 1 and Sections 3.1-3.3; the exact
conventions are fixed in docs/design.md §1-2. Ingredients ``x_1..x_N`` with weights
``ω_i`` (normalised to sum 1) define ``f(w) = Σ_i ω_i ½‖w − x_i‖²``; each step visits a
batch ``B_k`` and feeds the pseudogradient

    g_k = ζ_k Σ_{j∈B_k} ω_j (p_k − x_j),      p_k = w_{k−1} (adaptive) or w_0 (fixed)

to a ``torch.optim`` optimizer with learning rate ``η_k``: ``w_k = w_{k−1} − η_k·Opt(g_k)``.

:func:`merge` checks its inputs (:mod:`fedsoup.inputs`) and hands the problem to one
path; every path computes the same update:

- ``"soup"``: the identities of Section 3.1 (one epoch of plain GD with lr 1 *is* the soup);
- ``"reference"`` (:mod:`fedsoup.reference`): the plain loop of Algorithm 1, for greedy
  AME, projection, non-element-wise and unknown optimizers;
- ``"fused"`` (:mod:`fedsoup.fused`, :mod:`fedsoup.kernels`): the compiled chunk-major CPU
  kernel for SGD, Adam, AdamW, Adagrad, RMSprop, Adamax and the Flower ``fed*`` three;
- ``"stacked"``, ``"flat"`` (:mod:`fedsoup.flat`): torch fast paths for the other element-wise
  optimizers, and for every element-wise merge on a non-CPU device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from fedsoup import fused
from fedsoup import defaults
from fedsoup.errors import OptionError, closest_name
from fedsoup.flat import STACK_MAX_NUMEL, merge_flat
from fedsoup.inputs import (
    StateDict,
    as_state_dicts,
    check_structures,
    find_non_finite,
    normalised_weights,
    raise_if_not_finite,
    resolve_pivot,
    visiting_order,
)
from fedsoup.optim import is_elementwise, is_plain_sgd, resolve_optimizer
from fedsoup.options import MergeOptions
from fedsoup.problem import LearningRate, Problem
from fedsoup.reference import merge_reference, weighted_sum

__all__ = ["merge", "soup", "find_non_finite", "PATHS"]

PATHS = ("soup", "reference", "fused", "stacked", "flat")


def soup(models: Sequence[Mapping[str, torch.Tensor | np.ndarray]], weights=None) -> StateDict:
    r"""The weighted model soup :math:`\sum_i \omega_i x_i` (FedAvg's aggregate).

    Floating tensors are averaged in float32 (float64 if an input is float64) and
    returned in ingredient 0's dtype; non-floating tensors are copied from ingredient 0.
    Raises ``ValueError`` naming the ingredient and key on mismatched keys or shapes,
    negative weights or NaN/Inf values.
    """
    state_dicts = as_state_dicts(models)
    check_structures(state_dicts)
    omega = normalised_weights(weights, len(state_dicts))
    problem = Problem(state_dicts, omega, list(range(len(state_dicts))), None, torch.optim.SGD, {})
    result = _soup(problem)
    raise_if_not_finite(result, state_dicts, None)
    return result


def _soup(problem: Problem) -> StateDict:
    return problem.result({
        key: weighted_sum([sd[key] for sd in problem.state_dicts], problem.omega, problem.compute_dtype(key), problem.device)
        for key in problem.float_keys
    })


def merge(
    models: Sequence[Mapping[str, torch.Tensor | np.ndarray]],
    *,
    weights: Sequence[float] | None = None,
    optimizer: str | type[torch.optim.Optimizer] = "sgd",
    lr: LearningRate | None = None,
    schedule: str | Callable[[int], float] = "harmonic",
    alpha: float = -1.1,
    epochs: int = 1,
    batch_size: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    pivot: str | int | Mapping[str, torch.Tensor | np.ndarray] = "soup",
    adaptive_pivot: bool = True,
    amplification: float | Callable[[int], float] = 1.0,
    order_by: Sequence[float] | None = None,
    descending: bool = True,
    greedy: bool = False,
    evaluate: Callable[[StateDict], float] | None = None,
    project: bool = False,
    device: str | torch.device | None = None,
    _path: str | None = None,
    **optimizer_kwargs,
) -> StateDict:
    r"""Merge models by Amortized Model Ensembling (paper Algorithm 1; docs/design.md §1).

    For ``k = 1, 2, ...`` over ``epochs`` passes of batches ``B_k`` of the ordered
    ingredients:

    .. math::
        g_k = \zeta_k \sum_{j \in B_k} \omega_j (p_k - x_j), \qquad
        w_k = w_{k-1} - \eta_k \,\mathrm{Optimizer}(g_k),

    with ``p_k = w_{k-1}`` (``adaptive_pivot=True``, Section 3.3) or ``p_k = w_0``,
    ``w_0`` the pivot (``"soup"``, ``"first"`` in visiting order, an ingredient index
    or a state dict) and ``η_k`` from ``schedule`` (``"harmonic"``: ``η_0/V_k``;
    ``"constant"``; ``"poly"``: ``η_0 k^α``; or a callable ``k -> η_k``).
    With the defaults (SGD, ``lr=1``, harmonic, one epoch) the result is the
    weighted soup ``Σ ω_i x_i`` (Section 3.1).

    Args:
        models: state dicts with equal keys and shapes (torch or numpy values).
        weights: ``ω_i >= 0`` (normalised to sum 1); uniform when ``None``.
        optimizer: a name in :data:`fedsoup.OPTIMIZERS` or a ``torch.optim.Optimizer`` class;
            ``**optimizer_kwargs`` go to its constructor (``betas``, ``eps``, ``momentum``...).
        lr: ``η_0``: a number, or a mapping from every floating tensor key to its own
            ``η_0`` (the schedule then scales each). ``None``: 1.0 for SGD and every
            optimizer whose step scales with the gradient (the soup identities); for
            adaptive optimizers (Adam, Adagrad, RMSprop, ...) the scale-aware default of
            :func:`fedsoup.defaults.default_lr`, per tensor: the largest step moves a
            coordinate by 0.5% of the RMS distance of the ingredients to the pivot.
            A merge that ends outside the ball of Prop. 2 logs a WARNING (``"fedsoup"``).
        order_by: one score per ingredient; ingredients are visited sorted by it
            (``descending`` by default, as the paper sorts by validation accuracy).
        shuffle, seed: a fresh permutation of the ordered list every epoch.
        amplification: ``ζ`` as a number or a callable ``k -> ζ_k``.
        greedy, evaluate: keep a step only if ``evaluate(state_dict)`` strictly
            improves; otherwise ``w`` and the optimizer state revert (Appendix A.4).
        project: after every step, project ``w`` onto the smallest ball centred at
            the weighted mean of the ingredients holding all of them and ``w_0`` (Prop. 2).
        device: where the merge runs and the result is returned; ``None``: where the
            inputs are (CPU for numpy arrays).
        _path: (private; tests and benchmarks) force one of :data:`PATHS`.

    Returns:
        The merged state dict: floating tensors in each key's input dtype (computed in
        float32, or float64 if an input is), non-floating tensors unchanged from the
        first ingredient in visiting order.

    Raises:
        fedsoup.MergeInputError: (a ``ValueError``) with ``ingredient`` and ``key`` for
            mismatched keys, shapes or kinds, NaN/Inf values, negative weights, NaN scores.
        fedsoup.UnknownOptionError: (a ``TypeError``) an option that is neither a merge
            option nor an argument of the optimizer, with the closest valid name.
        fedsoup.OptionError: (a ``ValueError``) a bad option value.
    """
    # Every option is checked before any work (fedsoup.options).
    MergeOptions(
        weights=weights, optimizer=optimizer, lr=lr, schedule=schedule, alpha=alpha, epochs=epochs,
        batch_size=batch_size, shuffle=shuffle, seed=seed, pivot=pivot, adaptive_pivot=adaptive_pivot,
        amplification=amplification, order_by=order_by, descending=descending, greedy=greedy,
        evaluate=evaluate, project=project, device=device, optimizer_kwargs=optimizer_kwargs,
    )
    state_dicts = as_state_dicts(models)
    check_structures(state_dicts)
    n = len(state_dicts)
    order = visiting_order(n, order_by, descending)
    problem = Problem(
        state_dicts=state_dicts,
        omega=normalised_weights(weights, n),
        order=order,
        pivot=resolve_pivot(pivot, state_dicts, order),
        optimizer=resolve_optimizer(optimizer),
        optimizer_kwargs=optimizer_kwargs,
        lr=_check_lr(1.0 if lr is None else lr, state_dicts[0]),
        schedule=schedule, alpha=alpha, epochs=epochs, batch_size=batch_size, shuffle=shuffle,
        seed=seed, adaptive_pivot=adaptive_pivot, amplification=amplification,
        greedy=greedy, evaluate=evaluate, project=project, device=_resolve_device(device, state_dicts),
    )
    path = _path or choose_path(problem)
    if path not in PATHS:
        raise OptionError("_path", path, f"unknown merge path {path!r}; one of {', '.join(PATHS)}",
                          suggestion=closest_name(str(path), PATHS))
    # Safe defaults (fedsoup.defaults): a scale-aware lr for adaptive optimizers, and the
    # ball guard of Prop. 2. The soup identities need neither; the fused kernel measures
    # the guard's distances itself unless a spread pass is needed anyway (for the lr).
    guarded = path != "soup" and not problem.project and bool(problem.float_keys)
    scale_aware = lr is None and defaults.is_scale_free(problem.optimizer)
    spreads = None
    if guarded and (path != "fused" or scale_aware):
        spreads = defaults.measure_spreads(problem)
        if problem.pivot is None:  # the soup was just computed: no path computes it again
            problem.pivot = spreads.soups
        if scale_aware:
            problem.lr = defaults.scale_aware_lr(problem, spreads)
    ball = None
    if path == "soup":
        result = _soup(problem)
    elif path == "reference":
        result = merge_reference(problem)
    elif path == "fused":
        result, ball = _merge_fused(problem, guard=guarded and spreads is None)
    else:
        result = merge_flat(problem, stacked=path == "stacked")
    raise_if_not_finite(result, state_dicts, problem.pivot)
    if spreads is not None:
        ball = spreads.ball(result)
    if ball is not None:
        defaults.check_ball(ball, lr_given=lr is not None)
    return result


def _merge_fused(problem: Problem, *, guard: bool) -> tuple[StateDict, defaults.BallCheck | None]:
    """The fused kernel; with ``guard``, Prop. 2's ball measured in the kernel's own pass.

    Outside :func:`fedsoup.defaults.ball_guard_over_tensors` the kernel measures one
    ingredient's distance from the soup: ``R >= ‖x_j − s‖``, so a merge that ends inside
    that smaller ball is inside the ball (the usual case, for 1/N of the cost). Only when it
    is not are all ``N`` measured, by a second pass: the guard's decision is unchanged.
    """
    spec = fused.kernel_spec(problem.optimizer, problem.optimizer_kwargs)
    if spec is None or problem.device.type != "cpu" or problem.greedy or problem.project:
        raise OptionError("_path", "fused", f"the fused kernel cannot run this merge ({problem.optimizer.__name__})")
    if not guard:
        return fused.merge_fused(problem, spec)[0], None
    every = list(range(len(problem.state_dicts)))
    members = every if defaults.collecting() else problem.order[:1]
    result, distances = fused.merge_fused(problem, spec, members)
    ball = defaults.ball_from_distances(distances)
    if len(members) < len(every) and ball.outside():
        ball = defaults.measure_spreads(problem).ball(result)
    return result, ball


def choose_path(problem: Problem) -> str:
    """The fastest path that computes this merge exactly (see the module docstring)."""
    if _reduces_to_soup(problem):
        return "soup"
    if problem.greedy or problem.project or not is_elementwise(problem.optimizer):
        return "reference"
    if problem.device.type == "cpu" and fused.available():
        if fused.kernel_spec(problem.optimizer, problem.optimizer_kwargs) is not None:
            return "fused"
    numel = sum(problem.first[key].numel() for key in problem.float_keys)
    return "stacked" if numel <= STACK_MAX_NUMEL else "flat"


def _reduces_to_soup(problem: Problem) -> bool:
    """One epoch of plain GD with lr 1 *is* the soup (docs/design.md §1 identities, paper §3.1)."""
    return _is_soup_identity(problem, problem.lr)


def options_reduce_to_soup(options: MergeOptions) -> bool:
    """True when ``merge(models, **options.to_kwargs())`` is the weighted soup (an identity of §1).

    For callers that can compute the soup in another form (the LoRA soup of products
    as stacked factors, :mod:`fedsoup.lora`) without running the merge.
    """
    return _is_soup_identity(options, 1.0 if options.lr is None else options.lr)


def _is_soup_identity(p: Problem | MergeOptions, lr: LearningRate) -> bool:
    if not (is_plain_sgd(p.optimizer, p.optimizer_kwargs) and p.epochs == 1 and not p.greedy and not p.project):
        return False
    if isinstance(lr, Mapping) or lr != 1.0 or callable(p.amplification) or p.amplification != 1.0:
        return False
    return (p.schedule == "harmonic" and p.adaptive_pivot) or (p.schedule == "constant" and not p.adaptive_pivot)


def _check_lr(lr: LearningRate, reference: StateDict) -> LearningRate:
    """A per-key lr must name every floating key (MergeOptions has checked its values)."""
    if not isinstance(lr, Mapping):
        return lr
    per_key = {str(k): float(v) for k, v in lr.items()}
    for key, tensor in reference.items():
        if tensor.is_floating_point() and key not in per_key:
            raise OptionError("lr", lr, f"lr: no learning rate for tensor {key!r}")
    return per_key


def _resolve_device(device, state_dicts: list[StateDict]) -> torch.device:
    if device is not None:
        return torch.device(device)
    floating = [t for t in state_dicts[0].values() if t.is_floating_point()]
    return floating[0].device if floating else torch.device("cpu")
