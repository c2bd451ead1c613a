"""The fused chunk-major CPU path of AME: plans the steps, then runs :mod:`fedsoup.kernels`.

Everything that does not depend on a coordinate is computed here once, in float64, and
handed to the kernel in the compute dtype: each step's batch, its coefficients
``ω_j / Ω_B`` and scale ``ζ_k Ω_B``, the learning rate ``η_k`` of every base-lr group and
the optimizer's per-step scalars (bias corrections, decayed rates). The kernel then runs
all steps on one cache-sized chunk at a time (why that is exact: :mod:`fedsoup.kernels`).
Ingredients are read in place, by address: no copy of the models (bf16/fp16 ingredients
are upcast exactly chunk by chunk inside the kernel; a float64 merge of 16-bit inputs
upcasts them per key first).

Compiled code is cached on disk by numba (next to the package, or in the user's cache
directory when the package is read-only, or under the system's temp directory): the
first merge on a machine compiles each compute dtype once (measured by
``benchmarks/bench_merge.py``), later processes load it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsoup.inputs import StateDict, compute_dtype
from fedsoup.optim import FedAdagrad, FedAdam, FedYogi
from fedsoup.plan import MergePlan
from fedsoup.schedules import StepPlan, plan_steps

__all__ = ["KernelSpec", "kernel_spec", "merge_fused", "soup_and_distances", "CHUNK",
           "available"]

# Coordinates per chunk. The N ingredient slices of a chunk (16 x 32 KiB in float32) stay
# in a core's L2 cache between the soup's read and the steps' reads; and each slice is
# eight 4 KiB pages read in a row, which the hardware prefetcher streams (it stops at
# page boundaries: with 1024-coordinate chunks, the in-kernel soup measured 1.7x the
# torch soup, with 8192 1.2x; the steps ran at the same speed from 1024 to 8192).
CHUNK = 8192


@dataclass(frozen=True)
class KernelSpec:
    """An optimizer as the kernel runs it: its kind, constants and per-step scalars."""

    kind: str
    hyper: tuple[float, ...]
    scalars: Callable[[np.ndarray, np.ndarray], tuple]  # (k, η_k) of every step -> its scalars
    initial_accumulator: float = 0.0


def available() -> bool:
    """True when numba imports (the fused path is then used on CPU)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_spec(optimizer: type[torch.optim.Optimizer], settings: Mapping[str, Any]) -> KernelSpec | None:
    """How the kernel runs ``optimizer`` with ``settings``, or ``None`` if it does not know it.

    ``settings`` are every constructor argument, resolved and value-checked once by
    :class:`~fedsoup.options.MergeOptions` (``options.optimizer_settings``): trusted here.
    """
    builder = _SPECS.get(optimizer)
    if builder is None or settings.get("capturable") or settings.get("differentiable"):
        return None
    return builder(settings)


def _flag(value) -> float:
    return 1.0 if value else 0.0


def _sgd(o) -> KernelSpec:
    hyper = (o["momentum"], 1.0 - o["dampening"], o["weight_decay"], _flag(o["nesterov"]), _flag(o["maximize"]))
    return KernelSpec("sgd", hyper, lambda k, lr: (lr,))


def _adam(o) -> KernelSpec:
    beta1, beta2 = o["betas"]
    weight_decay = o["weight_decay"]
    decoupled = o.get("decoupled_weight_decay", False)
    hyper = (beta1, 1.0 - beta1, beta2, 1.0 - beta2, o["eps"], 0.0 if decoupled else weight_decay,
             _flag(o["amsgrad"]), -1.0 if o["maximize"] else 1.0)
    return KernelSpec("adam", hyper, lambda k, lr: (
        lr / (1.0 - beta1**k), 1.0 / np.sqrt(1.0 - beta2**k),
        1.0 - lr * weight_decay if decoupled else np.ones_like(lr),
    ))


def _adagrad(o) -> KernelSpec:
    lr_decay = o["lr_decay"]
    hyper = (o["weight_decay"], o["eps"], _flag(o["maximize"]))
    return KernelSpec("adagrad", hyper, lambda k, lr: (lr / (1.0 + (k - 1) * lr_decay),),
                      float(o["initial_accumulator_value"]))


def _rmsprop(o) -> KernelSpec:
    alpha = o["alpha"]
    hyper = (alpha, 1.0 - alpha, o["eps"], o["weight_decay"], o["momentum"], _flag(o["centered"]),
             _flag(o["maximize"]))
    return KernelSpec("rmsprop", hyper, lambda k, lr: (lr,))


def _adamax(o) -> KernelSpec:
    beta1, beta2 = o["betas"]
    hyper = (beta1, 1.0 - beta1, beta2, o["eps"], o["weight_decay"], _flag(o["maximize"]))
    return KernelSpec("adamax", hyper, lambda k, lr: (lr / (1.0 - beta1**k),))


def _flower(kind: str):
    def spec(o) -> KernelSpec:
        beta1, beta2 = o.get("betas", (0.0, 0.0))
        hyper = (beta1, 1.0 - beta1, beta2, 1.0 - beta2, o["eps"])
        if kind == "fedadam":
            return KernelSpec(kind, hyper, lambda k, lr: (
                lr * np.sqrt(1.0 - beta2 ** (k + 1.0)) / (1.0 - beta1 ** (k + 1.0)),
            ))
        return KernelSpec(kind, hyper, lambda k, lr: (lr,))
    return spec


_SPECS = {
    torch.optim.SGD: _sgd,
    torch.optim.Adam: _adam,
    torch.optim.AdamW: lambda options: _adam({**options, "decoupled_weight_decay": True}),
    torch.optim.Adagrad: _adagrad,
    torch.optim.RMSprop: _rmsprop,
    torch.optim.Adamax: _adamax,
    FedAdam: _flower("fedadam"),
    FedYogi: _flower("fedyogi"),
    FedAdagrad: _flower("fedadagrad"),
}


def merge_fused(plan: MergePlan, spec: KernelSpec, guard_members: list[int] | None = None
                ) -> tuple[StateDict, dict[str, np.ndarray]]:
    """AME on CPU by the chunk-major kernel; the same update as :mod:`fedsoup.reference`.

    Returns the merged state dict and, when ``guard_members`` names ingredients, per
    floating key the squared distances of Proposition 2's ball from the soup ``s``,
    measured in the same pass (float64): ``‖x_j − s‖²`` for each ``j`` in ``guard_members``,
    then ``‖w_0 − s‖²`` and ``‖w − s‖²`` (empty without ``guard_members``).
    """
    from fedsoup import kernels  # numba compiles (or loads its cache) on first use

    by_dtype: dict[torch.dtype, list[str]] = {}
    for key in plan.float_keys:
        by_dtype.setdefault(plan.compute_dtype(key), []).append(key)
    table = _step_table(plan)
    merged: StateDict = {}
    distances: dict[str, np.ndarray] = {}
    for dtype, keys in by_dtype.items():
        part, part_distances = _run(kernels, plan, spec, table, dtype, keys, guard_members)
        merged.update(part)
        distances.update(part_distances)
    return plan.result(merged), distances


@dataclass
class _StepTable:
    steps: StepPlan
    coefficients: np.ndarray  # float64, ω_j / Ω_B of every member
    scales: np.ndarray  # float64 [S], ζ_k Ω_B


def _step_table(plan: MergePlan) -> _StepTable:
    steps = plan_steps(plan.order, plan.omega, plan.options.epochs, plan.options.batch_size, plan.options.shuffle,
                       plan.seed)
    member_batch_weights = np.repeat(steps.batch_weights, np.diff(steps.starts))
    # A zero-weight batch gives g = 0 but is still a step (momentum keeps moving).
    positive = member_batch_weights > 0
    member_weights = np.asarray(plan.omega)[steps.members]
    coefficients = np.where(positive, member_weights / np.where(positive, member_batch_weights, 1.0), 0.0)
    if callable(plan.options.amplification):
        zetas = np.array([plan.zeta(k) for k in range(1, len(steps) + 1)])
    else:
        zetas = np.full(len(steps), float(plan.options.amplification))
    return _StepTable(steps, coefficients, zetas * steps.batch_weights)


@dataclass
class _Layout:
    """Where the kernel finds one compute dtype's keys: ingredient addresses and chunks."""

    keys: list[str]
    shapes: list[torch.Size]
    np_dtype: type
    tensors: list[torch.Tensor]  # keeps converted copies alive while the kernel reads them
    addresses: np.ndarray  # int64 [N, K]
    kinds: np.ndarray  # int64 [N, K]: the compute dtype, bfloat16 or float16 (kernels.SAME, ...)
    numels: np.ndarray  # int64 [K]
    offsets: np.ndarray  # int64 [K + 1], each key's place in the flat result
    chunk_keys: np.ndarray
    chunk_starts: np.ndarray
    chunk_stops: np.ndarray

    def split(self, flat: torch.Tensor) -> StateDict:
        return {key: flat[lo:hi].view(shape)
                for key, shape, lo, hi in zip(self.keys, self.shapes, self.offsets[:-1], self.offsets[1:])}

    def sum_by_key(self, per_chunk: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of per-chunk partial sums added up per key, in chunk order (deterministic)."""
        sums = np.zeros((len(self.keys), per_chunk.shape[1]))
        np.add.at(sums, self.chunk_keys, per_chunk)
        return dict(zip(self.keys, sums))


@contextmanager
def _torch_threads(chunks: int):
    """Run a kernel on torch's intra-op thread count (one knob for the merge's threads;
    the result does not depend on it), but no more threads than chunks (an idle OpenMP
    thread costs milliseconds at every barrier on a busy machine), and leave torch's
    setting as it was: numba's OpenMP layer changes the OpenMP thread count torch shares."""
    import numba

    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, chunks, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _half_scales() -> np.ndarray:
    """``[2, 256]`` tables: a bf16 (row 0) or fp16 (row 1) float with exponent field ``e``
    and mantissa ``m`` is ``±scale[e]·(implicit + m)`` (implicit 0 for ``e = 0``): exact."""
    scales = np.zeros((2, 256))
    for row, (mantissa_bits, bias) in enumerate(((7, 127), (10, 15))):
        for e in range(1 << (15 - mantissa_bits)):
            scales[row, e] = 2.0 ** (max(e, 1) - bias - mantissa_bits)
    return scales


_HALF_SCALES = _half_scales()
_BITS_LIKE = np.empty(0, np.uint16)  # tells the kernel the type of 16-bit inputs


def _addresses(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


_HALF_KINDS = {torch.bfloat16: 1, torch.float16: 2}  # kernels.BFLOAT16, kernels.FLOAT16


def _readable(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tensor as the kernel reads it: contiguous on CPU, in ``dtype`` or (float32
    compute) still 16-bit, upcast chunk by chunk in the kernel."""
    tensor = tensor.to("cpu")
    if not (dtype == torch.float32 and tensor.dtype in _HALF_KINDS):
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def _layout(state_dicts: list[StateDict], keys: list[str], dtype: torch.dtype) -> _Layout:
    # Inputs are read in place when already contiguous CPU tensors of the compute dtype.
    tensors = [_readable(sd[key], dtype) for sd in state_dicts for key in keys]
    shapes = [state_dicts[0][key].shape for key in keys]
    numels = [math.prod(shape) for shape in shapes]
    chunks = [(index, start, min(start + CHUNK, numel))
              for index, numel in enumerate(numels) for start in range(0, numel, CHUNK)]
    chunk_keys, chunk_starts, chunk_stops = (np.array(column, np.int64).reshape(-1) for column in zip(*chunks)) \
        if chunks else (np.zeros(0, np.int64),) * 3
    return _Layout(
        keys, shapes, np.float64 if dtype == torch.float64 else np.float32, tensors,
        np.array(_addresses(tensors), np.int64).reshape(len(state_dicts), len(keys)),
        np.array([_HALF_KINDS.get(t.dtype, 0) for t in tensors], np.int64).reshape(len(state_dicts), len(keys)),
        np.array(numels, np.int64), np.cumsum([0] + numels).astype(np.int64),
        chunk_keys, chunk_starts, chunk_stops,
    )


def _run(kernels, plan: MergePlan, spec: KernelSpec, table: _StepTable, dtype: torch.dtype, keys: list[str],
         guard_members: list[int] | None):
    layout = _layout(plan.state_dicts, keys, dtype)
    np_dtype = layout.np_dtype
    pivots = [] if plan.pivot is None else [plan.pivot[key].to("cpu", dtype).contiguous() for key in keys]
    pivot_addresses = np.array(_addresses(pivots) if pivots else [0] * len(keys), np.int64)

    base_lrs = sorted({plan.base_lr(key) for key in keys})
    key_lr_groups = np.array([base_lrs.index(plan.base_lr(key)) for key in keys], np.int64)
    steps = np.arange(1, len(table.steps) + 1, dtype=np.float64)
    step_scalars = np.stack([  # [group, step, scalar]
        np.stack(np.broadcast_arrays(*spec.scalars(steps, plan.step_sizes(base_lr, table.steps.visited))), axis=1)
        for base_lr in base_lrs
    ])

    # A step size beyond the compute dtype (harmonic η_0/V_k with a tiny V_1) becomes Inf:
    # the result is then NaN and fedsoup.inputs reports the merge as diverged, as the
    # reference path does; NumPy's overflow warning would only add noise.
    with np.errstate(over="ignore"):
        step_scalars = step_scalars.astype(np_dtype)
    out = torch.empty(int(layout.offsets[-1]), dtype=dtype)
    members = np.array(guard_members or [], np.int64)
    guard = np.zeros((0 if guard_members is None else layout.chunk_keys.size, members.size + 2))
    arguments = (
        out.numpy(), layout.offsets[:-1], layout.numels, layout.chunk_keys, layout.chunk_starts, layout.chunk_stops,
        layout.addresses, layout.kinds, _HALF_SCALES, _BITS_LIKE, pivot_addresses, np.array(plan.omega, np_dtype),
        bool(plan.options.adaptive_pivot),
        table.steps.starts, table.steps.members, table.coefficients.astype(np_dtype), table.scales.astype(np_dtype),
        key_lr_groups, kernels.KINDS.index(spec.kind), np.array(spec.hyper, np_dtype),
        step_scalars, np_dtype(spec.initial_accumulator), np_dtype(1.0),
        members, guard,
    )
    with _torch_threads(layout.chunk_keys.size):
        kernels.ame_chunks(*arguments)
    del pivots  # only now may converted copies go (layout.tensors lives on with the layout)
    return layout.split(out), ({} if guard_members is None else layout.sum_by_key(guard))


def soup_and_distances(state_dicts: list[StateDict], omega: list[float]) -> tuple[StateDict, dict[str, np.ndarray]]:
    """The weighted soup ``s = Σ ω_i x_i`` and, per floating key, every ingredient's
    squared distance ``‖x_i − s‖²`` (float64 array of N), reading the ingredients once
    (chunk by chunk; each chunk's distances while its slices are still in cache).

    Keys are computed in float32 (float64 if an input is) and returned in that dtype;
    the result does not depend on the thread count. Needs numba (:func:`available`);
    :func:`fedsoup.ball.measure_spreads` has the torch equivalent.
    """
    from fedsoup import kernels

    keys_by_dtype: dict[torch.dtype, list[str]] = {}
    for key, tensor in state_dicts[0].items():
        if tensor.is_floating_point():
            keys_by_dtype.setdefault(compute_dtype([sd[key] for sd in state_dicts]), []).append(key)
    soup: StateDict = {}
    distances: dict[str, np.ndarray] = {}
    for dtype, keys in keys_by_dtype.items():
        layout = _layout(state_dicts, keys, dtype)
        out = torch.empty(int(layout.offsets[-1]), dtype=dtype)
        partial = np.zeros((layout.chunk_keys.size, len(state_dicts)))
        arguments = (
            out.numpy(), layout.offsets[:-1], layout.numels, layout.chunk_keys, layout.chunk_starts,
            layout.chunk_stops, layout.addresses, layout.kinds, _HALF_SCALES, _BITS_LIKE,
            np.array(omega, layout.np_dtype), partial,
        )
        with _torch_threads(layout.chunk_keys.size):
            kernels.soup_distance_chunks(*arguments)
        soup.update(layout.split(out))
        distances.update(layout.sum_by_key(partial))
    return soup, distances
