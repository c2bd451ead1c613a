"""Summaries over seeds: mean ± standard deviation and paired differences with a t-interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (``n − 1`` denominator; NaN for one value) of ``values``."""

    mean: float
    std: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        values = tuple(float(v) for v in values)
        if not values:
            raise ValueError("no values to summarise")
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return cls(statistics.fmean(values), std, values)

    def text(self, fmt: str = ".2%") -> str:
        """``"88.44% ± 1.20%"``; just the mean when there is one value."""
        if math.isnan(self.std):
            return format(self.mean, fmt)
        return f"{format(self.mean, fmt)} ± {format(self.std, fmt)}"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": _json_number(self.std), "values": list(self.values)}


@dataclass(frozen=True)
class PairedDifference:
    """``a − b`` paired by seed: mean, std, a two-sided t-interval for the mean, and a tally.

    The interval is ``mean ± t_{(1+c)/2, n−1} · std / √n`` (Student's t over ``n`` seeds;
    NaN for one seed). ``wins``/``ties``/``losses`` count the seeds where ``a`` is
    above, equal to (within ``tie_tolerance``) or below ``b``.
    """

    mean: float
    std: float
    low: float
    high: float
    confidence: float
    wins: int
    ties: int
    losses: int
    values: tuple[float, ...]

    @classmethod
    def of(cls, a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95,
           tie_tolerance: float = 1e-9) -> PairedDifference:
        if len(a) != len(b):
            raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
        diffs = Spread.of([float(x) - float(y) for x, y in zip(a, b)])
        n = len(diffs.values)
        if n > 1:
            from scipy.stats import t  # scipy comes with scikit-learn

            half = float(t.ppf((1 + confidence) / 2, n - 1)) * diffs.std / math.sqrt(n)
        else:
            half = math.nan
        return cls(diffs.mean, diffs.std, diffs.mean - half, diffs.mean + half, confidence,
                   wins=sum(d > tie_tolerance for d in diffs.values),
                   ties=sum(abs(d) <= tie_tolerance for d in diffs.values),
                   losses=sum(d < -tie_tolerance for d in diffs.values),
                   values=diffs.values)

    def verdict(self) -> str:
        """``"gain"`` / ``"loss"`` when the interval excludes 0, else ``"tie"`` (within noise)."""
        if self.low > 0:
            return "gain"
        if self.high < 0:
            return "loss"
        return "tie"

    def text(self, scale: float = 100.0, unit: str = " pt") -> str:
        """``"+1.20 pt [−0.40, +2.80]"`` in percentage points by default."""
        if math.isnan(self.low):
            return f"{self.mean * scale:+.2f}{unit}"
        return f"{self.mean * scale:+.2f}{unit} [{self.low * scale:+.2f}, {self.high * scale:+.2f}]"

    def as_dict(self) -> dict:
        out = {k: _json_number(v) if isinstance(v, float) else v for k, v in asdict(self).items()}
        out["values"] = list(self.values)
        out["verdict"] = self.verdict()
        return out


def _json_number(value: float) -> float | None:
    """NaN (undefined for one seed) as ``None``: strict JSON has no NaN."""
    return None if math.isnan(value) else value
