"""Reporting a comparison: the markdown tables, ``results.json``, ``results.csv`` and ``accuracy.png``."""

from __future__ import annotations

import csv
import io
import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsoup.atomic import atomic_write_text
from fedsoup.report import counted
from simulations.compare.run import Comparison, StrategyRun
from simulations.config import SimConfig
from simulations.figures import save_png
from simulations.stats import Spread

__all__ = ["markdown_table", "seeds_table", "write_csv", "plot_accuracy", "describe", "write_outputs"]


def markdown_table(comparison: Comparison) -> str:
    """Final and best test accuracy per strategy; wall time of its rounds, the shared set-up below."""
    lines = [
        "| strategy | final test acc | best test acc (round) | final test loss | rounds (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in comparison.runs:
        final = run.rows[-1]
        best = max(run.rows, key=lambda r: r["test-accuracy"])
        lines.append(
            f"| {run.label} | {final['test-accuracy']:.4f} | {best['test-accuracy']:.4f} "
            f"({best['round']}) | {final['test-loss']:.4f} | {run.seconds:.1f} |"
        )
    lines.append("")
    lines.append(f"Set-up before the first strategy (simulation start, clients loading their shards, "
                 f"kernel compilation): {comparison.setup_seconds:.1f} s.")
    return "\n".join(lines) + "\n"


def seeds_table(per_seed: Sequence[Sequence[StrategyRun]], seeds: Sequence[int]) -> str:
    """Final test accuracy per strategy: mean and standard deviation over seeds, and each seed."""
    lines = ["| strategy | final test acc, mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---:|" + "---:|" * len(seeds)]
    for i, run in enumerate(per_seed[0]):
        finals = [runs[i].rows[-1]["test-accuracy"] for runs in per_seed]
        lines.append(f"| {run.label} | {Spread.of(finals).text('.4f')} | "
                     + " | ".join(f"{f:.4f}" for f in finals) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, runs: Sequence[StrategyRun]) -> None:
    keys: list[str] = []
    for run in runs:
        for row in run.rows:
            keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["strategy", *keys])
    writer.writeheader()
    for run in runs:
        for row in run.rows:
            writer.writerow({"strategy": run.label, **row})
    atomic_write_text(path, buf.getvalue())


def plot_accuracy(path: Path, runs: Sequence[StrategyRun], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for run in runs:
        ax.plot([r["round"] for r in run.rows], [r["test-accuracy"] for r in run.rows],
                marker="o", markersize=3, label=run.label)
    ax.set_xlabel("server round")
    ax.set_ylabel("test accuracy (centralised)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def describe(cfg: SimConfig) -> str:
    """The shared setting in one line, e.g. ``digits, 10 clients, class-exclusion 50% OOD, ...``."""
    if cfg.task == "lm":
        from simulations.compare.lm_report import describe_lm

        return describe_lm(cfg)
    part = cfg.partitioning
    if part == "class-exclusion":
        part += f" {cfg.ood_fraction:.0%} OOD"
    elif part == "dirichlet":
        part += f" α={cfg.dirichlet_alpha}"
    text = (f"{cfg.dataset}, {counted(cfg.num_partitions, 'client')}, {part}, "
            f"{counted(cfg.local_epochs, 'local epoch')}, seed {cfg.seed}")
    if cfg.attack != "none" and cfg.attack_fraction > 0:
        text += f", {cfg.attack} x{cfg.attack_scale:g} from {cfg.attack_fraction:.0%} of clients"
    return text


def write_outputs(out: Path, base: Mapping[str, Any], comparison: Comparison) -> str:
    """``results.json``, ``results.csv``, ``accuracy.png`` and ``table.md`` in ``out``; returns the table."""
    cfg = SimConfig.from_run_config(base)
    runs = comparison.runs
    if cfg.task == "lm":
        return _write_lm_outputs(out, cfg, comparison)
    table = markdown_table(comparison)
    atomic_write_text(out / "results.json", json.dumps({
        "setting": describe(cfg),
        "base-config": cfg.to_run_config(),
        "setup-seconds": comparison.setup_seconds,
        "strategies": [{"label": r.label, "overrides": r.overrides, "seconds": r.seconds,
                        "rounds": r.rows} for r in runs],
    }, indent=2))
    write_csv(out / "results.csv", runs)
    plot_accuracy(out / "accuracy.png", runs, describe(cfg))
    atomic_write_text(out / "table.md", f"{describe(cfg)}\n\n{table}")
    return table


def _write_lm_outputs(out: Path, cfg: SimConfig, comparison: Comparison) -> str:
    """The language-model task's outputs: ``perplexity.png`` instead of ``accuracy.png``, the Python
    version and corpus hash in ``results.json``, and the per-round LoRA figures in ``table.md``."""
    from simulations.compare.lm_report import describe_lm, lm_table, lora_rounds_table, plot_perplexity
    from simulations.lm_corpus import corpus_identity

    runs = comparison.runs
    corpus = corpus_identity()
    setting = describe_lm(cfg, corpus)
    table = lm_table(comparison)
    atomic_write_text(out / "results.json", json.dumps({
        "setting": setting, "corpus": corpus, "base-config": cfg.to_run_config(),
        "setup-seconds": comparison.setup_seconds,
        "strategies": [{"label": r.label, "overrides": r.overrides, "seconds": r.seconds,
                        "rounds": r.rows} for r in runs],
    }, indent=2))
    write_csv(out / "results.csv", runs)
    plot_perplexity(out / "perplexity.png", runs, setting)
    atomic_write_text(out / "table.md", f"{setting}\n\n{table}\nPer round (FedSoup arms):\n\n"
                                        f"{lora_rounds_table(runs)}")
    return table
