"""Sweeps: the comparison repeated per value of one shared key, over seeds; tables, JSON and a plot."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsoup.atomic import atomic_write_text
from simulations.compare.run import StrategyRun
from simulations.figures import save_png
from simulations.stats import PairedDifference, Spread

__all__ = ["SweepPoint", "parse_sweep", "sweep_pairs", "sweep_table", "pairs_table", "plot_sweep",
           "write_sweep_outputs"]


def parse_sweep(text: str) -> tuple[str, tuple[str, ...]]:
    """``"ood-fraction=0.5,0.7"`` -> ``("ood-fraction", ("0.5", "0.7"))``."""
    key, sep, values = text.partition("=")
    items = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not key.strip() or not items:
        raise ValueError(f"--sweep: expected KEY=V1,V2,..., got '{text}'")
    for item in items:
        try:
            float(item)
        except ValueError:
            raise ValueError(f"--sweep: values are plotted on an axis and must be numbers, got '{item}'") from None
    return key.strip(), items


@dataclass
class SweepPoint:
    """One swept value and the comparison's runs for every seed."""

    value: float
    per_seed: list[list[StrategyRun]]

    def finals(self, label: str) -> list[float]:
        """Final test accuracy of strategy ``label``, one per seed."""
        return [next(r for r in runs if r.label == label).rows[-1]["test-accuracy"] for runs in self.per_seed]


def sweep_pairs(pairs: Sequence[tuple[str, str]] | None, labels: Sequence[str]) -> list[tuple[str, str]]:
    """The preset's (strategy, reference) pairs when all are run; else every strategy against the first."""
    if pairs and all(a in labels and b in labels for a, b in pairs):
        return [tuple(p) for p in pairs]
    return [(label, labels[0]) for label in labels[1:]]


def sweep_table(key: str, points: Sequence[SweepPoint], labels: Sequence[str]) -> str:
    """Final test accuracy, mean ± std over seeds: one row per strategy, one column per swept value."""
    lines = ["| strategy | " + " | ".join(f"{key} {p.value:g}" for p in points) + " |",
             "|---|" + "---:|" * len(points)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(Spread.of(p.finals(label)).text(".4f") for p in points) + " |")
    return "\n".join(lines) + "\n"


def pairs_table(key: str, points: Sequence[SweepPoint], pairs: Sequence[tuple[str, str]]) -> str:
    """Paired (by seed) differences in final test accuracy, in points, with 95% t-intervals."""
    lines = [f"| {key} | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
             "|---|" + "---:|" * len(pairs)]
    for p in points:
        cells = []
        for a, b in pairs:
            d = PairedDifference.of(p.finals(a), p.finals(b))
            cells.append(f"{d.text()} ({d.wins}/{d.ties}/{d.losses})")
        lines.append(f"| {p.value:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(path: Path, key: str, points: Sequence[SweepPoint], labels: Sequence[str],
               pairs: Sequence[tuple[str, str]], title: str) -> None:
    """Left: final test accuracy against the swept value (mean ± std over seeds).
    Right: the paired differences with their 95% t-intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p.value for p in points]
    step = min(b - a for a, b in zip(x, x[1:])) if len(x) > 1 else 1.0
    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(10.0, 3.8), dpi=90)
    for i, label in enumerate(labels):
        spreads = [Spread.of(p.finals(label)) for p in points]
        shift = (i - (len(labels) - 1) / 2) * 0.06 * step  # keep the error bars apart
        ax.errorbar([v + shift for v in x], [s.mean for s in spreads],
                    yerr=[0.0 if np.isnan(s.std) else s.std for s in spreads],
                    marker="o", markersize=3, capsize=2, label=label)
    ax.set_xlabel(key)
    ax.set_ylabel("final test accuracy (mean ± std)")
    ax.set_title(textwrap.fill(title, 70), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax_d.axhline(0.0, color="grey", lw=0.8)
    for i, (a, b) in enumerate(pairs):
        diffs = [PairedDifference.of(p.finals(a), p.finals(b)) for p in points]
        shift = (i - (len(pairs) - 1) / 2) * 0.08 * step
        ax_d.errorbar([v + shift for v in x], [100 * d.mean for d in diffs],
                      yerr=[0.0 if np.isnan(d.low) else 100 * (d.high - d.mean) for d in diffs],
                      fmt="o", capsize=3, label=f"{a} − {b}")
    ax_d.set_xlabel(key)
    ax_d.set_ylabel("difference (points), 95% t-interval")
    ax_d.set_title("paired by seed", fontsize=8)
    ax_d.grid(alpha=0.3)
    ax_d.legend(fontsize=6.5)
    save_png(fig, path)


def write_sweep_outputs(out: Path, key: str, points: Sequence[SweepPoint], labels: Sequence[str],
                        pairs: Sequence[tuple[str, str]], setting: str) -> str:
    """``sweep.md`` (both tables), ``sweep.json`` (every final accuracy and difference), ``sweep.png``."""
    acc, diff = sweep_table(key, points, labels), pairs_table(key, points, pairs)
    text = (f"Final test accuracy, mean ± std over seeds:\n\n{acc}\n"
            f"Paired differences in points, mean [95% t-interval] (better/tie/worse seeds):\n\n{diff}")
    atomic_write_text(out / "sweep.md", f"{setting}\n\n{text}")
    atomic_write_text(out / "sweep.json", json.dumps({
        "setting": setting, "key": key,
        "points": [{"value": p.value,
                    "final-test-accuracy": {label: Spread.of(p.finals(label)).as_dict() for label in labels},
                    "differences": [{"strategy": a, "reference": b,
                                     **PairedDifference.of(p.finals(a), p.finals(b)).as_dict()}
                                    for a, b in pairs]}
                   for p in points],
    }, indent=2))
    plot_sweep(out / "sweep.png", key, points, labels, pairs, setting)
    return text
