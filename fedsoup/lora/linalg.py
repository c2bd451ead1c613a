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

A soup that is never formed densely (the federated ``products`` round,
``strategies.products``) takes :func:`factored_truncated_svd`: the same range finder applied
to ``B diag(c) A`` through its factors, power iterations run until the captured energy
stops growing (a tolerance), and the energy outside the subspace estimated from a second
sketch. (The factor/product error, exact or estimated from probes the same way, is
:mod:`fedsoup.lora.measure`'s.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "factored_norm", "factored_svd", "randomized_svd", "balanced_factors", "captured_energy",
    "TruncatedSVD", "factored_truncated_svd",
]


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


def factored_randomized_svd(B: torch.Tensor, A: torch.Tensor, rank: int, *, seed: int, oversample: int = 8,
                            power_iterations: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triplets of ``B @ A`` by a seeded randomized range finder that
    never forms ``B @ A``: every product with it is taken through the factors, ``B (A X)`` and
    ``Aᵀ (Bᵀ Y)``, at ``O((m + n) k (rank + oversample))`` per product for ``k`` = ``B``'s
    columns (``Σ r_i`` for a soup of adapters), against ``O((m + n) k²)`` for the exact
    :func:`factored_svd`: the choice when ``k`` is large (many clients) and ``rank`` small.
    Same algorithm and seeding as :func:`randomized_svd`; falls back to the exact SVD when
    ``rank + oversample`` reaches ``min(m, n, k)``. Float64. As close to the exact truncation
    as the spectrum's gap after ``rank`` allows (to 1e-6 with a clear gap, tested; within
    about 1% on a flat spectrum, where no rank-``rank`` truncation is good anyway).
    """
    B, A = B.double(), A.double()
    width = rank + oversample
    if width >= min(B.shape[0], A.shape[1], B.shape[1]):
        u, s, vh = factored_svd(B, A)
        return u[:, :rank], s[:rank], vh[:rank]
    generator = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(A.shape[1], width, generator=generator, dtype=torch.float64)
    q = torch.linalg.qr(B @ (A @ omega)).Q
    for _ in range(power_iterations):
        q = torch.linalg.qr(A.T @ (B.T @ q)).Q
        q = torch.linalg.qr(B @ (A @ q)).Q
    u, s, vh = torch.linalg.svd((q.T @ B) @ A, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vh[:rank]


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


@dataclass(frozen=True)
class TruncatedSVD:
    """The leading ``t`` singular triplets of a product: ``U`` (m, t), ``S`` (t,), ``Vh`` (t, n).

    ``energy``: ``Σ_{j≤t} σ_j² / ‖M‖_F²`` (1.0 for a zero ``M``), exact when ``exact``, else
    with ``‖M‖_F²`` estimated (:func:`factored_truncated_svd`); ``iterations``: the power
    iterations taken (0 on the exact path).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    energy: float
    exact: bool
    iterations: int


def _apply(B: torch.Tensor, c: torch.Tensor, A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``B diag(c) A X`` right to left: two thin products, never the (m, n) matrix."""
    return B @ (c[:, None] * (A @ X))


def _apply_t(B: torch.Tensor, c: torch.Tensor, A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``(B diag(c) A)ᵀ X`` right to left."""
    return A.T @ (c[:, None] * (B.T @ X))


def factored_truncated_svd(B: torch.Tensor, A: torch.Tensor, rank: int, *, scale: torch.Tensor | None = None,
                           seed: int, tolerance: float = 1e-3, oversample: int = 8, max_iterations: int = 8,
                           probes: int = 16) -> TruncatedSVD:
    """The best rank-``rank`` approximation of ``M = B diag(scale) A`` without forming ``M``.

    ``B``: (m, k), ``A``: (k, n), ``scale``: (k,) (``None``: ones), e.g. ``B_cat``,
    ``A_cat`` and ``ω_i s_i`` repeated ``r_i`` times for a soup of LoRA updates.

    - Small ``k`` (``k ≤ 2(rank + oversample)``, or ``rank + oversample ≥ min(m, n, k)``):
      the exact thin SVD from the factors (:func:`factored_svd`), exact energy.
    - Otherwise Halko, Martinsson & Tropp (2011) Alg. 4.4 with every product taken
      through the factors (``M X = B (c ∘ (A X))``, cost ``O((m + n) k ℓ)`` per product,
      ``ℓ = rank + oversample``, Gaussian test matrix from ``torch.Generator().manual_seed(seed)``).
      After each power iteration the singular values of ``Qᵀ M`` (those of the next
      ``Mᵀ Q``, so the check is free) give the captured ``Σ_{j≤t} σ_j²``; iterations stop
      when it grew by at most ``tolerance`` (relative), or after ``max_iterations``. The
      energy's denominator ``‖M‖_F² = ‖Qᵀ M‖_F² + ‖(I − QQᵀ) M‖_F²`` takes the first term
      exactly and the residual from ``probes`` fresh Gaussian probes (Hutchinson:
      ``E‖(I − QQᵀ) M G‖_F² = probes · ‖(I − QQᵀ) M‖_F²``), so the estimate errs only on
      what the subspace missed.

    Computed in float32 (float64 when an input is float64); same inputs and ``seed``,
    same bytes.
    """
    dtype = torch.float64 if torch.float64 in (B.dtype, A.dtype) else torch.float32
    B, A = B.to(dtype), A.to(dtype)
    c = torch.ones(A.shape[0], dtype=dtype) if scale is None else scale.to(dtype)
    m, k, n = B.shape[0], A.shape[0], A.shape[1]
    width = rank + oversample
    if k <= 2 * width or width >= min(m, n, k):
        u, s, vh = factored_svd(B * c, A)
        kept = min(rank, s.numel())
        return TruncatedSVD(u[:, :kept].to(dtype), s[:kept].to(dtype), vh[:kept].to(dtype),
                            captured_energy(s, kept), True, 0)
    generator = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(n, width, generator=generator, dtype=dtype)
    q = torch.linalg.qr(_apply(B, c, A, omega)).Q
    iterations, previous = 0, None
    while True:
        w = _apply_t(B, c, A, q)  # (n, ℓ) = Mᵀ Q: its singular values are those of Qᵀ M
        u_w, s, vh_w = torch.linalg.svd(w, full_matrices=False)
        captured = float(s[:rank].double().square().sum())
        converged = previous is not None and captured - previous <= tolerance * captured
        if converged or iterations >= max_iterations:
            break
        previous = captured
        q = torch.linalg.qr(_apply(B, c, A, torch.linalg.qr(w).Q)).Q
        iterations += 1
    # Qᵀ M = wᵀ = vh_wᵀ diag(s) u_wᵀ, so M ≈ (Q vh_wᵀ) diag(s) u_wᵀ.
    U, S, Vh = q @ vh_w[:rank].T, s[:rank], u_w[:, :rank].T
    probe = torch.randn(n, probes, generator=generator, dtype=dtype)
    sketch = _apply(B, c, A, probe)
    residual = float((sketch - q @ (q.T @ sketch)).double().square().sum()) / probes
    total = float(s.double().square().sum()) + residual
    return TruncatedSVD(U, S, Vh, captured_energy(S, rank, total), False, iterations)
