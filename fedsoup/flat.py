"""Fast ``torch.optim`` paths of AME for element-wise optimizers: flat buffers and stacked
small models. Same update as :mod:`fedsoup.reference` (docs/design.md §1), laid out for speed.

The floating tensors of the merge live in one flat buffer per (compute dtype, base
learning rate) group (``w``, ``g``) with per-key views, and an element-wise optimizer
steps each buffer in one (fused, where torch has it) call. ``g`` is written in place as
``ζ Ω_B (p − x̄_B)``, where ``x̄_B`` is the batch's weighted mean, so a step costs a
handful of memory passes and no allocation. Small models keep all ingredients stacked
in one ``[N, D]`` matrix per group and precompute an epoch's batch means, so a step is
the optimizer's. These paths run on any torch device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedsoup.inputs import StateDict
from fedsoup.optim import make_optimizer
from fedsoup.plan import MergePlan
from fedsoup.schedules import plan_steps

__all__ = ["merge_flat", "STACK_MAX_NUMEL"]

# Models up to this many floating parameters may be stacked into an [N, D] matrix:
# a step is then a few kernel launches instead of a Python loop over keys and batch.
STACK_MAX_NUMEL = 1 << 16


@dataclass
class _Group:
    """The floating keys merged with one compute dtype and base lr, in one flat buffer."""

    dtype: torch.dtype
    base_lr: float
    keys: list[str]
    shapes: list[torch.Size]
    offsets: list[int]  # offsets[i]:offsets[i+1] is keys[i]
    device: torch.device

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [
            flat[start:end].view(shape)
            for start, end, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)
        ]

    def key_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[lo:hi] for lo, hi in zip(self.offsets[:-1], self.offsets[1:])]

    def flatten(self, state_dict: StateDict) -> torch.Tensor:
        return torch.cat([state_dict[k].reshape(-1).to(self.device, self.dtype) for k in self.keys])


def _make_groups(plan: MergePlan) -> list[_Group]:
    by_group: dict[tuple[torch.dtype, float], list[str]] = {}
    for key in plan.float_keys:
        by_group.setdefault((plan.compute_dtype(key), plan.base_lr(key)), []).append(key)
    groups = []
    for (dtype, base_lr), keys in by_group.items():
        shapes = [plan.first[k].shape for k in keys]
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + math.prod(shape))
        groups.append(_Group(dtype, base_lr, keys, shapes, offsets, plan.device))
    return groups


class _Ingredients:
    """One group's ingredients, read into pseudogradients without temporaries.

    Per-key layout: each ingredient as per-key flat views of the caller's tensors (no
    copy on the same device and dtype). Stacked layout: one ``[N, D]`` matrix.
    """

    def __init__(self, state_dicts: list[StateDict], group: _Group, stacked: bool) -> None:
        self.group = group
        self._buffer: torch.Tensor | None = None
        self.stacked = torch.stack([group.flatten(sd) for sd in state_dicts]) if stacked else None
        self.flat_keys = (
            [] if stacked else [[sd[k].to(group.device, group.dtype).reshape(-1) for k in group.keys] for sd in state_dicts]
        )

    def epoch_means(self, batches: list[list[int]], coefficients: list[list[float]]) -> list[torch.Tensor] | None:
        """All batch means of an epoch as rows of one matrix (stacked layout only).

        A gather, a scale and a segment sum replace a Python loop per step, so for
        small models a step costs the optimizer's time alone. (Not a BLAS matmul: on
        a busy machine its thread pool costs milliseconds for a 15 x 300 product.)
        """
        if self.stacked is None:
            return None
        device, dtype = self.group.device, self.group.dtype
        positions = torch.tensor([j for batch in batches for j in batch], device=device)
        scales = torch.tensor([c for coeffs in coefficients for c in coeffs], dtype=dtype, device=device)
        batch_ids = torch.tensor([b for b, batch in enumerate(batches) for _ in batch], device=device)
        rows = self.stacked.index_select(0, positions).mul_(scales.unsqueeze(1))
        means = torch.zeros(len(batches), self.stacked.shape[1], dtype=dtype, device=device)
        return means.index_add_(0, batch_ids, rows).unbind(0)

    def write_pseudogradient(
        self, pivot: torch.Tensor, grad: torch.Tensor, batch: list[int], coefficients: list[float],
        scale: float, epoch_mean: torch.Tensor | None,
    ) -> None:
        """``g = ζ Ω_B (p − x̄_B) = ζ Σ_{j∈B} ω_j (p − x_j)``, in place.

        Subtracting the batch mean once (rather than ``Ω_B p − Σ ω_j x_j``) keeps
        ``p − x`` exact when ``p`` and ``x`` are close.
        """
        if epoch_mean is not None:  # stacked layout
            torch.sub(pivot, epoch_mean, out=grad).mul_(scale)
            return
        if len(batch) == 1:
            for (lo, hi), x in zip(zip(self.group.offsets[:-1], self.group.offsets[1:]), self.flat_keys[batch[0]]):
                torch.sub(pivot[lo:hi], x, out=grad[lo:hi])
        else:
            if self._buffer is None:
                self._buffer = torch.empty(self.group.numel, dtype=self.group.dtype, device=self.group.device)
            mean_views = self.group.key_views(self._buffer)
            for view, x in zip(mean_views, self.flat_keys[batch[0]]):
                torch.mul(x, coefficients[0], out=view)
            for j, coefficient in zip(batch[1:], coefficients[1:]):
                torch._foreach_add_(mean_views, self.flat_keys[j], alpha=coefficient)
            torch.sub(pivot, self._buffer, out=grad)
        grad.mul_(scale)

    def soup_into(self, out: torch.Tensor, weights: list[float]) -> None:
        if self.stacked is not None:
            # Element-wise product and a reduction: no BLAS thread pool for tiny sizes.
            weight_column = torch.tensor(weights, dtype=self.group.dtype, device=self.group.device).unsqueeze(1)
            torch.sum(self.stacked * weight_column, dim=0, out=out)
            return
        out_views = self.group.key_views(out)
        for view, tensor in zip(out_views, self.flat_keys[0]):
            torch.mul(tensor, weights[0], out=view)
        for tensors, weight in zip(self.flat_keys[1:], weights[1:]):
            torch._foreach_add_(out_views, tensors, alpha=weight)


def merge_flat(plan: MergePlan, stacked: bool) -> StateDict:
    """AME on flat buffers (``stacked=False``) or stacked ingredients (``True``).

    For element-wise optimizers without greedy or projection (the reference path does those).
    """
    groups = _make_groups(plan)
    if not groups:
        return plan.result({})
    sources = [_Ingredients(plan.state_dicts, group, stacked) for group in groups]
    weights = [torch.empty(g.numel, dtype=g.dtype, device=g.device) for g in groups]
    for w, source in zip(weights, sources):
        if plan.pivot is None:
            source.soup_into(w, plan.omega)
        else:
            w.copy_(source.group.flatten(plan.pivot))
    pivots = weights if plan.options.adaptive_pivot else [w.clone() for w in weights]
    grads = [torch.empty_like(w) for w in weights]  # written before every step
    for w, grad in zip(weights, grads):
        w.grad = grad
    param_groups = [{"params": [w], "base_lr": g.base_lr} for w, g in zip(weights, groups)]
    optimizer = make_optimizer(plan.optimizer, param_groups, 1.0, **plan.options.optimizer_kwargs)

    omega = plan.omega
    steps = plan_steps(plan.order, omega, plan.options.epochs, plan.options.batch_size, plan.options.shuffle, plan.seed)
    batches_per_epoch = len(steps) // plan.options.epochs
    step_list = list(steps)
    with torch.no_grad():
        for epoch_start in range(0, len(step_list), batches_per_epoch):
            epoch = step_list[epoch_start : epoch_start + batches_per_epoch]
            # A zero-weight batch gives g = 0 but is still a step: stateful optimizers
            # (momentum) keep moving, as in the plain loop.
            coefficients = [[omega[j] / weight if weight > 0 else 0.0 for j in batch] for _, batch, weight, _ in epoch]
            means = [source.epoch_means([step[1] for step in epoch], coefficients) for source in sources]
            for index, (k, batch, batch_weight, visited) in enumerate(epoch):
                for group in optimizer.param_groups:
                    group["lr"] = plan.step_size(group["base_lr"], k, visited)
                scale = plan.zeta(k) * batch_weight
                for source, pivot, grad, epoch_means in zip(sources, pivots, grads, means):
                    mean = None if epoch_means is None else epoch_means[index]
                    source.write_pseudogradient(pivot, grad, batch, coefficients[index], scale, mean)
                optimizer.step()
    for w in weights:
        w.grad = None
    return plan.result({
        key: view for group, w in zip(groups, weights) for key, view in zip(group.keys, group.views(w))
    })
