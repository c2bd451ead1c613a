"""Compiled chunk-major AME kernels (numba): every step of every epoch on one chunk at a time.

For an element-wise optimizer, a coordinate's whole trajectory ``w_0, w_1, ..., w_K``
depends on that coordinate of the ingredients alone. So instead of streaming the whole
model through memory several times per step (step-major), :func:`ame_chunks` takes a
cache-sized chunk of one tensor, runs *all* steps on it (reading only the ingredients'
slices; the pseudogradient ``g = ζ Ω_B (p − x̄_B)`` is computed inside the update and never
stored; the optimizer state lives in chunk-local arrays), and moves on. That is exact,
not an approximation: each coordinate sees the same operations, in the same order, as
in the step-major loop. Chunks never straddle tensor keys and are cut at the same
key-local offsets whatever the thread count or the other keys, so the result is
bit-identical with 1 or many threads and merged whole or key by key.

Arithmetic is done in the compute dtype (float32 or float64): the Python driver
(:mod:`fedsoup.fused`) passes every constant and per-step scalar already in that dtype,
so no literal here promotes float32 to float64. Formulas follow ``torch.optim``'s
single-tensor implementations (torch 2.x) and :mod:`fedsoup.optim`'s Flower optimizers.

Why one module (about 500 lines, above the project's ~400): numba's on-disk cache (``cache=True``)
decides whether compiled code is stale from the mtime and size of the *one* file that
defines the cached function (numba 0.68, ``_SourceFileBackedLocatorMixin.get_source_stamp``).
Every helper here is inlined into :func:`ame_chunks` or :func:`soup_distance_chunks`: split
across modules, an edit of a helper's module would load the drivers' stale machine code.
The seams are kept as sections instead: memory access (pointers, 16-bit reads), the
optimizers' per-coordinate updates, then the chunk drivers.
"""

from __future__ import annotations

import os
import tempfile

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic

__all__ = ["ame_chunks", "soup_distance_chunks", "KINDS", "CACHE_DIR_FALLBACK"]

# Optimizer kinds the kernel knows (index = the ``kind`` argument).
KINDS = ("sgd", "adam", "adagrad", "rmsprop", "adamax", "fedadam", "fedyogi", "fedadagrad")
SGD, ADAM, ADAGRAD, RMSPROP, ADAMAX, FEDADAM, FEDYOGI, FEDADAGRAD = range(len(KINDS))

# numba caches compiled code next to this file, or (read-only install) in the user's
# cache directory; when neither is writable, here.
CACHE_DIR_FALLBACK = os.path.join(tempfile.gettempdir(), f"fedsoup-numba-cache-{os.getuid()}")


def _jit(**options):
    """``numba.njit(cache=True)``, or with a writable fallback cache dir, or uncached.

    ``error_model="numpy"``: a division by zero gives inf/nan as in torch, and without
    Python's zero check in every division the loops vectorize (SIMD sqrt and divide).
    """
    options.setdefault("error_model", "numpy")

    def decorate(function):
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:  # no writable cache location for this file
            pass
        try:
            numba.config.CACHE_DIR = CACHE_DIR_FALLBACK
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:
            return numba.njit(cache=False, **options)(function)
    return decorate


@intrinsic
def _as_pointer(typingctx, address, like):
    """A typed data pointer from an integer address (of a tensor the caller keeps alive)."""
    signature = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@_jit(inline="always")
def _view(address, numel, like):
    return numba.carray(_as_pointer(address, like), (numel,))


# Element kinds of an ingredient tensor: the compute dtype itself, or 16-bit floats
# (read as their bits and upcast chunk by chunk, exactly, by a table ``scales`` [2, 256]:
# a bf16 (row 0) or fp16 (row 1) value with exponent field e and mantissa m is
# ±scales[e]·(implicit + m), see fedsoup.fused).
SAME, BFLOAT16, FLOAT16 = 0, 1, 2


@_jit()
def _upcast(bits, kind, scales, scratch):
    """16-bit floats (as their bits) into ``scratch`` in the compute dtype, exactly."""
    mantissa_bits = 7 if kind == BFLOAT16 else 10
    exponent_mask = 0xFF if kind == BFLOAT16 else 0x1F
    row = kind - 1
    for i in range(bits.size):
        b = np.int64(bits[i])
        exponent = (b >> mantissa_bits) & exponent_mask
        mantissa = b & ((1 << mantissa_bits) - 1)
        if exponent == exponent_mask:  # inf or nan
            value = np.inf if mantissa == 0 else np.nan
        else:
            implicit = 0 if exponent == 0 else (1 << mantissa_bits)
            value = scales[row, exponent] * (implicit + mantissa)
        scratch[i] = -value if b & 0x8000 else value


@_jit(inline="always")
def _read(addresses, kinds, scales, j, key, numel, start, stop, like, bits_like, scratch):
    """Ingredient ``j``'s slice ``start:stop`` of ``key`` in the compute dtype: a view of
    the caller's tensor, or (16-bit inputs) its upcast into ``scratch``."""
    kind = kinds[j, key]
    if kind == SAME:
        return _view(addresses[j, key], numel, like)[start:stop]
    _upcast(_view(addresses[j, key], numel, bits_like)[start:stop], kind, scales, scratch)
    return scratch[: stop - start]


@_jit(inline="always")
def _lerp(start, end, weight, one_minus_weight):
    # torch's lerp: from the nearer end, for accuracy.
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * one_minus_weight


@_jit(inline="always")
def _mean_at(batch, i):
    """Coordinate ``i`` of the batch mean ``x̄_B = head·c_head + c_tail·tail`` (:func:`_batch`)."""
    head, c_head, tail, c_tail = batch
    return head[i] * c_head + c_tail * tail[i]


# Each optimizer: ``_<name>_at(i, g, w, state, constants)`` updates coordinate ``i`` from its
# pseudogradient ``g``; ``_step_<name>`` unpacks the optimizer's constants once and runs it
# over the chunk with :func:`_each_coordinate`, which computes ``g = ζ Ω_B (p − x̄_B)`` and
# the batch mean ``x̄_B = head·c_head + c_tail·tail`` (:func:`_batch`) in the same loop,
# never stored. That loop is written twice, for ``p = w`` (adaptive pivot) and for a fixed
# ``p = w_0``: with one loop choosing per coordinate, or with ``p`` passed as ``w`` itself,
# the compiler no longer vectorizes the update (it cannot rule out aliasing). For the same
# reason an option that touches one more array (amsgrad) has an update of its own, and
# Adam's other options are exact arithmetic (multiplying by 1, adding 0) instead of branches.


@_jit(inline="always")
def _each_coordinate(update_at, w, adaptive, pivot, batch, scale, state, constants):
    """``update_at(i, g_i, w, state, constants)`` for every coordinate ``i`` of the chunk."""
    if adaptive:
        for i in range(w.size):
            update_at(i, (w[i] - _mean_at(batch, i)) * scale, w, state, constants)
    else:
        for i in range(w.size):
            update_at(i, (pivot[i] - _mean_at(batch, i)) * scale, w, state, constants)


@_jit(inline="always")
def _sgd_at(i, g, w, state, constants):
    s1 = state[0]
    momentum, undamped, weight_decay, nesterov, maximize, lr, first = constants
    d = -g if maximize != 0 else g
    if weight_decay != 0:
        d = d + weight_decay * w[i]
    if momentum != 0:
        if first:
            s1[i] = d
        else:
            s1[i] = s1[i] * momentum + undamped * d
        d = d + momentum * s1[i] if nesterov != 0 else s1[i]
    w[i] = w[i] - lr * d


@_jit()
def _step_sgd(w, adaptive, pivot, batch, scale, s1, h, scalars, first):
    """SGD: h = momentum, 1 − dampening, weight_decay, nesterov, maximize; scalars = lr."""
    constants = (h[0], h[1], h[2], h[3], h[4], scalars[0], first)
    _each_coordinate(_sgd_at, w, adaptive, pivot, batch, scale, (s1,), constants)


@_jit(inline="always")
def _adam_moments(i, d, w, s1, s2, moments):
    """Adam's shared part: (decoupled) weight decay of ``w``, then the two moments."""
    beta1_weight, beta1_rest, beta2, beta2_weight, coupled_decay, decay = moments
    w[i] = w[i] * decay
    d = d + coupled_decay * w[i]
    s1[i] = _lerp(s1[i], d, beta1_weight, beta1_rest)
    s2[i] = s2[i] * beta2 + beta2_weight * d * d


@_jit(inline="always")
def _adam_at(i, g, w, state, constants):
    s1, s2 = state
    moments, (eps, step_size, inverse_sqrt_bias2) = constants
    _adam_moments(i, g, w, s1, s2, moments)
    w[i] = w[i] - step_size * (s1[i] / (np.sqrt(s2[i]) * inverse_sqrt_bias2 + eps))


@_jit(inline="always")
def _amsgrad_at(i, g, w, state, constants):
    s1, s2, s3 = state
    moments, (eps, step_size, inverse_sqrt_bias2) = constants
    _adam_moments(i, g, w, s1, s2, moments)
    s3[i] = max(s3[i], s2[i])
    w[i] = w[i] - step_size * (s1[i] / (np.sqrt(s3[i]) * inverse_sqrt_bias2 + eps))


@_jit()
def _step_adam(w, adaptive, pivot, batch, scale, s1, s2, s3, h, scalars):
    """Adam/AdamW: h = β1, 1 − β1, β2, 1 − β2, eps, coupled weight_decay (0 for AdamW),
    amsgrad, ±1 (maximize); scalars = lr / (1 − β1^k), 1 / sqrt(1 − β2^k), 1 − lr·weight_decay
    (AdamW's decoupled decay; 1 for Adam).

    Multiplying by 1 and adding 0·w change no value (at most the sign of a zero), and
    ``(a·ζ)·(−1) = a·(−ζ)``: the options need no branch in the loop. ``sqrt(v)·(1/sqrt(1 − β2^k))``
    stands for torch's ``sqrt(v) / sqrt(1 − β2^k)``: one rounding apart, and one division
    fewer per coordinate and step (divisions bound this loop)."""
    constants = ((h[1], h[0], h[2], h[3], h[5], scalars[2]), (h[4], scalars[0], scalars[1]))
    signed_scale = scale * h[7]
    if h[6] != 0:
        _each_coordinate(_amsgrad_at, w, adaptive, pivot, batch, signed_scale, (s1, s2, s3), constants)
    else:
        _each_coordinate(_adam_at, w, adaptive, pivot, batch, signed_scale, (s1, s2), constants)


@_jit(inline="always")
def _adagrad_at(i, g, w, state, constants):
    s1 = state[0]
    weight_decay, eps, maximize, clr = constants
    d = -g if maximize != 0 else g
    if weight_decay != 0:
        d = d + weight_decay * w[i]
    s1[i] = s1[i] + d * d
    w[i] = w[i] - clr * (d / (np.sqrt(s1[i]) + eps))


@_jit()
def _step_adagrad(w, adaptive, pivot, batch, scale, s1, h, scalars):
    """Adagrad: h = weight_decay, eps, maximize (s1 starts at initial_accumulator_value);
    scalars = lr / (1 + (k − 1)·lr_decay)."""
    _each_coordinate(_adagrad_at, w, adaptive, pivot, batch, scale, (s1,), (h[0], h[1], h[2], scalars[0]))


@_jit(inline="always")
def _rmsprop_at(i, g, w, state, constants):
    s1, s2, s3 = state
    alpha, alpha_weight, eps, weight_decay, momentum, centered, maximize, lr = constants
    d = -g if maximize != 0 else g
    if weight_decay != 0:
        d = d + weight_decay * w[i]
    s1[i] = s1[i] * alpha + alpha_weight * d * d
    if centered != 0:
        s2[i] = _lerp(s2[i], d, alpha_weight, alpha)
        average = np.sqrt(s1[i] - s2[i] * s2[i]) + eps
    else:
        average = np.sqrt(s1[i]) + eps
    if momentum != 0:
        s3[i] = s3[i] * momentum + d / average
        w[i] = w[i] - lr * s3[i]
    else:
        w[i] = w[i] - lr * (d / average)


@_jit()
def _step_rmsprop(w, adaptive, pivot, batch, scale, s1, s2, s3, h, scalars):
    """RMSprop: h = α, 1 − α, eps, weight_decay, momentum, centered, maximize; scalars = lr."""
    constants = (h[0], h[1], h[2], h[3], h[4], h[5], h[6], scalars[0])
    _each_coordinate(_rmsprop_at, w, adaptive, pivot, batch, scale, (s1, s2, s3), constants)


@_jit(inline="always")
def _adamax_at(i, g, w, state, constants):
    s1, s2 = state
    beta1, beta1_weight, beta2, eps, weight_decay, maximize, clr = constants
    d = -g if maximize != 0 else g
    if weight_decay != 0:
        d = d + weight_decay * w[i]
    s1[i] = _lerp(s1[i], d, beta1_weight, beta1)
    s2[i] = max(s2[i] * beta2, abs(d) + eps)
    w[i] = w[i] - clr * (s1[i] / s2[i])


@_jit()
def _step_adamax(w, adaptive, pivot, batch, scale, s1, s2, h, scalars):
    """Adamax: h = β1, 1 − β1, β2, eps, weight_decay, maximize; scalars = lr / (1 − β1^k)."""
    constants = (h[0], h[1], h[2], h[3], h[4], h[5], scalars[0])
    _each_coordinate(_adamax_at, w, adaptive, pivot, batch, scale, (s1, s2), constants)


@_jit(inline="always")
def _flower_at(i, d, w, state, constants):
    s1, s2 = state
    kind, beta1, beta1_weight, beta2, beta2_weight, eps, step_size = constants
    if kind == FEDADAGRAD:
        s2[i] = s2[i] + d * d
        w[i] = w[i] - step_size * (d / (np.sqrt(s2[i]) + eps))
        return
    s1[i] = s1[i] * beta1 + beta1_weight * d
    squared = d * d
    if kind == FEDADAM:
        s2[i] = s2[i] * beta2 + beta2_weight * squared
    else:  # Yogi
        s2[i] = s2[i] - beta2_weight * squared * np.sign(s2[i] - squared)
    w[i] = w[i] - step_size * (s1[i] / (np.sqrt(s2[i]) + eps))


@_jit()
def _step_flower(w, adaptive, pivot, batch, scale, s1, s2, kind, h, scalars):
    """FedAdam / FedYogi / FedAdagrad (fedsoup.optim): h = β1, 1 − β1, β2, 1 − β2, eps;
    scalars = the step size (FedAdam: lr·sqrt(1 − β2^(t+1)) / (1 − β1^(t+1)); else lr)."""
    constants = (kind, h[0], h[1], h[2], h[3], h[4], scalars[0])
    _each_coordinate(_flower_at, w, adaptive, pivot, batch, scale, (s1, s2), constants)


@_jit()
def _soup_into(w, addresses, kinds, scales, key, numel, start, stop, omega, like, bits_like, scratch):
    """``w = Σ_j ω_j x_j`` on one chunk, in ingredient order (as ``torch.mul`` then ``add_``).

    Three ingredients per pass over ``w`` where they are in the compute dtype: the same
    additions in the same order, a third of the passes (the soup is the memory-bound part
    of a merge: a one-epoch Adam merge measured 13% faster than with one per pass).
    """
    first = _read(addresses, kinds, scales, 0, key, numel, start, stop, like, bits_like, scratch)
    weight = omega[0]
    for i in range(w.size):
        w[i] = first[i] * weight
    j = 1
    while j < omega.size:
        if j + 3 <= omega.size and kinds[j, key] == SAME and kinds[j + 1, key] == SAME and kinds[j + 2, key] == SAME:
            a = _view(addresses[j, key], numel, like)[start:stop]
            b = _view(addresses[j + 1, key], numel, like)[start:stop]
            c = _view(addresses[j + 2, key], numel, like)[start:stop]
            weight_a, weight_b, weight_c = omega[j], omega[j + 1], omega[j + 2]
            for i in range(w.size):
                w[i] = ((w[i] + weight_a * a[i]) + weight_b * b[i]) + weight_c * c[i]
            j += 3
        else:
            x = _read(addresses, kinds, scales, j, key, numel, start, stop, like, bits_like, scratch)
            weight = omega[j]
            for i in range(w.size):
                w[i] = w[i] + weight * x[i]
            j += 1


@_jit(fastmath={"reassoc"})
def _squared_distance(x, y):
    """``Σ_i (x_i − y_i)²`` in float64. Reassociating the sum lets the compiler vectorize it
    (5x faster); the order then depends on the chunk and the compiled code alone, not
    on the thread count or the split of the model."""
    total = 0.0
    for i in range(x.size):
        difference = np.float64(x[i]) - np.float64(y[i])
        total += difference * difference
    return total


@_jit()
def _distances_to(center, row, members, addresses, kinds, scales, key, numel, start, stop, like, bits_like, scratch):
    """``row[m] = ‖x_j − center‖²`` over one chunk, for the ingredients ``j = members[m]``."""
    for m in range(members.size):
        x = _read(addresses, kinds, scales, members[m], key, numel, start, stop, like, bits_like, scratch)
        row[m] = _squared_distance(x, center)


@_jit(parallel=True)
def soup_distance_chunks(out, key_offsets, key_numels, chunk_keys, chunk_starts, chunk_stops, addresses, kinds,
                         scales, bits_like, omega, partial):
    """The soup ``s`` into ``out`` and ``partial[c, j] = ‖x_j − s‖²`` over chunk ``c`` (float64),
    re-reading each chunk's ingredient slices while they are still in cache."""
    for c in prange(chunk_keys.size):
        key = chunk_keys[c]
        start, stop = chunk_starts[c], chunk_stops[c]
        numel = key_numels[key]
        w = out[key_offsets[key] + start : key_offsets[key] + stop]
        scratch = np.empty_like(w)
        _soup_into(w, addresses, kinds, scales, key, numel, start, stop, omega, out, bits_like, scratch)
        _distances_to(w, partial[c], np.arange(omega.size), addresses, kinds, scales, key, numel, start, stop, out,
                      bits_like, scratch)


@_jit(inline="always")
def _batch(mean, members, coefficients, one, addresses, kinds, scales, key, numel, start, stop, like, bits_like,
           head_scratch, tail_scratch):
    """The batch mean ``x̄_B = Σ_{j∈B} (ω_j/Ω_B) x_j`` of one chunk as ``(head, c_head, tail, c_tail)``
    with ``x̄_B = head·c_head + c_tail·tail``, evaluated by the optimizer's own loop: the
    first member and its coefficient and the last (a batch of two: no pass of its own);
    for longer batches ``head`` is the sum of all but the last, ``c_head = 1``. Either way the
    operations of ``x_1·c_1 + c_2·x_2 + ...`` in member order; a batch of one is
    ``x_1·1 + 0·x_1 = x_1``."""
    last = members.size - 1
    tail = _read(addresses, kinds, scales, members[last], key, numel, start, stop, like, bits_like, tail_scratch)
    if last == 0:
        return tail, one, tail, one - one
    head = _read(addresses, kinds, scales, members[0], key, numel, start, stop, like, bits_like, head_scratch)
    if last == 1:
        return head, coefficients[0], tail, coefficients[1]
    size = stop - start
    for i in range(size):
        mean[i] = head[i] * coefficients[0]
    for b in range(1, last):
        x = _read(addresses, kinds, scales, members[b], key, numel, start, stop, like, bits_like, head_scratch)
        coefficient = coefficients[b]
        for i in range(size):
            mean[i] = mean[i] + coefficient * x[i]
    return mean[:size], one, tail, coefficients[last]


@_jit(inline="always")
def _step(kind, w, adaptive, pivot, batch, scale, s1, s2, s3, hyper, scalars, first):
    """One optimizer step on one chunk: ``g = scale·(p − x̄_B)``, ``p = w`` (adaptive) or ``pivot``,
    ``x̄_B`` from :func:`_batch`."""
    if kind == SGD:
        _step_sgd(w, adaptive, pivot, batch, scale, s1, hyper, scalars, first)
    elif kind == ADAM:
        _step_adam(w, adaptive, pivot, batch, scale, s1, s2, s3, hyper, scalars)
    elif kind == ADAGRAD:
        _step_adagrad(w, adaptive, pivot, batch, scale, s1, hyper, scalars)
    elif kind == RMSPROP:
        _step_rmsprop(w, adaptive, pivot, batch, scale, s1, s2, s3, hyper, scalars)
    elif kind == ADAMAX:
        _step_adamax(w, adaptive, pivot, batch, scale, s1, s2, hyper, scalars)
    else:
        _step_flower(w, adaptive, pivot, batch, scale, s1, s2, kind, hyper, scalars)


@_jit(parallel=True)
def ame_chunks(
    out, key_offsets, key_numels, chunk_keys, chunk_starts, chunk_stops,
    ingredient_addresses, ingredient_kinds, scales, bits_like, pivot_addresses, omega, adaptive,
    batch_starts, batch_members, batch_coefficients, batch_scales,
    key_lr_groups, kind, hyper, step_scalars, initial_accumulator, one, guard_members, guard,
):
    """Run every AME step on every chunk; write the merged coordinates into ``out``.

    ``out``: the flat result, key ``k`` at ``key_offsets[k]``. Chunk ``c`` covers
    ``chunk_starts[c]:chunk_stops[c]`` of key ``chunk_keys[c]``. Ingredient ``j``'s key ``k``
    is at address ``ingredient_addresses[j, k]``, of element kind ``ingredient_kinds[j, k]``
    (the compute dtype, or 16-bit floats upcast per chunk); ``pivot_addresses[k]`` is ``w_0``'s key,
    or 0 for the weighted soup ``Σ ω_j x_j``. Step ``s`` visits ingredients
    ``batch_members[batch_starts[s]:batch_starts[s+1]]`` with coefficients ``ω_j / Ω_B``
    and ``g = batch_scales[s]·(p − x̄_B)`` (``ζ_k Ω_B``); its optimizer scalars are
    ``step_scalars[key_lr_groups[k], s]``.

    ``guard`` (float64 ``[chunks, M + 2]``, or no rows to skip it): per chunk, the squared
    distances of Proposition 2's ball from the soup ``s``, measured while the chunk is in
    cache: ``‖x_j − s‖²`` for the ``M`` ingredients ``j`` in ``guard_members``, then
    ``‖w_0 − s‖²`` and ``‖w_K − s‖²``.
    """
    n_steps = batch_scales.size
    n_measured = guard_members.size
    measure = guard.shape[0] > 0
    for c in prange(chunk_keys.size):
        key = chunk_keys[c]
        start, stop = chunk_starts[c], chunk_stops[c]
        numel = key_numels[key]
        w = out[key_offsets[key] + start : key_offsets[key] + stop]
        scratch = np.empty_like(w)
        fixed_pivot = np.empty_like(w)
        soup = fixed_pivot
        if pivot_addresses[key] != 0:
            w[:] = _view(pivot_addresses[key], numel, out)[start:stop]
            if measure:
                soup = np.empty_like(w)
                _soup_into(soup, ingredient_addresses, ingredient_kinds, scales, key, numel, start, stop, omega, out,
                           bits_like, scratch)
        else:
            _soup_into(w, ingredient_addresses, ingredient_kinds, scales, key, numel, start, stop, omega, out,
                       bits_like, scratch)
        if measure or not adaptive:
            fixed_pivot[:] = w
        if measure:
            _distances_to(soup, guard[c], guard_members, ingredient_addresses, ingredient_kinds, scales, key, numel,
                          start, stop, out, bits_like, scratch)
            # w_0 is the soup unless a pivot was given.
            guard[c, n_measured] = _squared_distance(fixed_pivot, soup) if pivot_addresses[key] != 0 else 0.0
        mean = np.empty_like(w)
        tail_scratch = np.empty_like(w)
        s1 = np.zeros_like(w)
        s2 = np.zeros_like(w)
        # A third state array only for the optimizers that use one (zeroing costs a pass).
        s3 = np.zeros(w.size if kind == RMSPROP or (kind == ADAM and hyper[6] != 0) else 0, w.dtype)
        if kind == ADAGRAD:
            s1[:] = initial_accumulator
        group = key_lr_groups[key]
        for s in range(n_steps):
            members = batch_members[batch_starts[s] : batch_starts[s + 1]]
            batch = _batch(mean, members, batch_coefficients[batch_starts[s] : batch_starts[s + 1]], one,
                           ingredient_addresses, ingredient_kinds, scales, key, numel, start, stop, out, bits_like,
                           scratch, tail_scratch)
            _step(kind, w, adaptive, fixed_pivot, batch, batch_scales[s], s1, s2, s3, hyper, step_scalars[group, s],
                  s == 0)
        if measure:
            guard[c, n_measured + 1] = _squared_distance(w, soup)
