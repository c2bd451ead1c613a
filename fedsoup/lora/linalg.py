"""Low-rank linear algebra on products held as factors, never formed densely when not needed.

A soup of LoRA updates ``Σ_i ω_i s_i B_i A_i`` is itself a product ``B_cat A_cat`` of rank
``k = Σ r_i`` (``B_cat = [ω_1 s_1 B_1, …, ω_N s_N B_N]``, ``A_cat = [A_1; …; A_N]``), so its
norm and its SVD come from the factors: with ``B_cat = Q_B R_B`` and ``A_catᵀ = Q_A R_A``
(thin QR),

    B_cat A_cat = Q_B (R_B R_Aᵀ) Q_Aᵀ,   and   R_B R_Aᵀ = U S Vᵀ  (a k × k SVD)

gives the exact thin SVD ``(Q_B U) S (Q_A V)ᵀ`` in ``O((d_out + d_in) k² + k³)``, and
``‖B_cat A_cat‖_F = ‖R_B R_Aᵀ‖_F``. Truncating it to ``t`` singular values is the best
rank-``t`` approximation in Frobenius norm (Eckart–Young). A dense ``ΔW`` (AME over
products) takes a seeded randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4)
instead.
"""

from __future__ import annotations

import torch

__all__ = ["factored_norm", "factored_svd", "randomized_svd", "balanced_factors", "captured_energy"]


def factored_norm(U: torch.Tensor, V: torch.Tensor) -> float:
    """``‖U Vᵀ‖_F`` for ``U`` (m × k) and ``V`` (n × k), in float64, without forming ``U Vᵀ``."""
    U, V = U.double(), V.double()
    if U.shape[1] == 0:
        return 0.0
    r_u = torch.linalg.qr(U, mode="r").R
    r_v = torch.linalg.qr(V, mode="r").R
    return float(torch.linalg.matrix_norm(r_u @ r_v.T))


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact thin SVD of ``B @ A`` (``B``: (m, k), ``A``: (k, n)) from the factors, in float64.

    Returns ``U`` (m, p), ``S`` (p,), ``Vh`` (p, n) with ``B @ A = U diag(S) Vh`` and
    ``p = min(m, n, k)``, singular values descending.
    """
    B, A = B.double(), A.double()
    q_b, r_b = torch.linalg.qr(B)  # (m, min(m,k)), (min(m,k), k)
    q_a, r_a = torch.linalg.qr(A.T)  # (n, min(n,k)), (min(n,k), k)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


def randomized_svd(M: torch.Tensor, rank: int, *, seed: int, oversample: int = 8,
                   power_iterations: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triplets of a dense ``M``, by a seeded randomized range finder.

    Halko et al. (2011), Alg. 4.4: ``Y = (M Mᵀ)^q M Ω`` with a Gaussian ``Ω`` of
    ``rank + oversample`` columns drawn from ``torch.Generator().manual_seed(seed)``,
    re-orthonormalised between products; then the SVD of ``Qᵀ M``. When ``rank +
    oversample`` reaches ``min(M.shape)`` the exact SVD is taken instead (same result,
    cheaper). Computed in float64; same ``seed``, same bytes.
    """
    M = M.double()
    smallest = min(M.shape)
    width = rank + oversample
    if width >= smallest:
        u, s, vh = torch.linalg.svd(M, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    generator = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(M.shape[1], width, generator=generator, dtype=torch.float64)
    q = torch.linalg.qr(M @ omega).Q
    for _ in range(power_iterations):
        q = torch.linalg.qr(M.T @ q).Q
        q = torch.linalg.qr(M @ q).Q
    u, s, vh = torch.linalg.svd(q.T @ M, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vh[:rank]


def balanced_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                     rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A) = (U_t √S_t, √S_t Vh_t)`` for the leading ``t = rank`` triplets: ``B A = U_t S_t Vh_t``.

    The singular values are split evenly, so ``B`` and ``A`` have equal norms (as LoRA
    initialisations from an SVD, PiSSA and PEFT's ``svd`` combination, also split them).
    """
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def captured_energy(S: torch.Tensor, rank: int, total: float | None = None) -> float:
    """``Σ_{j≤t} S_j² / ‖M‖_F²``: the share of the squared norm kept by a rank-``t`` truncation.

    ``total`` is ``‖M‖_F²`` when ``S`` holds only the leading values (randomized SVD); ``1.0``
    for a zero matrix (nothing is lost).
    """
    squares = S.double() ** 2
    whole = float(squares.sum()) if total is None else float(total)
    if whole == 0.0:
        return 1.0
    return min(1.0, float(squares[:rank].sum()) / whole)
