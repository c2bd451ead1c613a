"""The factor/product error of averaging LoRA factors (docs/design.md §2.6), measured on every merge:

    e_m = ‖s·soup(B)·soup(A) − soup(s·B·A)‖_F / ‖soup(s·B·A)‖_F

per module, with the weighted soup as ``soup`` whatever the mode and optimizer, and the
stacked factors ``(B_cat, A_cat)`` whose product is the exact soup of products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedsoup.inputs import compute_dtype
from fedsoup.lora.pairs import Adapter

__all__ = ["factor_product_errors", "stacked"]


def stacked(adapters: Sequence[Adapter], omega: Sequence[float], path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_cat, A_cat)`` with ``B_cat A_cat = Σ_i ω_i s_i B_i A_i`` (compute dtype)."""
    dtype = compute_dtype([t for a in adapters for t in (a.pairs[path].A, a.pairs[path].B)])
    b_cat = torch.cat([a.pairs[path].B.to(dtype) * (w * a.pairs[path].scale) for a, w in zip(adapters, omega)], dim=1)
    a_cat = torch.cat([a.pairs[path].A.to(dtype) for a in adapters], dim=0)
    return b_cat, a_cat


def factor_product_errors(adapters: Sequence[Adapter], omega: Sequence[float]) -> dict[str, float | None]:
    """``e_m = ‖s·soup(B)·soup(A) − soup(s·B·A)‖ / ‖soup(s·B·A)‖`` per module, from the factors.

    ``soup(B) = Σ ω_i (s_i/s) B_i`` (scales folded, as the ``factors`` mode writes them),
    ``soup(A) = Σ ω_i A_i``; both products are held as factors, so the difference is
    ``[s·soup(B), −B_cat] [soup(A); A_cat]``, and both norms come from one thin QR per side
    (float64). ``None`` where the adapters' ranks differ (no soup of factors exists);
    ``0.0`` where the soup of products is zero and so is the product of soups.
    """
    errors: dict[str, float | None] = {}
    template = adapters[0]
    for path, first in template.pairs.items():
        if any(a.pairs[path].rank != first.rank for a in adapters):
            errors[path] = None
            continue
        b_cat, a_cat = stacked(adapters, omega, path)
        b_soup = sum(w * a.pairs[path].scale * a.pairs[path].B.double() for a, w in zip(adapters, omega))
        a_soup = sum(w * a.pairs[path].A.double() for a, w in zip(adapters, omega))
        # One thin QR per side: U = [s·soup(B), −B_cat] = Q_u R_u, V = [soup(A); A_cat]ᵀ = Q_v R_v.
        # The difference is U Vᵀ, so its norm is ‖R_u R_vᵀ‖; the target −B_cat A_cat is the
        # last k columns of each, so its norm is ‖R_u[:, r:] R_v[:, r:]ᵀ‖ (no second QR).
        r_u = torch.linalg.qr(torch.cat([b_soup, -b_cat.double()], dim=1), mode="r").R
        r_v = torch.linalg.qr(torch.cat([a_soup, a_cat.double()], dim=0).T, mode="r").R
        difference = float(torch.linalg.matrix_norm(r_u @ r_v.T))
        target = float(torch.linalg.matrix_norm(r_u[:, first.rank:] @ r_v[:, first.rank:].T))
        errors[path] = (0.0 if difference == 0.0 else math.inf) if target == 0.0 else difference / target
    return errors
