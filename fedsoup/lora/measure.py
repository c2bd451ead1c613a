"""The factor/product error of averaging LoRA factors (docs/design.md §2.6), measured on every merge:

    e_m = ‖s·soup(B)·soup(A) − soup(s·B·A)‖_F / ‖soup(s·B·A)‖_F

per module, with the weighted soup as ``soup`` whatever the mode and optimizer, and the
stacked factors ``B_cat diag(c) A_cat`` whose product is the exact soup of products.
The one implementation of both: the offline merges (:mod:`fedsoup.lora.modes`,
:mod:`fedsoup.lora.into_base`) and the federated round (``strategies.adapters``) call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fedsoup.inputs import compute_dtype
from fedsoup.lora.pairs import Adapter, LoraPair

__all__ = ["Stack", "stacked", "factor_product_error", "factor_product_errors"]


class Stack(NamedTuple):
    """One module's soup of products held as factors: ``B diag(c) A = Σ_i ω_i s_i B_i A_i``.

    ``B = [B_1 … B_N]`` (d_out, k) and ``A = [A_1; …; A_N]`` (k, d_in) in the compute dtype,
    ``c`` (k,) float64: ``ω_i s_i`` repeated ``r_i`` times (``k = Σ r_i``; ranks may differ).
    """

    B: torch.Tensor
    A: torch.Tensor
    c: torch.Tensor

    def weights(self) -> torch.Tensor:
        """``c`` in the factors' dtype (what a product with ``B``, ``A`` uses)."""
        return self.c.to(self.B.dtype)

    def scaled_B(self) -> torch.Tensor:
        """``B_cat = [ω_1 s_1 B_1 … ω_N s_N B_N]`` (PEFT's ``cat``): ``B_cat A_cat`` is the soup."""
        return self.B * self.weights()


def stacked(pairs: Sequence[LoraPair], omega: Sequence[float]) -> Stack:
    """One module's factors of every ingredient (``pairs[i]`` with weight ``omega[i]``) as a :class:`Stack`."""
    dtype = compute_dtype([t for p in pairs for t in (p.A, p.B)])
    b = torch.cat([p.B.to(dtype) for p in pairs], dim=1)
    a = torch.cat([p.A.to(dtype) for p in pairs], dim=0)
    c = torch.cat([torch.full((p.rank,), w * p.scale, dtype=torch.float64) for p, w in zip(pairs, omega)])
    return Stack(b, a, c)


def factor_product_error(pairs: Sequence[LoraPair], omega: Sequence[float], *, stack: Stack | None = None,
                         soup: tuple[torch.Tensor, torch.Tensor] | None = None, probes: int | None = None,
                         seed: int = 0) -> float | None:
    """``e_m`` of one module from its factors (``pairs[i]`` weighted by ``omega[i]``, normalised).

    ``s·soup(B) = Σ ω_i s_i B_i`` (each scale folded, as the ``factors`` mode writes it),
    ``soup(A) = Σ ω_i A_i`` (summed in float64 when exact), or ``soup``: that pair as the caller already
    holds it (the federated round's soup of the factors). ``stack``: :func:`stacked` of the
    same ingredients, when the caller built it for its merge (built here otherwise).

    Exact by default: both products are held as factors, so the difference is
    ``[s·soup(B), −B_cat] [soup(A); A_cat]`` and both norms come from one thin QR per side
    (float64). With ``probes`` and a stacked rank ``r + Σ r_i > 2·probes``, estimated instead
    from ``probes`` Gaussian probes ``G`` seeded by ``seed``, as ``‖(P − Q) G‖_F / ‖Q G‖_F``
    term by term (``Q G = Σ_i ω_i s_i B_i (A_i G)``, no stacked copy), in
    ``O((d_out + d_in) Σ r_i · probes)`` (Hutchinson: each squared norm is unbiased, its
    relative standard deviation at most ``√(2/probes)``). ``None`` where the ranks differ
    (no soup of factors exists); ``0.0`` where both products are zero, ``inf`` where only
    the soup of products is.
    """
    rank = pairs[0].rank
    if any(p.rank != rank for p in pairs):
        return None
    if probes is None or rank * (len(pairs) + 1) <= 2 * probes:
        if soup is None:
            soup = (sum(w * p.scale * p.B.double() for p, w in zip(pairs, omega)),
                    sum(w * p.A.double() for p, w in zip(pairs, omega)))
        difference, target = _exact_norms(*soup, stacked(pairs, omega) if stack is None else stack, rank)
    else:  # an estimate: the soups in the compute dtype, as the sketch itself
        dtype = compute_dtype([t for p in pairs for t in (p.A, p.B)] + ([] if soup is None else list(soup)))
        if soup is None:
            soup = (torch.zeros(pairs[0].B.shape, dtype=dtype), torch.zeros(pairs[0].A.shape, dtype=dtype))
            for pair, w in zip(pairs, omega):
                soup[0].add_(pair.B, alpha=w * pair.scale)
                soup[1].add_(pair.A, alpha=w)
        difference, target = _sketched_norms(*soup, pairs, omega, dtype, probes, seed)
    if target == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / target


def _exact_norms(b_soup: torch.Tensor, a_soup: torch.Tensor, stack: Stack, rank: int) -> tuple[float, float]:
    """``(‖P − Q‖_F, ‖Q‖_F)`` for ``P = b_soup a_soup``, ``Q = B_cat A_cat``, in float64.

    One thin QR per side: ``U = [P_B, −B_cat] = Q_u R_u``, ``V = [P_A; A_cat]ᵀ = Q_v R_v``.
    The difference is ``U Vᵀ``, so its norm is ``‖R_u R_vᵀ‖``; the target ``−B_cat A_cat`` is
    the last ``k`` columns of each, so its norm is ``‖R_u[:, r:] R_v[:, r:]ᵀ‖`` (no second QR).
    """
    r_u = torch.linalg.qr(torch.cat([b_soup.double(), -stack.scaled_B().double()], dim=1), mode="r").R
    r_v = torch.linalg.qr(torch.cat([a_soup.double(), stack.A.double()], dim=0).T, mode="r").R
    difference = float(torch.linalg.matrix_norm(r_u @ r_v.T))
    target = float(torch.linalg.matrix_norm(r_u[:, rank:] @ r_v[:, rank:].T))
    return difference, target


def _sketched_norms(b_soup: torch.Tensor, a_soup: torch.Tensor, pairs: Sequence[LoraPair], omega: Sequence[float],
                    dtype: torch.dtype, probes: int, seed: int) -> tuple[float, float]:
    """``(‖(P − Q) G‖_F, ‖Q G‖_F)`` for ``probes`` seeded Gaussian columns ``G``, in ``dtype``."""
    generator = torch.Generator().manual_seed(int(seed))
    probe = torch.randn(a_soup.shape[1], probes, generator=generator, dtype=dtype)
    q_sketch = torch.zeros(b_soup.shape[0], probes, dtype=dtype)
    for pair, w in zip(pairs, omega):
        q_sketch.addmm_(pair.B.to(dtype), pair.A.to(dtype) @ probe, alpha=w * pair.scale)
    p_sketch = b_soup.to(dtype) @ (a_soup.to(dtype) @ probe)
    difference = float(torch.linalg.matrix_norm((p_sketch - q_sketch).double()))
    return difference, float(torch.linalg.matrix_norm(q_sketch.double()))


def factor_product_errors(adapters: Sequence[Adapter], omega: Sequence[float],
                          stacks: dict[str, Stack] | None = None) -> dict[str, float | None]:
    """``e_m`` per module of ``adapters`` (:func:`factor_product_error`, exact), by module path.

    ``stacks``: the modules' :func:`stacked` factors where the caller already built them.
    """
    stacks = stacks or {}
    return {path: factor_product_error([a.pairs[path] for a in adapters], omega, stack=stacks.get(path))
            for path in adapters[0].pairs}
