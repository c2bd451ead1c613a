"""Reporting a language-model comparison (``task = "lm"``): perplexity tables, the LoRA figures, plots.

The metric is held-out perplexity (lower is better): per client, the mean over clients and
the worst client. FedSoup's rounds also carry the factor/product error of the merged
replies and the bytes sent and received (``clients-fedsoup-*`` in the rows, every one in
``results.csv``); the tables summarise them.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsoup.report import counted
from simulations.compare.run import Comparison, StrategyRun
from simulations.config import SimConfig
from simulations.figures import save_png
from simulations.stats import PairedDifference, Spread

__all__ = ["is_lm", "describe_lm", "lm_table", "lora_rounds_table", "lm_seeds_table", "plot_perplexity",
           "plot_perplexity_seeds", "seeds_summary"]

PPL, WORST = "test-perplexity", "test-perplexity-worst"
ERROR = "clients-fedsoup-lora-factor-product-error-mean"
SENT, RECEIVED = "clients-fedsoup-bytes-sent", "clients-fedsoup-bytes-received"


def is_lm(runs: Sequence[StrategyRun]) -> bool:
    return bool(runs) and bool(runs[0].rows) and PPL in runs[0].rows[0]


def describe_lm(cfg: SimConfig, corpus: dict[str, str] | None = None) -> str:
    from simulations.lm_corpus import CLIENT_GROUPS

    text = (f"stdlib LM, {counted(cfg.num_partitions, 'client')} ({', '.join(CLIENT_GROUPS[:cfg.num_partitions])}), "
            f"byte-level Llama {cfg.lm_layers}×{cfg.lm_hidden} (base: {cfg.lm_base_steps} steps on the public group), "
            f"LoRA r={cfg.lora_r} α={cfg.lora_alpha:g}, {counted(cfg.lm_local_steps, 'local AdamW step')} lr {cfg.lr:g}, "
            f"{counted(cfg.num_server_rounds, 'round')}")
    if corpus:
        text += f", Python {corpus['python']}, corpus sha256 {corpus['corpus-sha256'][:12]}"
    return text + f", seed {cfg.seed}"


def _groups(rows: Sequence[dict[str, Any]]) -> list[str]:
    prefix = PPL + "-"
    return [k[len(prefix):] for k in rows[0] if k.startswith(prefix) and k != WORST]


def _mean_over_rounds(rows: Sequence[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else math.nan


def _total(rows: Sequence[dict[str, Any]], key: str) -> float:
    return float(sum(r.get(key, 0) for r in rows))


def lm_table(comparison: Comparison) -> str:
    """Final perplexity per strategy (mean, worst, per client), base perplexity, the LoRA figures, time."""
    runs = comparison.runs
    groups = _groups(runs[0].rows)
    lines = ["| strategy | mean ppl | worst ppl | " + " | ".join(groups)
             + " | factor/product error (mean over rounds) | MB sent + received | rounds (s) |",
             "|---|---:|---:|" + "---:|" * len(groups) + "---:|---:|---:|"]
    base = runs[0].rows[0]
    lines.append(f"| base (round 0) | {base[PPL]:.3f} | {base[WORST]:.3f} | "
                 + " | ".join(f"{base[f'{PPL}-{g}']:.3f}" for g in groups) + " | | | |")
    for run in runs:
        final = run.rows[-1]
        error = _mean_over_rounds(run.rows, ERROR)
        mb = (_total(run.rows, SENT) + _total(run.rows, RECEIVED)) / 1e6
        lines.append(f"| {run.label} | {final[PPL]:.3f} | {final[WORST]:.3f} | "
                     + " | ".join(f"{final[f'{PPL}-{g}']:.3f}" for g in groups)
                     + f" | {'' if math.isnan(error) else f'{error:.4f}'} | {f'{mb:.2f}' if mb else ''} "
                     f"| {run.seconds:.1f} |")
    lines.append("")
    lines.append(f"Set-up before the first strategy: {comparison.setup_seconds:.1f} s.")
    return "\n".join(lines) + "\n"


def lora_rounds_table(runs: Sequence[StrategyRun]) -> str:
    """Per round of every strategy that reports them: the factor/product error and the bytes."""
    lines = ["| strategy | round | factor/product error mean | max | SVD energy min | bytes sent | bytes received |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for row in run.rows:
            if ERROR not in row and SENT not in row:
                continue
            energy = row.get("clients-fedsoup-lora-svd-energy-min")
            lines.append(f"| {run.label} | {row['round']} | {row.get(ERROR, math.nan):.4f} | "
                         f"{row.get('clients-fedsoup-lora-factor-product-error-max', math.nan):.4f} | "
                         f"{'' if energy is None else f'{energy:.4f}'} | {int(row.get(SENT, 0))} | "
                         f"{int(row.get(RECEIVED, 0))} |")
    return "\n".join(lines) + "\n"


def _spread_or_none(values: Sequence[float]) -> dict[str, Any] | None:
    """:meth:`Spread.as_dict`, or ``None`` where a strategy does not report the figure (Flower's own)."""
    if not values or any(math.isnan(v) for v in values):
        return None
    return Spread.of(values).as_dict()


def seeds_summary(per_seed: Sequence[Sequence[StrategyRun]]) -> list[dict[str, Any]]:
    """Per strategy: final mean and worst perplexity over seeds (:class:`Spread`), the LoRA figures
    (``None`` for strategies that report none), and the seed-paired difference of the final mean and
    worst perplexity to the first strategy (95% t-interval; below 0 is better)."""
    out = []
    reference = [seed_runs[0] for seed_runs in per_seed]
    for i, run in enumerate(per_seed[0]):
        runs = [seed_runs[i] for seed_runs in per_seed]
        entry: dict[str, Any] = {
            "label": run.label,
            "perplexity": Spread.of([r.rows[-1][PPL] for r in runs]).as_dict(),
            "worst-perplexity": Spread.of([r.rows[-1][WORST] for r in runs]).as_dict(),
            "base-perplexity": Spread.of([r.rows[0][PPL] for r in runs]).as_dict(),
            "factor-product-error": _spread_or_none([_mean_over_rounds(r.rows, ERROR) for r in runs]),
            "bytes": _spread_or_none([_total(r.rows, SENT) + _total(r.rows, RECEIVED) or math.nan for r in runs]),
            "seconds": _spread_or_none([r.seconds for r in runs]),
        }
        if i:
            entry[f"perplexity-minus-{per_seed[0][0].label}"] = _paired(runs, reference, PPL).as_dict()
            entry[f"worst-perplexity-minus-{per_seed[0][0].label}"] = _paired(runs, reference, WORST).as_dict()
        out.append(entry)
    return out


def _paired(runs: Sequence[StrategyRun], reference: Sequence[StrategyRun], key: str) -> PairedDifference:
    return PairedDifference.of([r.rows[-1][key] for r in runs], [r.rows[-1][key] for r in reference])


def lm_seeds_table(per_seed: Sequence[Sequence[StrategyRun]], seeds: Sequence[int]) -> str:
    """Final perplexity, mean ± std over seeds (the error bars), and each seed's."""
    lines = ["| strategy | mean ppl, mean ± std | worst ppl, mean ± std | factor/product error | "
             + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(seeds)]
    base = Spread.of([runs[0].rows[0][PPL] for runs in per_seed])
    base_worst = Spread.of([runs[0].rows[0][WORST] for runs in per_seed])
    lines.append(f"| base (round 0) | {base.text('.3f')} | {base_worst.text('.3f')} | | "
                 + " | ".join(f"{v:.3f}" for v in base.values) + " |")
    for i, run in enumerate(per_seed[0]):
        runs = [seed_runs[i] for seed_runs in per_seed]
        ppl = Spread.of([r.rows[-1][PPL] for r in runs])
        worst = Spread.of([r.rows[-1][WORST] for r in runs])
        errors = [_mean_over_rounds(r.rows, ERROR) for r in runs]
        error = "" if any(math.isnan(e) for e in errors) else Spread.of(errors).text(".4f")
        lines.append(f"| {run.label} | {ppl.text('.3f')} | {worst.text('.3f')} | {error} | "
                     + " | ".join(f"{v:.3f}" for v in ppl.values) + " |")
    if len(per_seed) > 1 and len(per_seed[0]) > 1:
        first = per_seed[0][0].label
        reference = [seed_runs[0] for seed_runs in per_seed]
        lines += ["", f"Paired by seed, final perplexity minus {first}'s (95% t-interval; below 0 is better; "
                      "better/tie/worse seeds):", "",
                  "| strategy | mean ppl | worst ppl |", "|---|---:|---:|"]
        for i, run in enumerate(per_seed[0][1:], start=1):
            runs = [seed_runs[i] for seed_runs in per_seed]
            cells = []
            for key in (PPL, WORST):
                d = _paired(runs, reference, key)
                cells.append(f"{d.text(1.0, '')} ({d.losses}/{d.ties}/{d.wins})")
            lines.append(f"| {run.label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def plot_perplexity(path: Path, runs: Sequence[StrategyRun], title: str) -> None:
    """Mean (solid) and worst-client (dashed) held-out perplexity per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for run in runs:
        rounds = [r["round"] for r in run.rows]
        (line,) = ax.plot(rounds, [r[PPL] for r in run.rows], marker="o", markersize=3, label=run.label)
        ax.plot(rounds, [r[WORST] for r in run.rows], linestyle="--", color=line.get_color(), alpha=0.6)
    _finish(ax, title, "held-out perplexity (solid: mean, dashed: worst client)")
    save_png(fig, path)


def plot_perplexity_seeds(path: Path, per_seed: Sequence[Sequence[StrategyRun]], title: str) -> None:
    """Mean perplexity per round, mean over seeds with ± one standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, run in enumerate(per_seed[0]):
        curves = [seed_runs[i].rows for seed_runs in per_seed]
        rounds = [r["round"] for r in curves[0]]
        spreads = [Spread.of([rows[j][PPL] for rows in curves]) for j in range(len(rounds))]
        ax.errorbar(rounds, [s.mean for s in spreads], yerr=[0.0 if math.isnan(s.std) else s.std for s in spreads],
                    marker="o", markersize=3, capsize=3, label=run.label)
    _finish(ax, title, "mean held-out perplexity (± std over seeds)")
    save_png(fig, path)


def _finish(ax, title: str, ylabel: str) -> None:
    ax.set_xlabel("server round")
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
