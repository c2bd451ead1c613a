"""Amortized Model Ensembling (AME): merging models by optimizing over pseudogradients.

Paper: "On Defining Neural Averaging", Algorithm 1 and Sections 3.1-3.3; the exact
conventions are fixed in SPEC §1-2. Ingredients ``x_1..x_N`` with weights ``ω_i``
(normalised to sum 1) define ``f(w) = Σ_i ω_i ½‖w − x_i‖²``; each step visits a batch
``B_k`` and feeds the pseudogradient

    g_k = ζ_k Σ_{j∈B_k} ω_j (p_k − x_j),      p_k = w_{k−1} (adaptive) or w_0 (fixed)

to a ``torch.optim`` optimizer with learning rate ``η_k``: ``w_k = w_{k−1} − η_k·Opt(g_k)``.

Layout (why it is fast): the floating tensors of the merge live in one flat buffer
per compute dtype (``w``, ``g``) with per-key views. ``g`` is written in place as
``ζ Ω_B (p − x̄_B)``, where ``x̄_B`` is the batch's weighted mean, so a step costs a
handful of memory passes and no allocation. Element-wise optimizers step the flat
buffer in one call (fused kernels where torch has them); other optimizers see
per-key views with their original shapes. Small models keep all ingredients stacked in one
``[N, D]`` matrix and precompute an epoch's batch means, so a step is the optimizer's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedsoup.optim import is_elementwise, is_plain_sgd, make_optimizer, resolve_optimizer
from fedsoup.schedules import make_schedule

__all__ = ["merge", "soup", "find_non_finite"]

StateDict = dict[str, torch.Tensor]

# Models up to this many floating parameters are stacked into an [N, D] matrix:
# a step is then a few kernel launches instead of a Python loop over keys and batch.
STACK_MAX_NUMEL = 1 << 16
# Set to False (tests do) to run the step loop even where an identity gives the answer.
USE_SOUP_SHORTCUT = True


# ---------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------


def _as_tensor(value, index: int, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"ingredient {index}, tensor {key!r}: object arrays are not tensors")
        return torch.from_numpy(np.ascontiguousarray(value)) if value.flags.writeable else torch.tensor(value)
    raise ValueError(
        f"ingredient {index}, tensor {key!r}: expected torch.Tensor or numpy.ndarray, "
        f"got {type(value).__name__}"
    )


def _as_state_dicts(models) -> list[StateDict]:
    if isinstance(models, Mapping) or not isinstance(models, Sequence):
        raise ValueError("models must be a sequence of state dicts (Mapping[str, Tensor])")
    if len(models) == 0:
        raise ValueError("cannot merge an empty list of models")
    state_dicts = []
    for index, model in enumerate(models):
        if not isinstance(model, Mapping):
            raise ValueError(
                f"ingredient {index}: expected a mapping of tensors (e.g. model.state_dict()), "
                f"got {type(model).__name__}"
            )
        state_dicts.append({str(k): _as_tensor(v, index, str(k)) for k, v in model.items()})
    return state_dicts


def _check_same_structure(reference: StateDict, other: StateDict, name: str) -> None:
    """Raise ValueError naming ``name`` and the first key that does not match."""
    if other.keys() != reference.keys():
        missing = sorted(reference.keys() - other.keys())
        extra = sorted(other.keys() - reference.keys())
        parts = []
        if missing:
            parts.append(f"missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            parts.append(f"unexpected tensor {extra[0]!r}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
        raise ValueError(f"{name}: {', '.join(parts)} compared with ingredient 0")
    for key, ref in reference.items():
        tensor = other[key]
        if tensor.shape != ref.shape:
            raise ValueError(
                f"{name}, tensor {key!r}: shape {tuple(tensor.shape)} != {tuple(ref.shape)} of ingredient 0"
            )
        if tensor.is_floating_point() != ref.is_floating_point():
            raise ValueError(
                f"{name}, tensor {key!r}: dtype {tensor.dtype} cannot be merged with "
                f"{ref.dtype} of ingredient 0 (floating and non-floating)"
            )


def _check_structures(state_dicts: list[StateDict]) -> None:
    for index, state_dict in enumerate(state_dicts[1:], start=1):
        _check_same_structure(state_dicts[0], state_dict, f"ingredient {index}")


def _normalised_weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    values = [float(w) for w in (weights.tolist() if hasattr(weights, "tolist") else weights)]
    if len(values) != n:
        raise ValueError(f"weights has {len(values)} entries for {n} ingredients")
    for index, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"ingredient {index}: weight must be finite and >= 0, got {value}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError("weights sum to zero: at least one ingredient needs a positive weight")
    return [value / total for value in values]


def _visiting_order(n: int, order_by, descending: bool) -> list[int]:
    if order_by is None:
        return list(range(n))
    scores = [float(s) for s in (order_by.tolist() if hasattr(order_by, "tolist") else order_by)]
    if len(scores) != n:
        raise ValueError(f"order_by has {len(scores)} scores for {n} ingredients")
    for index, score in enumerate(scores):
        if math.isnan(score):
            raise ValueError(f"ingredient {index}: order_by score is NaN")
    # Python's sort is stable also with reverse=True: ties keep the given order.
    return sorted(range(n), key=scores.__getitem__, reverse=descending)


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf.

    Any NaN/Inf makes the sum non-finite, and a sum is one cheap reduction
    (``isfinite(t).all()`` writes a bool tensor first); only a non-finite sum,
    which may also be an overflow of large values, needs the element-wise test.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def find_non_finite(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The first floating tensor's key holding NaN or Inf, or ``None``."""
    return next(
        (key for key, tensor in state_dict.items() if tensor.is_floating_point() and not _all_finite(tensor)),
        None,
    )


def _first_non_finite(state_dicts: list[StateDict], names: list[str]) -> str | None:
    for name, state_dict in zip(names, state_dicts):
        key = find_non_finite(state_dict)
        if key is not None:
            return f"{name}, tensor {key!r}: contains NaN or Inf values"
    return None


def _compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------------
# Soup
# ---------------------------------------------------------------------------


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """``Σ ω_i t_i`` with one pass over each input and no temporaries."""
    out = torch.mul(tensors[0].to(dtype), weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:]):
        out.add_(tensor.to(dtype), alpha=weight)
    return out


def _soup(state_dicts: list[StateDict], weights: list[float], order: list[int]) -> StateDict:
    first = state_dicts[order[0]]
    result: StateDict = {}
    for key, reference in first.items():
        if not reference.is_floating_point():
            result[key] = reference.clone()
            continue
        tensors = [sd[key] for sd in state_dicts]
        result[key] = _weighted_sum(tensors, weights, _compute_dtype(tensors)).to(reference.dtype)
    return result


def soup(models: Sequence[Mapping[str, torch.Tensor | np.ndarray]], weights=None) -> StateDict:
    r"""The weighted model soup :math:`\sum_i \omega_i x_i` (FedAvg's aggregate).

    Floating tensors are averaged in float32 (float64 if an input is float64) and
    returned in ingredient 0's dtype; non-floating tensors are copied from ingredient 0.
    Raises ``ValueError`` naming the ingredient and key on mismatched keys or shapes,
    negative weights or NaN/Inf values.
    """
    state_dicts = _as_state_dicts(models)
    _check_structures(state_dicts)
    omega = _normalised_weights(weights, len(state_dicts))
    result = _soup(state_dicts, omega, list(range(len(state_dicts))))
    _raise_if_not_finite(result, state_dicts, None)
    return result


def _raise_if_not_finite(result: StateDict, state_dicts: list[StateDict], pivot: StateDict | None) -> None:
    """NaN/Inf in any ingredient reaches the result; only then look for the culprit."""
    bad_key = find_non_finite(result)
    if bad_key is None:
        return
    names = [f"ingredient {i}" for i in range(len(state_dicts))]
    culprit = _first_non_finite(state_dicts, names)
    if culprit is None and pivot is not None:
        culprit = _first_non_finite([pivot], ["pivot"])
    if culprit is not None:
        raise ValueError(culprit)
    raise ValueError(
        f"merge diverged: tensor {bad_key!r} of the result is NaN or Inf although every "
        "ingredient is finite; lower lr or change the optimizer settings"
    )


# ---------------------------------------------------------------------------
# Flat buffers
# ---------------------------------------------------------------------------


@dataclass
class _Group:
    """The floating keys merged in one compute dtype, laid out in one flat buffer."""

    dtype: torch.dtype
    keys: list[str]
    shapes: list[torch.Size]
    offsets: list[int]  # offsets[i]:offsets[i+1] is keys[i]
    stacked: torch.Tensor | None  # [N, D] when the model is small, else None

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [
            flat[start:end].view(shape)
            for start, end, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)
        ]

    def flatten(self, state_dict: StateDict) -> torch.Tensor:
        if not self.keys:
            return torch.empty(0, dtype=self.dtype)
        return torch.cat([state_dict[k].reshape(-1).to(self.dtype) for k in self.keys])


def _make_groups(state_dicts: list[StateDict], float_keys: list[str]) -> list[_Group]:
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key in float_keys:
        by_dtype.setdefault(_compute_dtype([sd[key] for sd in state_dicts]), []).append(key)
    total = sum(state_dicts[0][k].numel() for k in float_keys)
    groups = []
    for dtype, keys in by_dtype.items():
        shapes = [state_dicts[0][k].shape for k in keys]
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + math.prod(shape))
        group = _Group(dtype, keys, shapes, offsets, None)
        if total <= STACK_MAX_NUMEL:
            group.stacked = torch.stack([group.flatten(sd) for sd in state_dicts])
        groups.append(group)
    return groups


class _Ingredients:
    """One group's ingredients, read into pseudogradients without temporaries.

    Large models keep each ingredient as per-key flat views of the caller's tensors
    (no copy); small models are stacked into one ``[N, D]`` matrix.
    """

    def __init__(self, state_dicts: list[StateDict], group: _Group) -> None:
        self.group = group
        self._buffer: torch.Tensor | None = None
        if group.stacked is not None:
            self.flat_keys: list[list[torch.Tensor]] = []
            return
        # Flat views of each key (a copy only for non-contiguous or other-dtype inputs).
        self.flat_keys = [[sd[k].to(group.dtype).reshape(-1) for k in group.keys] for sd in state_dicts]
        self.spans = list(zip(group.offsets[:-1], group.offsets[1:]))

    def epoch_means(self, batches: list[list[int]], coefficients: list[list[float]]) -> torch.Tensor | None:
        """All batch means of an epoch as rows of one matrix (stacked layout only).

        A gather, a scale and a segment sum replace a Python loop per step, so for
        small models a step costs the optimizer's time alone. (Not a BLAS matmul: on
        a busy machine its thread pool costs milliseconds for a 15 x 300 product.)
        """
        stacked = self.group.stacked
        if stacked is None:
            return None
        positions = torch.tensor([j for batch in batches for j in batch])
        scales = torch.tensor([c for coeffs in coefficients for c in coeffs], dtype=self.group.dtype)
        batch_ids = torch.tensor([b for b, batch in enumerate(batches) for _ in batch])
        rows = stacked.index_select(0, positions).mul_(scales.unsqueeze(1))
        return torch.zeros(len(batches), stacked.shape[1], dtype=self.group.dtype).index_add_(0, batch_ids, rows)

    def write_pseudogradient(
        self,
        pivot: torch.Tensor,
        grad: torch.Tensor,
        batch: list[int],
        coefficients: list[float],
        scale: float,
        epoch_mean: torch.Tensor | None,
    ) -> None:
        """``g = ζ Ω_B (p − x̄_B) = ζ Σ_{j∈B} ω_j (p − x_j)``, in place.

        Subtracting the batch mean once (rather than ``Ω_B p − Σ ω_j x_j``) keeps
        ``p − x`` exact when ``p`` and ``x`` are close.
        """
        if epoch_mean is not None:  # stacked layout
            torch.sub(pivot, epoch_mean, out=grad).mul_(scale)
            return
        if len(batch) == 1:
            for (lo, hi), x in zip(self.spans, self.flat_keys[batch[0]]):
                torch.sub(pivot[lo:hi], x, out=grad[lo:hi])
        else:
            if self._buffer is None:
                self._buffer = torch.empty(self.group.numel, dtype=self.group.dtype)
            mean_views = self._key_views(self._buffer)
            for view, x in zip(mean_views, self.flat_keys[batch[0]]):
                torch.mul(x, coefficients[0], out=view)
            for j, coefficient in zip(batch[1:], coefficients[1:]):
                torch._foreach_add_(mean_views, self.flat_keys[j], alpha=coefficient)
            torch.sub(pivot, self._buffer, out=grad)
        grad.mul_(scale)

    def _key_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[lo:hi] for lo, hi in zip(self.group.offsets[:-1], self.group.offsets[1:])]

    def soup_into(self, out: torch.Tensor, weights: list[float]) -> None:
        group = self.group
        if group.stacked is not None:
            # Element-wise product and a reduction: no BLAS thread pool for tiny sizes.
            torch.sum(group.stacked * torch.tensor(weights, dtype=group.dtype).unsqueeze(1), dim=0, out=out)
            return
        out_views = self._key_views(out)
        for view, tensor in zip(out_views, self.flat_keys[0]):
            torch.mul(tensor, weights[0], out=view)
        for tensors, weight in zip(self.flat_keys[1:], weights[1:]):
            torch._foreach_add_(out_views, tensors, alpha=weight)

    def squared_distances(self, center: torch.Tensor) -> list[float]:
        """``‖x_j − c‖²`` for every ingredient (used by the projection only)."""
        group = self.group
        if group.stacked is not None:
            return ((group.stacked - center) ** 2).sum(dim=1).tolist()
        center_views = self._key_views(center)
        return [
            float(sum(torch.sum((t - c) ** 2) for t, c in zip(tensors, center_views)))
            for tensors in self.flat_keys
        ]


# ---------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------


def _reduces_to_soup(cls, lr, schedule, epochs, adaptive_pivot, amplification, greedy, project, kwargs) -> bool:
    """One epoch of plain GD with lr 1 *is* the soup (SPEC §1 identities, paper §3.1)."""
    if not (USE_SOUP_SHORTCUT and is_plain_sgd(cls, kwargs) and lr == 1.0 and epochs == 1):
        return False
    if greedy or project or callable(amplification) or amplification != 1.0:
        return False
    return (schedule == "harmonic" and adaptive_pivot) or (schedule == "constant" and not adaptive_pivot)


def merge(
    models: Sequence[Mapping[str, torch.Tensor | np.ndarray]],
    *,
    weights: Sequence[float] | None = None,
    optimizer: str | type[torch.optim.Optimizer] = "sgd",
    lr: float = 1.0,
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
    **optimizer_kwargs,
) -> StateDict:
    r"""Merge models by Amortized Model Ensembling (paper Algorithm 1; SPEC §1).

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
        order_by: one score per ingredient; ingredients are visited sorted by it
            (``descending`` by default, as the paper sorts by validation accuracy).
        shuffle, seed: a fresh permutation of the ordered list every epoch.
        amplification: ``ζ`` as a number or a callable ``k -> ζ_k``.
        greedy, evaluate: keep a step only if ``evaluate(state_dict)`` strictly
            improves; otherwise ``w`` and the optimizer state revert (Appendix A.4).
        project: after every step, project ``w`` onto the smallest ball centred at
            the weighted mean of the ingredients holding all of them and ``w_0`` (Prop. 2).

    Returns:
        The merged state dict: floating tensors in each key's input dtype (computed in
        float32, or float64 if an input is), non-floating tensors unchanged from the
        first ingredient in visiting order.

    Raises:
        ValueError: naming the ingredient and tensor for mismatched keys, shapes or
            dtypes, NaN/Inf values, bad weights or scores; or for invalid options.
    """
    state_dicts = _as_state_dicts(models)
    _check_structures(state_dicts)
    n = len(state_dicts)
    omega = _normalised_weights(weights, n)
    order = _visiting_order(n, order_by, descending)
    cls = resolve_optimizer(optimizer)
    step_size = make_schedule(schedule, lr, alpha)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if greedy and evaluate is None:
        raise ValueError("greedy=True needs an evaluate(state_dict) -> float callback")
    if not callable(amplification) and not math.isfinite(float(amplification)):
        raise ValueError(f"amplification must be finite, got {amplification!r}")
    pivot_state = _resolve_pivot(pivot, state_dicts, order)

    if _reduces_to_soup(cls, lr, schedule, epochs, adaptive_pivot, amplification, greedy, project, optimizer_kwargs):
        result = _soup(state_dicts, omega, order)
        _raise_if_not_finite(result, state_dicts, None)
        return result

    if greedy:
        # A rejected step could hide a NaN ingredient from the result: check up front.
        culprit = _first_non_finite(state_dicts, [f"ingredient {i}" for i in range(n)])
        if culprit is not None:
            raise ValueError(culprit)

    reference = state_dicts[order[0]]
    float_keys = [k for k, t in reference.items() if t.is_floating_point()]
    if not float_keys:  # nothing to optimise: only integer buffers
        return {key: tensor.clone() for key, tensor in reference.items()}
    groups = _make_groups(state_dicts, float_keys)
    ingredients = [_Ingredients(state_dicts, group) for group in groups]

    weights_flat = [torch.empty(g.numel, dtype=g.dtype) for g in groups]
    for w, source in zip(weights_flat, ingredients):
        if pivot_state is None:
            source.soup_into(w, omega)
        else:
            w.copy_(source.group.flatten(pivot_state))
    initial = [w.clone() for w in weights_flat] if (not adaptive_pivot or project) else None
    grads_flat = [torch.empty_like(w) for w in weights_flat]  # written before every step

    # Element-wise optimizers step each group's flat buffer in one (fused) call; the
    # others see every key with its own shape.
    if is_elementwise(cls):
        params, grads = weights_flat, grads_flat
    else:
        params = [v for g, w in zip(groups, weights_flat) for v in g.views(w)]
        grads = [v for g, gr in zip(groups, grads_flat) for v in g.views(gr)]
    for param, grad in zip(params, grads):
        param.grad = grad
    opt = make_optimizer(cls, params, step_size(1, 1.0), **optimizer_kwargs)
    needs_closure = isinstance(opt, torch.optim.LBFGS)

    ball = _projection_ball(ingredients, omega, initial) if project else None

    def build_result() -> StateDict:
        merged: StateDict = {}
        for group, w in zip(groups, weights_flat):
            for key, view in zip(group.keys, group.views(w)):
                merged[key] = view.to(reference[key].dtype, copy=True)
        return {
            key: merged[key] if key in merged else tensor.clone()
            for key, tensor in reference.items()
        }

    best_score = float(evaluate(build_result())) if greedy else None
    generator = torch.Generator().manual_seed(int(seed))
    visited = 0.0
    k = 0
    pivots = weights_flat if adaptive_pivot else initial
    step: dict = {}

    def write_pseudogradients() -> None:
        for source, pivot, grad, means in zip(ingredients, pivots, grads_flat, step["epoch_means"]):
            source.write_pseudogradient(
                pivot, grad, step["batch"], step["coefficients"], step["scale"],
                None if means is None else means[step["index"]],  # rows unbound once per epoch
            )

    with torch.no_grad():
        for _epoch in range(epochs):
            epoch_order = order
            if shuffle:
                epoch_order = [order[i] for i in torch.randperm(n, generator=generator).tolist()]
            batches = [epoch_order[start : start + batch_size] for start in range(0, n, batch_size)]
            batch_weights = [math.fsum(omega[j] for j in batch) for batch in batches]
            # A zero-weight batch gives g = 0 but is still a step: stateful optimizers
            # (momentum) keep moving, as in the plain loop.
            coefficients = [
                [omega[j] / weight if weight > 0 else 0.0 for j in batch]
                for batch, weight in zip(batches, batch_weights)
            ]
            step["epoch_means"] = [
                None if means is None else means.unbind(0)
                for means in (source.epoch_means(batches, coefficients) for source in ingredients)
            ]
            for index, (batch, batch_weight) in enumerate(zip(batches, batch_weights)):
                k += 1
                visited += batch_weight
                zeta = float(amplification(k)) if callable(amplification) else float(amplification)
                for group in opt.param_groups:
                    group["lr"] = step_size(k, visited)
                step.update(index=index, batch=batch, coefficients=coefficients[index], scale=zeta * batch_weight)

                snapshot = None
                if greedy:
                    snapshot = ([w.clone() for w in weights_flat], copy.deepcopy(opt.state_dict()))
                write_pseudogradients()
                if needs_closure:
                    opt.step(lambda: _closure_loss(write_pseudogradients, grads_flat))
                else:
                    opt.step()
                if ball is not None:
                    _project(weights_flat, *ball)
                if greedy:
                    score = float(evaluate(build_result()))
                    if score > best_score:
                        best_score = score
                    else:
                        for w, saved in zip(weights_flat, snapshot[0]):
                            w.copy_(saved)
                        opt.load_state_dict(snapshot[1])

    result = build_result()
    _raise_if_not_finite(result, state_dicts, pivot_state)
    return result


def _closure_loss(write_pseudogradient, grads_flat) -> torch.Tensor:
    # Optimizers with a line search (LBFGS) re-evaluate at moved parameters; the
    # "loss" is any function whose gradient is g: ½‖g‖² is enough to rank points.
    write_pseudogradient()
    return torch.as_tensor(0.5 * sum(float(torch.sum(g * g)) for g in grads_flat))


def _resolve_pivot(pivot, state_dicts: list[StateDict], order: list[int]) -> StateDict | None:
    """The pivot initialisation ``w_0``; ``None`` stands for the soup."""
    if isinstance(pivot, str):
        if pivot == "soup":
            return None
        if pivot == "first":
            return state_dicts[order[0]]
        raise ValueError(f"unknown pivot {pivot!r}: use 'soup', 'first', an ingredient index or a state dict")
    if isinstance(pivot, bool):
        raise ValueError(f"pivot must be 'soup', 'first', an index or a state dict, got {pivot!r}")
    if isinstance(pivot, (int, np.integer)):
        index = int(pivot)
        if not -len(state_dicts) <= index < len(state_dicts):
            raise ValueError(f"pivot index {index} out of range for {len(state_dicts)} ingredients")
        return state_dicts[index]
    if isinstance(pivot, Mapping):
        explicit = {str(k): _as_tensor(v, -1, str(k)) for k, v in pivot.items()}
        _check_same_structure(state_dicts[0], explicit, "pivot")
        return explicit
    raise ValueError(f"pivot must be 'soup', 'first', an index or a state dict, got {type(pivot).__name__}")


def _projection_ball(ingredients: list[_Ingredients], omega, initial):
    """Centre (weighted mean) and radius of the smallest centred ball holding all x_i and w_0."""
    centers = []
    squared = None
    for source, w0 in zip(ingredients, initial):
        center = torch.empty_like(w0)
        source.soup_into(center, omega)
        centers.append(center)
        distances = source.squared_distances(center)
        squared = distances if squared is None else [a + b for a, b in zip(squared, distances)]
    pivot_sq = sum(float(torch.sum((w0 - c) ** 2)) for w0, c in zip(initial, centers))
    radius = math.sqrt(max(max(squared or [0.0]), pivot_sq))
    return centers, radius


def _project(weights_flat: list[torch.Tensor], centers: list[torch.Tensor], radius: float) -> None:
    distance = math.sqrt(sum(float(torch.sum((w - c) ** 2)) for w, c in zip(weights_flat, centers)))
    if distance > radius > 0 or (radius == 0 and distance > 0):
        scale = radius / distance
        for w, c in zip(weights_flat, centers):
            w.sub_(c).mul_(scale).add_(c)
