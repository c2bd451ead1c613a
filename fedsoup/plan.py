"""The plan of one merge: validated options plus this call's inputs, resolved against the models.

The path of a merge request is options → plan → kernels → report (docs/design.md §2):
:class:`~fedsoup.options.MergeOptions` says *how* to merge and is validated once;
:func:`make_plan` takes the models and what one call merges (weights, ``order_by`` scores,
a pivot state dict, a per-call seed), checks them cheaply, and resolves what depends on the
models: the visiting order, ``w_0``, the per-key learning rates, the device, and the one
path that runs it (:func:`choose_path`: soup, reference, fused, stacked or flat).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsoup.errors import OptionError, closest_name
from fedsoup.inputs import (
    StateDict,
    as_state_dicts,
    check_structures,
    compute_dtype,
    normalised_weights,
    resolve_pivot,
    visiting_order,
)
from fedsoup.optim import is_elementwise, is_plain_sgd
from fedsoup.options import MergeOptions, _integer
from fedsoup.rounding import integer_weights, round_to
from fedsoup.schedules import Schedule, make_schedule

__all__ = ["MergePlan", "make_plan", "choose_path", "PATHS", "LearningRate", "reduces_to_soup", "planned_steps",
           "algorithm_steps"]

# One base learning rate for every tensor, or one per tensor key.
LearningRate = float | Mapping[str, float]

# The merge paths, each computing the same update (fedsoup.ame's docstring).
PATHS = ("soup", "reference", "fused", "stacked", "flat")


@dataclass
class MergePlan:
    """One merge, ready to run: ingredients ``x_i`` with normalised weights ``ω_i``, the
    visiting order, the pivot ``w_0`` (``None``: the soup), ``η_0`` per key, and the path
    (docs/design.md §1). Everything *how* stays in ``options``, read from there."""

    options: MergeOptions
    state_dicts: list[StateDict]
    omega: list[float]
    order: list[int]
    pivot: StateDict | None
    seed: int
    lr: LearningRate = 1.0
    device: torch.device = torch.device("cpu")
    path: str = "reference"
    kernel: Any = None  # the fused kernel's fedsoup.fused.KernelSpec, when path == "fused"
    # The weights as integers (all 1 when uniform) where the soup of bf16/fp16/FP8 inputs is
    # the exact weighted mean rounded once (fedsoup.rounding); None for other weights.
    exact_weights: list[int] | None = None
    # The dtype of the merged floating tensors (None: each key's input dtype), rounded into once.
    dtype: torch.dtype | None = None
    _schedules: dict[float, Schedule] = field(default_factory=dict, repr=False)

    @property
    def optimizer(self) -> type[torch.optim.Optimizer]:
        return self.options.optimizer_class

    @property
    def first(self) -> StateDict:
        """The first ingredient in visiting order (source of the non-floating tensors)."""
        return self.state_dicts[self.order[0]]

    @property
    def float_keys(self) -> list[str]:
        return [key for key, tensor in self.first.items() if tensor.is_floating_point()]

    def compute_dtype(self, key: str) -> torch.dtype:
        return compute_dtype([sd[key] for sd in self.state_dicts], self.dtype)

    def base_lr(self, key: str) -> float:
        """``η_0`` of a tensor: the one ``lr`` or its entry in a per-key mapping."""
        return float(self.lr[key]) if isinstance(self.lr, Mapping) else float(self.lr)

    def step_size(self, base_lr: float, k: int, visited: float) -> float:
        """``η_k`` for a tensor whose base learning rate is ``base_lr``."""
        schedule = self._schedules.get(base_lr)
        if schedule is None:
            schedule = self._schedules[base_lr] = make_schedule(self.options.schedule, base_lr, self.options.alpha)
        return schedule(k, visited)

    def step_sizes(self, base_lr: float, visited: np.ndarray) -> np.ndarray:
        """``η_k`` of every step ``k = 1..len(visited)`` (``visited``: ``V_k``), as an array."""
        schedule = self.options.schedule
        if callable(schedule) or schedule not in ("constant", "harmonic"):
            return np.array([self.step_size(base_lr, k, v) for k, v in enumerate(visited.tolist(), start=1)])
        if schedule == "constant":
            return np.full(visited.size, float(base_lr))
        return float(base_lr) / visited  # harmonic: the same float division as lr / V_k

    def zeta(self, k: int) -> float:
        """The amplification ``ζ_k``."""
        amplification = self.options.amplification
        return float(amplification(k)) if callable(amplification) else float(amplification)

    def result(self, merged: Mapping[str, torch.Tensor]) -> StateDict:
        """The merged state dict on ``device``: floating tensors from ``merged`` (buffers the
        merge owns) rounded once into ``dtype`` or each key's input dtype
        (:func:`fedsoup.rounding.round_to`), the others cloned from the first ingredient in
        visiting order."""
        return {
            key: round_to(merged[key], self.dtype or tensor.dtype).to(self.device) if key in merged
            else tensor.to(self.device, copy=True)
            for key, tensor in self.first.items()
        }


def make_plan(models, options: MergeOptions, *, weights=None, order_by=None, pivot: Mapping | None = None,
              seed: int | None = None, path: str | None = None, dtype: torch.dtype | None = None) -> MergePlan:
    """The model-dependent step: check this call's inputs and resolve ``options`` against the models.

    ``pivot`` (a state dict) and ``seed`` replace the options' pivot rule and seed for this
    call; ``dtype`` is the merged floating tensors' (validated: :func:`fedsoup.inputs.output_dtype`);
    ``path`` forces one of :data:`PATHS` (tests and benchmarks).
    """
    state_dicts = as_state_dicts(models)
    check_structures(state_dicts)
    n = len(state_dicts)
    order = visiting_order(n, order_by, options.descending)
    plan = MergePlan(
        options=options,
        state_dicts=state_dicts,
        omega=normalised_weights(weights, n),
        order=order,
        pivot=resolve_pivot(options.pivot if pivot is None else pivot, state_dicts, order),
        seed=options.seed if seed is None else _integer("seed", seed),
        lr=_per_key_lr(1.0 if options.lr is None else options.lr, state_dicts[0]),
        device=_device(options.device, state_dicts),
        exact_weights=integer_weights(weights, n),
        dtype=dtype,
    )
    if path is not None and path not in PATHS:
        raise OptionError("_path", path, f"unknown merge path {path!r}; one of {', '.join(PATHS)}",
                          suggestion=closest_name(str(path), PATHS))
    plan.path = path or choose_path(plan)
    if plan.path == "fused" and plan.kernel is None:  # forced
        plan.kernel = _kernel(plan)
    return plan


def choose_path(plan: MergePlan) -> str:
    """The fastest path that computes this merge exactly (see :mod:`fedsoup.ame`); for the
    fused path, its kernel spec is kept on the plan (built once per merge)."""
    from fedsoup import fused
    from fedsoup.flat import STACK_MAX_NUMEL

    options = plan.options
    if reduces_to_soup(options):
        return "soup"
    if options.greedy or options.project or not is_elementwise(plan.optimizer):
        return "reference"
    if plan.device.type == "cpu" and fused.available():
        plan.kernel = fused.kernel_spec(plan.optimizer, options.optimizer_settings)
        if plan.kernel is not None:
            return "fused"
    numel = sum(plan.first[key].numel() for key in plan.float_keys)
    return "stacked" if numel <= STACK_MAX_NUMEL else "flat"


def planned_steps(options: MergeOptions, ingredients: int) -> int:
    """Optimizer steps a merge of ``ingredients`` runs: :func:`algorithm_steps`, 0 when it
    reduces to the soup identity."""
    return 0 if reduces_to_soup(options) else algorithm_steps(options, ingredients)


def algorithm_steps(options: MergeOptions, ingredients: int) -> int:
    """The steps of Algorithm 1 over ``ingredients``: ``epochs · ⌈N / batch_size⌉``."""
    return options.epochs * -(-ingredients // options.batch_size)


def reduces_to_soup(options: MergeOptions) -> bool:
    """True when ``merge(models, options)`` is the weighted soup: one epoch of plain GD with
    lr 1 *is* the soup (docs/design.md §1 identities, paper §3.1). Callers that compute the
    soup in another form (the LoRA soup of products as stacked factors, :mod:`fedsoup.lora`)
    ask this instead of running the merge."""
    o = options
    if not (is_plain_sgd(o.optimizer_class, o.optimizer_kwargs) and o.epochs == 1 and not o.greedy and not o.project):
        return False
    if isinstance(o.lr, Mapping) or (o.lr is not None and o.lr != 1.0):
        return False
    if callable(o.amplification) or o.amplification != 1.0:
        return False
    return (o.schedule == "harmonic" and o.adaptive_pivot) or (o.schedule == "constant" and not o.adaptive_pivot)


def _kernel(plan: MergePlan):
    from fedsoup import fused

    spec = fused.kernel_spec(plan.optimizer, plan.options.optimizer_settings)
    if spec is None or plan.device.type != "cpu" or not fused.available():
        raise OptionError("_path", "fused", f"the fused kernel cannot run this merge ({plan.optimizer.__name__})")
    return spec


def _per_key_lr(lr: LearningRate, reference: StateDict) -> LearningRate:
    """A per-key lr must name every floating key (MergeOptions has checked its values)."""
    if not isinstance(lr, Mapping):
        return lr
    for key, tensor in reference.items():
        if tensor.is_floating_point() and key not in lr:
            raise OptionError("lr", lr, f"lr: no learning rate for tensor {key!r}")
    return lr


def _device(device, state_dicts: list[StateDict]) -> torch.device:
    if device is not None:
        return torch.device(device)
    floating = [t for t in state_dicts[0].values() if t.is_floating_point()]
    return floating[0].device if floating else torch.device("cpu")
