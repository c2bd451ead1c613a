"""Algorithm 1 of the paper, written as plainly as ``torch.optim`` allows.

This is the reference every fast path is tested against, and the path for everything
they do not cover: greedy AME (Appendix A.4), the projection of Prop. 2, optimizers
that are not element-wise (LBFGS, Adafactor, ...) and unknown optimizer classes.
One parameter per tensor key, one parameter group per base learning rate, and per step
(docs/design.md §1):

    g_k = ζ_k Σ_{j∈B_k} ω_j (p_k − x_j),   p_k = w_{k−1} (adaptive) or w_0 (fixed)
    w_k = w_{k−1} − η_k · Optimizer(g_k)
"""

from __future__ import annotations

import copy
import math

import torch

from fedsoup.inputs import StateDict, first_non_finite
from fedsoup.optim import build_optimizer
from fedsoup.plan import MergePlan
from fedsoup.schedules import plan_steps

__all__ = ["merge_reference", "weighted_sum"]


def weighted_sum(tensors, weights, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``Σ ω_i t_i`` with one pass over each input and no temporaries."""
    out = torch.mul(tensors[0].to(device, dtype), weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:]):
        out.add_(tensor.to(device, dtype), alpha=weight)
    return out


def merge_reference(plan: MergePlan) -> StateDict:
    """Merge by the plain loop of Algorithm 1 (see the module docstring)."""
    if plan.options.greedy:
        # A rejected step could hide a NaN ingredient from the result: check up front.
        culprit = first_non_finite(plan.state_dicts)
        if culprit is not None:
            raise culprit
    keys = plan.float_keys
    device, omega = plan.device, plan.omega
    x = {key: [sd[key].to(device, plan.compute_dtype(key)) for sd in plan.state_dicts] for key in keys}
    if plan.pivot is None:
        w0 = {key: weighted_sum(x[key], omega, x[key][0].dtype) for key in keys}
    else:
        w0 = {key: plan.pivot[key].to(device, x[key][0].dtype) for key in keys}
    w = {key: w0[key].clone() for key in keys}
    if not keys:
        return plan.result({})

    lr_groups: dict[float, list[str]] = {}
    for key in keys:
        lr_groups.setdefault(plan.base_lr(key), []).append(key)
    param_groups = [{"params": [w[key] for key in group], "base_lr": lr} for lr, group in lr_groups.items()]
    optimizer = build_optimizer(plan.optimizer, param_groups, lr=1.0, **plan.options.optimizer_kwargs)
    ball = _projection_ball(x, omega, w0) if plan.options.project else None
    score = float(plan.options.evaluate(_snapshot(plan, w))) if plan.options.greedy else None

    def write_pseudogradients(batch, zeta) -> None:
        for key in keys:
            pivot = w[key] if plan.options.adaptive_pivot else w0[key]
            w[key].grad = zeta * sum(omega[j] * (pivot - x[key][j]) for j in batch)

    with torch.no_grad():
        for k, batch, _batch_weight, visited in plan_steps(
            plan.order, omega, plan.options.epochs, plan.options.batch_size, plan.options.shuffle, plan.seed
        ):
            for group in optimizer.param_groups:
                group["lr"] = plan.step_size(group["base_lr"], k, visited)
            zeta = plan.zeta(k)
            before = (copy.deepcopy(w), copy.deepcopy(optimizer.state_dict())) if plan.options.greedy else None
            write_pseudogradients(batch, zeta)
            if isinstance(optimizer, torch.optim.LBFGS):
                optimizer.step(lambda: _half_squared_norm(write_pseudogradients, batch, zeta, w))
            else:
                optimizer.step()
            if ball is not None:
                _project(w, *ball)
            if plan.options.greedy:
                new_score = float(plan.options.evaluate(_snapshot(plan, w)))
                if new_score > score:
                    score = new_score
                else:
                    for key in keys:
                        w[key].copy_(before[0][key])
                    optimizer.load_state_dict(before[1])
    for param in w.values():
        param.grad = None
    return plan.result(w)


def _snapshot(plan: MergePlan, w: StateDict) -> StateDict:
    return plan.result({key: value.detach().clone() for key, value in w.items()})


def _half_squared_norm(write_pseudogradients, batch, zeta, w) -> torch.Tensor:
    # Optimizers with a line search (LBFGS) re-evaluate at moved parameters; the
    # "loss" is any function whose gradient is g: ½‖g‖² is enough to rank points.
    write_pseudogradients(batch, zeta)
    return torch.as_tensor(0.5 * sum(float(torch.sum(p.grad * p.grad)) for p in w.values()))


def _projection_ball(x, omega, w0):
    """Centre (weighted mean) and radius of the smallest centred ball holding all x_i and w_0 (Prop. 2)."""
    center = {key: weighted_sum(xs, omega, xs[0].dtype) for key, xs in x.items()}

    def distance(point) -> float:
        return math.sqrt(sum(float(torch.sum((point(key) - center[key]) ** 2)) for key in center))

    radii = [distance(lambda key, j=j: x[key][j]) for j in range(len(omega))]
    return center, max(max(radii), distance(w0.__getitem__))


def _project(w, center, radius: float) -> None:
    distance = math.sqrt(sum(float(torch.sum((w[key] - c) ** 2)) for key, c in center.items()))
    if distance > radius:
        scale = radius / distance
        for key, c in center.items():
            w[key].sub_(c).mul_(scale).add_(c)
