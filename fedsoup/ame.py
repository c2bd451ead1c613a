"""Amortized Model Ensembling (AME): merging models by optimizing over pseudogradients.

Paper: "On Defining Neural Averaging", Algorithm 1 and Sections 3.1-3.3; the exact
conventions are fixed in docs/design.md §1-2. Ingredients ``x_1..x_N`` with weights
``ω_i`` (normalised to sum 1) define ``f(w) = Σ_i ω_i ½‖w − x_i‖²``; each step visits a
batch ``B_k`` and feeds the pseudogradient

    g_k = ζ_k Σ_{j∈B_k} ω_j (p_k − x_j),      p_k = w_{k−1} (adaptive) or w_0 (fixed)

to a ``torch.optim`` optimizer with learning rate ``η_k``: ``w_k = w_{k−1} − η_k·Opt(g_k)``.

:func:`merge` goes options → plan → kernels → report: the options are validated once
(:class:`~fedsoup.options.MergeOptions`), :func:`fedsoup.plan.make_plan` resolves them
against the models and this call's inputs and picks the path, :func:`run` executes the
plan on exactly one path, with the safe defaults of :mod:`fedsoup.defaults` (the
scale-aware lr) and :mod:`fedsoup.ball` (Prop. 2's guard) around it, and returns a
:class:`~fedsoup.report.MergeReport`. Every path computes the same update:

- ``"soup"``: the identities of Section 3.1 (one epoch of plain GD with lr 1 *is* the soup);
- ``"reference"`` (:mod:`fedsoup.reference`): the plain loop of Algorithm 1, for greedy
  AME, projection, non-element-wise and unknown optimizers;
- ``"fused"`` (:mod:`fedsoup.fused`, :mod:`fedsoup.kernels`): the compiled chunk-major CPU
  kernel for SGD, Adam, AdamW, Adagrad, RMSprop, Adamax and the Flower ``fed*`` three;
- ``"stacked"``, ``"flat"`` (:mod:`fedsoup.flat`): torch fast paths for the other element-wise
  optimizers, and for every element-wise merge on a non-CPU device.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedsoup import defaults, fused
from fedsoup.ball import BallCheck, ball_from_distances, ball_warning, measure_spreads
from fedsoup.errors import OptionError
from fedsoup.flat import merge_flat
from fedsoup.inputs import (
    StateDict,
    as_state_dicts,
    check_structures,
    find_non_finite,
    normalised_weights,
    output_dtype,
    raise_if_not_finite,
)
from fedsoup.options import MergeOptions
from fedsoup.plan import PATHS, MergePlan, algorithm_steps, make_plan, planned_steps
from fedsoup.reference import merge_reference, weighted_sum
from fedsoup.report import MergeReport
from fedsoup.rounding import can_soup_exactly, exact_soup, integer_weights

__all__ = ["merge", "soup", "run", "find_non_finite", "PATHS"]

logger = logging.getLogger("fedsoup")

_SOUP = MergeOptions()  # the soup's options (plain SGD, lr 1, one epoch): validated once, at import


def soup(models: Sequence[Mapping[str, torch.Tensor | np.ndarray]], weights=None, dtype=None) -> StateDict:
    r"""The weighted model soup :math:`\sum_i \omega_i x_i` (FedAvg's aggregate).

    Floating tensors are returned in ``dtype`` (a ``torch.dtype`` or a name such as
    ``"bf16"``; default: ingredient 0's): for bf16, fp16 and FP8 inputs with uniform or
    integer weights (example counts up to 2^24) the exact weighted mean ``Σ w_i x_i / Σ w_i``
    rounded once, to nearest even (:mod:`fedsoup.rounding`), into bf16, fp16, FP8 or float32;
    otherwise averaged in float32 (float64 if an input or ``dtype`` is float64) and rounded
    once. Non-floating tensors are copied from ingredient 0.
    Raises :class:`~fedsoup.errors.MergeInputError` naming the ingredient and key on
    mismatched keys or shapes, negative weights or NaN/Inf values, and the ingredient of a
    state dict holding no tensors.
    """
    state_dicts = as_state_dicts(models)
    check_structures(state_dicts)
    n = len(state_dicts)
    plan = MergePlan(_SOUP, state_dicts, normalised_weights(weights, n), list(range(n)), None, 0, path="soup",
                     exact_weights=integer_weights(weights, n), dtype=output_dtype(dtype))
    result = _soup(plan)
    raise_if_not_finite(result, state_dicts, None, plan.dtype)
    return result


def _soup(plan: MergePlan) -> StateDict:
    """``Σ ω_i x_i`` per floating tensor: for bf16/fp16/FP8 ingredients with uniform or integer
    weights the exact weighted mean rounded once (:func:`fedsoup.rounding.exact_soup`), else
    computed in float32/float64 and rounded once into the plan's dtype (or the input dtype)."""
    merged = {}
    for key in plan.float_keys:
        tensors = [sd[key] for sd in plan.state_dicts]
        if plan.exact_weights is not None and can_soup_exactly(tensors, plan.dtype):
            merged[key] = exact_soup(tensors, plan.exact_weights, plan.dtype)
        else:
            merged[key] = weighted_sum(tensors, plan.omega, plan.compute_dtype(key), plan.device)
    return plan.result(merged)


def merge(
    models: Sequence[Mapping[str, torch.Tensor | np.ndarray]],
    options: MergeOptions | None = None,
    *,
    weights: Sequence[float] | None = None,
    order_by: Sequence[float] | None = None,
    pivot: str | int | Mapping[str, torch.Tensor | np.ndarray] | None = None,
    seed: int | None = None,
    dtype: torch.dtype | str | None = None,
    adapter_config: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    report: bool = False,
    _path: str | None = None,
    _part: bool = False,
    **option_kwargs,
) -> StateDict | tuple[StateDict, MergeReport]:
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

    *How* to merge is a :class:`~fedsoup.MergeOptions`, given as ``options`` or as its
    keywords (not both): ``merge(models, optimizer="adam", epochs=3)`` validates them
    once; ``merge(models, options)`` trusts an options object built before (a server
    merging every round validates nothing per round). Options: ``optimizer`` (a name in
    :data:`fedsoup.OPTIMIZERS` or a ``torch.optim.Optimizer`` class; other keywords are
    its constructor arguments, ``betas``, ``eps``, ``momentum``...), ``lr`` (``η_0``: a
    number, one per floating tensor key, or ``None``: 1.0 for SGD and every optimizer
    whose step scales with the gradient, the scale-aware default of
    :mod:`fedsoup.defaults` for adaptive ones), ``schedule``, ``alpha``, ``epochs``,
    ``batch_size``, ``shuffle``, ``seed``, ``pivot`` (the rule), ``adaptive_pivot``,
    ``amplification`` (``ζ``), ``descending``, ``greedy``/``evaluate`` (Appendix A.4),
    ``project`` (onto the ball of Prop. 2), ``device``: docs/api.md lists them all.

    *What* is merged in this call:

    Args:
        models: state dicts with equal keys and shapes (torch or numpy values).
        options: a :class:`~fedsoup.MergeOptions`, or ``None`` for the option keywords.
        weights: ``ω_i >= 0`` (normalised to sum 1); uniform when ``None``.
        order_by: one score per ingredient; ingredients are visited sorted by it
            (``descending`` by default, as the paper sorts by validation accuracy).
        pivot: a state dict as ``w_0`` for this call (or, without ``options``, the
            rule: ``"soup"``, ``"first"``, an ingredient index).
        seed: the shuffling seed for this call (default: the options').
        dtype: the dtype of the merged floating tensors (a ``torch.dtype`` or a name such as
            ``"bf16"``; default: each key's input dtype), rounded into once from the merge's
            float32/float64 result, or, for the soup of bf16/fp16/FP8 inputs, from the exact
            mean: never through the inputs' dtype (``--dtype``).
        adapter_config: with the ``lora`` option, the models are PEFT adapter state dicts
            and this is their ``adapter_config.json`` (one dict for all, or one per model):
            :mod:`fedsoup.lora` merges them as ``"factors"`` or ``"products"`` and returns the
            merged adapter's tensors (its config: ``report.lora.config``), in ``dtype`` when
            given, each rounded into it once.
        report: also return a :class:`~fedsoup.report.MergeReport`: path taken, ``η_0``
            used per tensor, steps, distance to the soup and the ball's radius, warnings.
        _path: (private; tests and benchmarks) force one of :data:`PATHS`.
        _part: (private; tensor-by-tensor file merges) the models are part of a larger
            one: measure the ball exactly and leave its check to the caller.

    Returns:
        The merged state dict (with ``report``: ``(state_dict, report)``): floating
        tensors in each key's input dtype (computed in float32, or float64 if an input
        is), non-floating tensors unchanged from the first ingredient in visiting order.
        A merge that ends outside the ball of Prop. 2 logs a WARNING (``"fedsoup"``) and
        says so in its report.

    Raises:
        fedsoup.MergeInputError: (a ``ValueError``) with ``ingredient`` and ``key`` for
            mismatched keys, shapes or kinds, NaN/Inf values, negative weights, NaN scores,
            and with ``ingredient`` for a state dict holding no tensors (``merge_files``
            refuses a file of none alike; integer tensors alone are merged, copied).
        fedsoup.UnknownOptionError: (a ``TypeError``) an option that is neither a merge
            option nor an argument of the optimizer, with the closest valid name.
        fedsoup.OptionError: (a ``ValueError``) a bad option value.
    """
    options = _options(options, pivot, option_kwargs)  # validated once, or trusted
    if options.lora is not None:  # PEFT adapters: their factors or their products s·B·A (docs/design.md §2.6)
        return _merge_adapters(models, options, adapter_config, weights, order_by, pivot, seed, output_dtype(dtype),
                               report)
    plan = make_plan(models, options, weights=weights, order_by=order_by,
                     pivot=pivot if isinstance(pivot, Mapping) else None, seed=seed, path=_path,
                     dtype=output_dtype(dtype))
    result, merge_report = run(plan, part=_part, exact_ball=report or _part)
    return (result, merge_report) if report else result


def _merge_adapters(models, options: MergeOptions, adapter_config, weights, order_by, pivot, seed, dtype,
                    report: bool):
    from fedsoup.lora.modes import merge_adapter_state_dicts  # (fedsoup.lora merges its tensors with merge)

    for name, value in (("order_by", order_by), ("pivot", pivot if isinstance(pivot, Mapping) else None),
                        ("seed", seed)):
        if value is not None:
            raise OptionError(name, value, f"{name}= is not taken by a LoRA adapter merge (give it in the options)")
    merged = merge_adapter_state_dicts(models, options, adapter_config, weights=weights, dtype=dtype)
    if not report:
        return merged.state_dict
    return merged.state_dict, MergeReport(f"lora-{merged.report.how}", options.optimizer_class.__name__,
                                          options.epochs, planned_steps(options, len(models)), lora=merged.report)


def _options(options: MergeOptions | None, pivot, option_kwargs: dict) -> MergeOptions:
    """The call's options: built (and validated) from keywords, or the given object as it is."""
    if options is None:
        if pivot is not None and not isinstance(pivot, Mapping):
            option_kwargs["pivot"] = pivot
        return MergeOptions.from_kwargs(**option_kwargs)
    if not isinstance(options, MergeOptions):
        raise OptionError("options", options, f"options must be a fedsoup.MergeOptions, got {type(options).__name__}"
                          " (or give the options as keywords)")
    if option_kwargs:
        name = next(iter(option_kwargs))
        raise OptionError(name, option_kwargs[name], f"give a MergeOptions or option keywords, not both ({name!r})")
    if pivot is not None and not isinstance(pivot, Mapping):
        raise OptionError("pivot", pivot, "with options given, pivot= is a state dict; a pivot rule is an option "
                          "(MergeOptions(pivot=...))")
    return options


def run(plan: MergePlan, *, part: bool = False, exact_ball: bool = True) -> tuple[StateDict, MergeReport]:
    """Execute ``plan`` on its one path, with the safe defaults around it, and report.

    Safe defaults: a scale-aware ``η_0`` per tensor for adaptive optimizers given no
    ``lr`` (:mod:`fedsoup.defaults`), and the ball guard of Prop. 2 (:mod:`fedsoup.ball`).
    The soup identities need neither; the fused kernel measures the guard's distances in
    its own pass unless a spread pass is needed anyway (for the lr). ``exact_ball``: the
    radius over every ingredient (else a one-ingredient bound where that decides the same
    check). ``part``: leave the ball's check to the caller (a model merged in parts).
    """
    options = plan.options
    lr_given = options.lr is not None
    guarded = plan.path != "soup" and not options.project and bool(plan.float_keys)
    lr_default = not lr_given and defaults.is_scale_free(plan.optimizer)
    spreads = None
    if guarded and (plan.path != "fused" or lr_default):
        spreads = measure_spreads(plan)
        if plan.pivot is None:  # the soup was just computed: no path computes it again
            plan.pivot = spreads.soups
        if lr_default:
            plan.lr = defaults.scale_aware_lr(plan, spreads)
    ball = None
    if plan.path == "soup":
        result = _soup(plan)
    elif plan.path == "reference":
        result = merge_reference(plan)
    elif plan.path == "fused":
        result, ball = _merge_fused(plan, guard=guarded and spreads is None, exact=exact_ball)
    else:
        result = merge_flat(plan, stacked=plan.path == "stacked")
    raise_if_not_finite(result, plan.state_dicts, plan.pivot, plan.dtype)
    if spreads is not None:
        ball = spreads.ball(result)
    warning = None if ball is None or part else ball_warning(ball, lr_given=lr_given)
    if warning is not None:
        logger.warning(warning)
    steps = 0 if plan.path == "soup" else algorithm_steps(options, len(plan.state_dicts))  # by the path run (a forced one too)
    merge_report = MergeReport(
        path=plan.path, optimizer=plan.optimizer.__name__, epochs=options.epochs, steps=steps,
        lr={key: plan.base_lr(key) for key in plan.float_keys}, lr_default=lr_default and guarded, ball=ball,
        warnings=() if warning is None else (warning,),
    )
    return result, merge_report


def _merge_fused(plan: MergePlan, *, guard: bool, exact: bool) -> tuple[StateDict, BallCheck | None]:
    """The fused kernel; with ``guard``, Prop. 2's ball measured in the kernel's own pass.

    Unless ``exact``, the kernel measures one ingredient's distance from the soup:
    ``R >= ‖x_j − s‖``, so a merge that ends inside that smaller ball is inside the ball
    (the usual case, for 1/N of the cost). Only when it is not are all ``N`` measured, by
    a second pass: the guard's decision is unchanged.
    """
    if not guard:
        return fused.merge_fused(plan, plan.kernel)[0], None
    every = list(range(len(plan.state_dicts)))
    members = every if exact else plan.order[:1]
    result, distances = fused.merge_fused(plan, plan.kernel, members)
    ball = ball_from_distances(distances)
    if len(members) < len(every) and ball.outside():
        ball = measure_spreads(plan).ball(result)
    return result, ball


def _signature() -> inspect.Signature:
    """``merge``'s signature as ``help()`` and IDEs show it: the call's inputs, then every
    field of :class:`~fedsoup.MergeOptions` as a keyword (derived, so they never drift)."""
    own = inspect.signature(merge).parameters
    keyword = inspect.Parameter.KEYWORD_ONLY
    fields = [inspect.Parameter(f.name, keyword, default=getattr(_SOUP, f.name))
              for f in MergeOptions.__dataclass_fields__.values()
              if f.init and f.name not in own and f.name != "optimizer_kwargs"]
    public = [p for name, p in own.items() if not name.startswith("_") and p.kind is not p.VAR_KEYWORD]
    return inspect.Signature([*public, *fields, inspect.Parameter("optimizer_kwargs", inspect.Parameter.VAR_KEYWORD)],
                             return_annotation=own and inspect.signature(merge).return_annotation)


merge.__signature__ = _signature()  # type: ignore[attr-defined]

