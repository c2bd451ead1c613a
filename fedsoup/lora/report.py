"""What an adapter merge returns: the merged adapter (:class:`AdapterMerge`) and what it did
and cost per module (:class:`LoraReport`, docs/design.md §2.6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["AdapterMerge", "LoraReport"]


@dataclass(frozen=True)
class LoraReport:
    """What an adapter merge did and what it cost, per module (keyed by module path).

    ``errors``: the factor/product error ``e_m`` (``None`` where ranks differ);
    ``energies``: the captured energy of the SVD taken per module (empty without one);
    ``how``: ``"factors"``, ``"cat"``, ``"svd"`` or ``"base"``; ``rank``: the target rank
    asked for (``None``: the mode's own); ``ranks``: the rank of each module written;
    ``config``: the written adapter's ``adapter_config.json`` as a dict.
    """

    mode: str
    how: str
    rank: int | None
    errors: Mapping[str, float | None]
    energies: Mapping[str, float] = field(default_factory=dict)
    ranks: Mapping[str, int] = field(default_factory=dict)
    config: Mapping[str, Any] | None = None  # the merged adapter's adapter_config.json (None: into a base)

    @property
    def max_error(self) -> float | None:
        values = [e for e in self.errors.values() if e is not None]
        return max(values) if values else None

    @property
    def mean_error(self) -> float | None:
        values = [e for e in self.errors.values() if e is not None]
        return sum(values) / len(values) if values else None

    @property
    def min_energy(self) -> float | None:
        return min(self.energies.values()) if self.energies else None

    @property
    def mean_energy(self) -> float | None:
        return sum(self.energies.values()) / len(self.energies) if self.energies else None

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (file metadata, the command line's report)."""
        ranks = sorted(set(self.ranks.values()))
        return {
            "lora_mode": self.mode, "lora_written_as": self.how, "lora_rank": ranks[0] if len(ranks) == 1 else ranks,
            "factor_product_error_max": self.max_error, "factor_product_error_mean": self.mean_error,
            "svd_energy_min": self.min_energy, "svd_energy_mean": self.mean_energy,
        }

    def summary(self) -> str:
        """One line: ``lora products (svd, rank 16): factor/product error max 0.83 mean 0.81; SVD energy min 0.41``."""
        ranks = sorted(set(self.ranks.values()))
        rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        text = f"lora {self.mode} ({self.how}, {rank}): factor/product error "
        text += ("undefined (ranks differ)" if self.max_error is None
                 else f"max {self.max_error:.3g} mean {self.mean_error:.3g}")
        if self.energies:
            text += f"; SVD energy min {self.min_energy:.4g} mean {self.mean_energy:.4g}"
        return text


@dataclass(frozen=True)
class AdapterMerge:
    """A merged adapter: ``state_dict`` under PEFT's key names, its ``config``, and the report."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    report: LoraReport
