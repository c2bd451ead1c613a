r"""Correct rounding into 16- and 8-bit floats: the exact soup and one rounding from float32/float64.

The soup of bf16, fp16 or FP8 ingredients with integer weights ``w_i`` (uniform weights
are all 1; example counts up to :data:`MAX_EXACT_WEIGHT`) is the exact weighted mean
rounded once, to nearest, ties to even (IEEE 754):

.. math::
    \mathrm{soup} = \mathrm{RNE}\Big(\frac{\sum_i w_i x_i}{\sum_i w_i}\Big)
    \quad\text{(docs/design.md §1; the paper's Section 3.1 soup, in the inputs' own dtype)}.

Computing ``Σ x_i·fl(1/n)`` in float32 (or float64) instead misses the exact value by a
few units of float32, which is enough to land on the wrong side of a bf16 tie: the mean
of ``1`` and ``1 + 2⁻⁷`` is the tie ``1 + 2⁻⁸`` exactly, rounded to even ``1``, but
``fl(1/2)``-style weights off by one float32 unit round it up. So per element:

1. every term ``t_i = w_i x_i`` is exact in float64 (``p + 24 ≤ 53`` significand bits);
2. the terms are summed into a non-overlapping *expansion* with Knuth's error-free
   TwoSum (Shewchuk's Grow-Expansion): ``S = Σ t_i`` exactly, as a few float64s;
3. ``q₀ ≈ S / W`` (float64, far closer to ``S/W`` than half a unit of the target) places
   the quotient between two neighbours ``f·u`` and ``(f+1)·u`` of the target format;
4. the one comparison that decides the rounding, ``S`` against ``W·(f + ½)·u`` (exact:
   the product fits a float64), is made exactly by adding ``−W·(f + ½)·u`` to the
   expansion and reading the sign of its largest non-zero component; equality is a tie,
   broken to the even neighbour.

:func:`round_to` is the one rounding of a float32/float64 result (AME, other weights)
into a narrower float: torch's own float64→bf16/fp16 cast rounds twice (through
float32: ``1 + 2⁻⁸ + 2⁻³⁰`` becomes ``1.0``), so float64 values are rounded here, from
their bits. Both run as compiled (numba) loops over chunks, in parallel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from fedsoup.kernels import _as_pointer, _jit, prange

__all__ = ["NARROW_FORMATS", "SOUP_TARGETS", "MAX_EXACT_WEIGHT", "integer_weights", "exact_soup", "round_to",
           "can_soup_exactly"]

# Target formats: (significand bits p with the hidden one, exponent bits, exponent bias, has inf).
# float8_e4m3fn has no inf: its all-ones exponent is a normal binade but for the NaN 0x7F/0xFF.
NARROW_FORMATS: dict[torch.dtype, tuple[int, int, int, bool]] = {
    torch.bfloat16: (8, 8, 127, True),
    torch.float16: (11, 5, 15, True),
    torch.float8_e4m3fn: (4, 4, 7, False),
    torch.float8_e5m2: (3, 5, 15, True),
}
# The exact soup of narrow inputs may also be written into another narrow format or float32
# (``--dtype``): the exact mean rounded once into it, never through the inputs' format.
SOUP_TARGETS: dict[torch.dtype, tuple[int, int, int, bool]] = {**NARROW_FORMATS, torch.float32: (24, 8, 127, True)}
_BITS_DTYPE = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
               torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}
# Integer weights (example counts) up to 2^24 keep every term exact in float64, and the
# decisive product W·(f + ½)·u exact while Σ w_i stays below 2^40.
MAX_EXACT_WEIGHT = 2**24
_MAX_EXACT_TOTAL = 2**40
_BLOCK = 4096  # elements per parallel task


def integer_weights(weights, n: int) -> list[int] | None:
    """The weights as integers when the exact soup applies (``None`` weights: all 1), else ``None``."""
    if weights is None:
        return [1] * n
    values = [float(w) for w in (weights.tolist() if hasattr(weights, "tolist") else weights)]
    if len(values) != n or not all(math.isfinite(v) and v.is_integer() and 0 <= v <= MAX_EXACT_WEIGHT for v in values):
        return None
    integers = [int(v) for v in values]
    return integers if 0 < sum(integers) < _MAX_EXACT_TOTAL else None


def can_soup_exactly(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> bool:
    """True when every ingredient has the same narrow float dtype (bf16, fp16, FP8) on the CPU
    and the result's ``dtype`` (default: theirs) is one of :data:`SOUP_TARGETS`."""
    inputs = tensors[0].dtype
    return (inputs in NARROW_FORMATS and (dtype is None or dtype in SOUP_TARGETS)
            and all(t.dtype == inputs and t.device.type == "cpu" for t in tensors))


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """The raw bits of a flat contiguous float tensor of :data:`SOUP_TARGETS`, as unsigned integers (no copy)."""
    array = tensor.view(_BITS_DTYPE[tensor.dtype]).numpy()
    return array.view(f"u{array.itemsize}")


@functools.cache
def _values_of_all_bits(dtype: torch.dtype) -> np.ndarray:
    """float64 value of every bit pattern of ``dtype`` (torch's widening casts are exact); a
    constant, built once per dtype (bf16 is decoded by a shift and needs only a stand-in)."""
    if dtype == torch.bfloat16:
        return np.zeros(1)
    count = 1 << (8 * dtype.itemsize)
    patterns = torch.arange(count, dtype=torch.int32).to(_BITS_DTYPE[dtype])  # 16-bit patterns wrap to int16
    return patterns.view(dtype).to(torch.float64).numpy()


def exact_soup(tensors: Sequence[torch.Tensor], weights: Sequence[int], dtype: torch.dtype | None = None
               ) -> torch.Tensor:
    """``RNE(Σ w_i x_i / Σ w_i)`` per element, in ``dtype`` (default: the ingredients'; see the module docstring).

    ``tensors`` share one narrow dtype and shape, and ``dtype`` is one of :data:`SOUP_TARGETS`
    (:func:`can_soup_exactly`); ``weights`` are non-negative integers (:func:`integer_weights`).
    Into another format (bf16 inputs written as fp16 or float32) the exact mean is rounded
    once into it, not through the inputs' format. NaN/Inf in an input gives NaN/Inf.
    """
    inputs = tensors[0].dtype
    dtype = inputs if dtype is None else dtype
    precision, exponent_bits, bias, has_inf = SOUP_TARGETS[dtype]
    flat = [t.detach().contiguous().reshape(-1) for t in tensors]  # kept alive: the kernel reads their memory
    out = torch.empty(flat[0].numel(), dtype=dtype)
    addresses = np.array([t.data_ptr() for t in flat], dtype=np.int64)
    like = np.empty(0, dtype=np.uint16 if inputs.itemsize == 2 else np.uint8)
    w = np.asarray(weights, dtype=np.float64)
    _exact_mean_chunk(addresses, like, inputs == torch.bfloat16, out.numel(), _values_of_all_bits(inputs), w,
                      float(w.sum()), _bits(out), precision, exponent_bits, bias, has_inf)
    return out.reshape(tensors[0].shape)


def round_to(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` rounded once, to nearest, ties to even, into ``dtype``.

    A float64 tensor going into bf16, fp16 or FP8 is rounded from its bits here (torch's
    cast would round twice, through float32), and so is anything going into
    float8_e4m3fn (torch saturates at ±448 where this gives NaN, so that an overflowing
    merge is reported, never clamped); every other conversion is torch's own, which rounds
    once (float32 into bf16/fp16/float8_e5m2, float64 into float32) or is exact.
    """
    if tensor.dtype == dtype:
        return tensor
    ours = tensor.dtype == torch.float64 or (dtype == torch.float8_e4m3fn and tensor.is_floating_point())
    if not ours or dtype not in NARROW_FORMATS or tensor.device.type != "cpu":
        return tensor.to(dtype)
    tensor = tensor.to(torch.float64)  # exact widening
    precision, exponent_bits, bias, has_inf = NARROW_FORMATS[dtype]
    values = tensor.detach().contiguous().reshape(-1)
    out = torch.empty(values.numel(), dtype=dtype)
    _round_chunk(values.numpy(), _bits(out), precision, exponent_bits, bias, has_inf)
    return out.reshape(tensor.shape)


# ------------------------------------------------------------------------------ compiled loops


@intrinsic
def _float_bits(typingctx, value):
    """The IEEE bits of a float64, as an int64."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _bfloat16_value(typingctx, bits):
    """The float64 value of bfloat16 bits: the upper half of a float32 (exact)."""
    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(builder.trunc(args[0], ir.IntType(16)), ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.fpext(builder.bitcast(wide, ir.FloatType()), ir.DoubleType())
    return types.float64(types.int64), codegen


@_jit(inline="always")
def _value(table, bits, bfloat16):
    """The float64 value of an input's bits: bf16 by a shift, the other formats from ``table``."""
    return _bfloat16_value(bits) if bfloat16 else table[bits]


_MAGNITUDE = (1 << 63) - 1
_MANTISSA = (1 << 52) - 1


@_jit(inline="always")
def _encode(negative, significand, exponent, precision, exponent_bits, bias, has_inf):
    """The bits of ``±significand·2^exponent`` (``significand ≤ 2^p``, already rounded)."""
    mantissa_bits = precision - 1
    sign = (1 << (mantissa_bits + exponent_bits)) if negative else 0
    if significand == 0:
        return sign
    if significand == (1 << precision):  # rounding carried into the next binade
        significand >>= 1
        exponent += 1
    top = (1 << exponent_bits) - 1
    if significand < (1 << mantissa_bits):  # subnormal
        return sign | significand
    field = exponent + mantissa_bits + bias
    mantissa = significand - (1 << mantissa_bits)
    if has_inf:
        if field >= top:
            return sign | (top << mantissa_bits)  # overflow: inf
    elif field > top or (field == top and mantissa == (1 << mantissa_bits) - 1):
        return sign | (top << mantissa_bits) | ((1 << mantissa_bits) - 1)  # overflow: NaN (no inf)
    return sign | (field << mantissa_bits) | mantissa


@_jit(inline="always")
def _non_finite_bits(value, precision, exponent_bits, has_inf):
    mantissa_bits = precision - 1
    top = (1 << exponent_bits) - 1
    sign = (1 << (mantissa_bits + exponent_bits)) if value < 0 else 0
    if math.isinf(value) and has_inf:
        return sign | (top << mantissa_bits)
    return (top << mantissa_bits) | ((1 << mantissa_bits) - 1)  # NaN


@_jit(inline="always")
def _split(value, precision, bias):
    """``|value| = (lower + rest/2^shift)·2^scale`` on the target's grid at ``value``: returns
    ``(lower, rest, shift, scale)`` with ``2^scale`` the target's unit in the last place there,
    read from the float64's bits (``value`` finite and non-zero)."""
    bits = _float_bits(value) & _MAGNITUDE
    biased = bits >> 52
    if biased == 0:  # float64 subnormal: far below half the smallest subnormal of any target
        return 0, 1, 2, 1 - bias - (precision - 1)
    exponent = biased - 1023
    significand = (bits & _MANTISSA) | (1 << 52)  # |value| = significand·2^(exponent - 52)
    scale = max(exponent, 1 - bias) - (precision - 1)
    shift = scale - exponent + 52
    if shift > 60:  # |value| < a quarter of the unit: rounds to zero
        return 0, 1, 2, scale
    return significand >> shift, significand & ((1 << shift) - 1), shift, scale


@_jit(inline="always")
def _round_value(value, precision, exponent_bits, bias, has_inf):
    """The bits of ``value`` (float64) rounded once to nearest, ties to even."""
    if not math.isfinite(value):
        return _non_finite_bits(value, precision, exponent_bits, has_inf)
    negative = _float_bits(value) < 0
    if value == 0.0:
        return _encode(negative, 0, 0, precision, exponent_bits, bias, has_inf)
    lower, rest, shift, scale = _split(value, precision, bias)
    half = 1 << (shift - 1)
    if rest > half or (rest == half and lower % 2 == 1):
        lower += 1
    return _encode(negative, lower, scale, precision, exponent_bits, bias, has_inf)


@_jit(parallel=True)
def _round_chunk(values, out, precision, exponent_bits, bias, has_inf):
    for i in prange(values.size):
        out[i] = _round_value(values[i], precision, exponent_bits, bias, has_inf)


@_jit(inline="always")
def _grow(expansion, size, term):
    """Add ``term`` to the non-overlapping expansion ``expansion[:size]`` exactly (TwoSum chain);
    return the new size."""
    carry = term
    for k in range(size):
        total = carry + expansion[k]
        virtual = total - carry
        error = (carry - (total - virtual)) + (expansion[k] - virtual)
        expansion[k] = error
        carry = total
    expansion[size] = carry
    return size + 1


@_jit(parallel=True)
def _exact_mean_chunk(addresses, like, bfloat16, count, table, weights, total, out, precision, exponent_bits, bias,
                      has_inf):
    """``out[i]`` = the bits of RNE(Σ_j w_j x_j[i] / total) in the target format (``precision``,
    ``exponent_bits``, ``bias``, ``has_inf``); ingredient ``j``'s bits are at ``addresses[j]`` (of
    ``like``'s element type), decoded by ``table`` (or as bf16).

    Per block, branch-free passes that the compiler vectorizes settle the common case: the
    float64 sum ``S`` exact (TwoSum errors zero), ``q = fl(S/W)`` in the target's normal
    range and not on a midpoint of it; then ``q``'s rounding is ``S/W``'s (rounding is
    monotonic, so a ``q`` off every midpoint is on the true quotient's side of it). Every
    other element (an inexact sum, a midpoint, zero, subnormal, overflow, NaN/Inf) is
    flagged and computed by :func:`_exact_mean`, exactly.
    """
    n = addresses.size
    mantissa_bits = precision - 1
    shift = 52 - mantissa_bits
    half = 1 << (shift - 1)
    low_mask = (1 << shift) - 1
    largest_field = (1 << exponent_bits) - (2 if has_inf else 1)
    sign_bit = 1 << (mantissa_bits + exponent_bits)
    for block in prange((count + _BLOCK - 1) // _BLOCK):
        start = block * _BLOCK
        size = min(count, start + _BLOCK) - start
        sums = np.empty(size)
        flags = np.zeros(size, dtype=np.uint8)
        first = _as_pointer(addresses[0], like)
        for i in range(size):
            sums[i] = _value(table, first[start + i], bfloat16) * weights[0]
        for j in range(1, n):
            ingredient = _as_pointer(addresses[j], like)
            weight = weights[j]
            for i in range(size):
                term = _value(table, ingredient[start + i], bfloat16) * weight
                partial = sums[i] + term
                virtual = partial - sums[i]
                error = (sums[i] - (partial - virtual)) + (term - virtual)
                flags[i] |= error != 0.0
                sums[i] = partial
        for i in range(size):
            bits = _float_bits(sums[i] / total)
            magnitude = bits & _MAGNITUDE
            rest = magnitude & low_mask
            rounded = (magnitude >> shift) + (rest > half)  # the significand, with the exponent above it
            field = (rounded >> mantissa_bits) - 1023 + bias
            unusual = (field < 1) | (field > largest_field) | (rest == half)
            if not has_inf:  # float8_e4m3fn: the top binade's last code is NaN
                unusual |= (field == largest_field) & ((rounded & ((1 << mantissa_bits) - 1)) == (1 << mantissa_bits) - 1)
            flags[i] |= unusual
            out[start + i] = (sign_bit if bits < 0 else 0) | (field << mantissa_bits) | (rounded & ((1 << mantissa_bits) - 1))
        scratch = np.empty(n + 1)
        codes = np.empty(n, dtype=np.int64)
        for i in range(size):
            if flags[i]:
                for j in range(n):
                    codes[j] = _as_pointer(addresses[j], like)[start + i]
                out[start + i] = _exact_mean(codes, n, bfloat16, table, weights, total, scratch, precision,
                                             exponent_bits, bias, has_inf)


@_jit(inline="always")
def _exact_mean(bits, n, bfloat16, table, weights, total, expansion, precision, exponent_bits, bias, has_inf):
    """The bits of RNE(Σ_j w_j x_j[i] / total).

    Fast path: when every partial sum of the float64 terms is exact (TwoSum errors all
    zero, as for terms of similar magnitude), ``S`` is one float64 and ``q = fl(S/W)`` is
    rounded directly; only a ``q`` landing exactly on a midpoint of the target is ambiguous
    (monotonic rounding keeps every other ``q`` on the true quotient's side), and is settled
    by the exact comparison of ``S`` with ``W·midpoint``. Otherwise steps 2-4 of the
    module docstring."""
    total_sum = _value(table, bits[0], bfloat16) * weights[0]
    exact = True
    for j in range(1, n):
        term = _value(table, bits[j], bfloat16) * weights[j]
        partial = total_sum + term
        virtual = partial - total_sum
        if (total_sum - (partial - virtual)) + (term - virtual) != 0.0:
            exact = False
        total_sum = partial
    if not exact:
        return _exact_mean_expansion(bits, n, bfloat16, table, weights, total, expansion, precision, exponent_bits,
                                     bias, has_inf)
    quotient = total_sum / total
    if math.isfinite(quotient) and quotient != 0.0:
        lower, rest, shift, scale = _split(quotient, precision, bias)
        if rest == 1 << (shift - 1):  # q sits on a midpoint: compare S with W·midpoint exactly
            difference = abs(total_sum) - total * math.ldexp(lower + 0.5, scale)
            up = difference > 0 or (difference == 0 and lower % 2 == 1)
            return _encode(_float_bits(quotient) < 0, lower + 1 if up else lower, scale, precision, exponent_bits,
                           bias, has_inf)
    return _round_value(quotient, precision, exponent_bits, bias, has_inf)  # off a midpoint: q rounds as S/W does


@_jit(inline="always")
def _exact_mean_expansion(bits, n, bfloat16, table, weights, total, expansion, precision, exponent_bits, bias,
                          has_inf):
    """RNE(S/W) with ``S`` an exact expansion (steps 2-4 of the module docstring)."""
    size = 0
    for j in range(n):
        size = _grow(expansion, size, _value(table, bits[j], bfloat16) * weights[j])
    approx = 0.0
    for k in range(size):  # smallest components first
        approx += expansion[k]
    quotient = approx / total
    if not math.isfinite(quotient):
        return _non_finite_bits(quotient, precision, exponent_bits, has_inf)
    if quotient == 0.0:  # a non-overlapping expansion sums to 0 only when it is 0
        return _encode(_float_bits(quotient) < 0, 0, 0, precision, exponent_bits, bias, has_inf)
    lower, _, _, scale = _split(quotient, precision, bias)
    midpoint = math.ldexp(lower + 0.5, scale)
    direction = 1.0 if quotient > 0 else -1.0
    # sign(|S| - W·midpoint), exactly: S - direction·W·midpoint as an expansion, whose sign
    # is that of its largest non-zero component.
    size = _grow(expansion, size, -direction * (total * midpoint))
    side = 0.0
    for k in range(size - 1, -1, -1):
        if expansion[k] != 0.0:
            side = direction * expansion[k]
            break
    significand = lower
    if side > 0 or (side == 0 and significand % 2 == 1):
        significand += 1
    return _encode(quotient < 0, significand, scale, precision, exponent_bits, bias, has_inf)
