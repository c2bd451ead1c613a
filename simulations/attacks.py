"""Byzantine clients for robustness experiments.

A fraction of the clients replaces its honest update ``Δ = local - global`` by:

- ``sign-flip``: ``global - s·Δ`` (pushes the model the wrong way, ``s = attack-scale``);
- ``scale``: ``global + s·Δ`` (a boosted update, as in model replacement);
- ``gaussian-noise``: ``local + s·σ·N(0, 1)`` per tensor, ``σ`` the tensor's update RMS;
- ``cauchy-noise``: as above with standard Cauchy noise - the heavy tails under which
  the paper (Section 3.1, Appendix F) expects adaptive AME to beat the mean;
- ``nan``: every float tensor NaN (a broken or hostile node; FedSoup leaves such a
  reply out of the round).

Which clients attack is a pure function of (seed, number of clients, fraction),
so the server (e.g. Krum's ``num_malicious_nodes``) and every client agree.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ATTACKS = ("none", "sign-flip", "scale", "gaussian-noise", "cauchy-noise", "nan")


def malicious_partitions(num_partitions: int, fraction: float, seed: int) -> frozenset[int]:
    """The ``floor(fraction · N)`` partition ids that attack, drawn with ``seed``."""
    count = int(math.floor(fraction * num_partitions + 1e-9))
    rng = np.random.default_rng(seed)
    return frozenset(int(p) for p in rng.permutation(num_partitions)[:count])


def attack_update(
    local: dict[str, torch.Tensor],
    global_: dict[str, torch.Tensor],
    kind: str,
    scale: float,
    seed: int,
) -> dict[str, torch.Tensor]:
    """The malicious replacement for ``local``; non-float tensors are left alone."""
    if kind == "none":
        return local
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack '{kind}'; choose one of {', '.join(ATTACKS)}")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in local.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        delta = value - global_[key]
        if kind == "nan":
            out[key] = torch.full_like(value, float("nan"))
        elif kind == "sign-flip":
            out[key] = global_[key] - scale * delta
        elif kind == "scale":
            out[key] = global_[key] + scale * delta
        else:
            rms = delta.pow(2).mean().sqrt().clamp_min(1e-8)
            if kind == "gaussian-noise":
                noise = torch.randn(value.shape, generator=gen, dtype=value.dtype)
            else:
                # inverse-CDF sampling: tan(pi (U - 1/2)) is standard Cauchy
                noise = torch.tan(math.pi * (torch.rand(value.shape, generator=gen, dtype=value.dtype) - 0.5))
            out[key] = value + scale * rms * noise
    return out
