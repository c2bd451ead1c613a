"""Reproduce the protocol of Table 1 / Table 2 (Section 4.1, Appendix A.2) with ``fedsoup``.

For each out-of-domain level (10%, 50%, ..., 90%):

1. ten class-exclusion loaders: loader ``n`` drops classes ``n..n+k-1 (mod 10)``
   (:class:`simulations.partitioning.ClassExclusionPartitioner`, ``disjoint=False``:
   a loader holds every training sample of its classes, as in the paper);
2. 30 experts, 3 per loader, all from ONE initialisation; they differ by the
   seed of their batch order (the paper's "dataloader generator seed");
   trained with AdamW;
3. merges, all data-free except for the validation split used to rank and select:
   best ingredient (by validation accuracy), the uniform soup, greedy soups
   (Appendix A.4: an ingredient is kept iff validation accuracy strictly improves)
   in ascending and descending validation order, and AME-AdamW
   (``fedsoup.merge(optimizer="adamw", pivot="soup", schedule="harmonic")``,
   ingredients ordered by validation accuracy) with its hyperparameters chosen on
   the validation split from a grid after the paper's Table 3;
4. train accuracy (on the whole training split, all classes) and test accuracy.

``--seeds 0 1 2 3 4`` repeats the whole protocol per seed (validation split,
initialisation, expert batch orders, hyperparameter selection; the test split is
fixed) and reports every accuracy as mean ± std over seeds, and AME-AdamW − soup
paired by seed with a 95% t-interval (:mod:`simulations.stats`).

Digits (offline) by default; ``--dataset cifar10 --data-dir DIR`` when CIFAR-10 is
present (slow on CPU: 180 CNNs). Writes ``table1.md``, ``table2.md``,
``results.json`` and ``table1.png`` into ``--out``.

    python -m simulations.paper_table1                  # digits, one seed, about 1 minute on 2 cores
    python -m simulations.paper_table1 --seeds 0 1 2 3 4
    python -m simulations.paper_table1 --ood 0.5 0.8 --quick --val-size 300
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

import fedsoup
from fedsoup.atomic import atomic_write_text
from simulations.figures import save_png
from simulations.run_dirs import fresh_run_dir, link_latest
from simulations.data import ArrayDataset, load_arrays
from simulations.models import make_model
from simulations.partitioning import ClassExclusionPartitioner
from simulations.stats import PairedDifference, Spread
from simulations.task import evaluate, seed_for, train

OOD_LEVELS = (0.1, 0.5, 0.6, 0.7, 0.8, 0.9)
METHODS = ("Best ingredient", "Soup", "Greedy soup (asc)", "Greedy soup (desc)", "AME-AdamW")

# AME-AdamW grid (after the paper's Table 3 AdamW column, plus ensemble epochs).
AME_GRID = {
    "lr": (1e-4, 1e-3, 1e-2, 1e-1),
    "weight_decay": (0.0, 0.01, 0.1),
    "betas": ((0.8, 0.9), (0.9, 0.999)),
    "epochs": (1, 5, 15),
}
AME_FIXED = {"optimizer": "adamw", "schedule": "harmonic", "batch_size": 2, "shuffle": True,
             "eps": 1e-7, "pivot": "soup", "adaptive_pivot": True}
QUICK_GRID = {"lr": (1e-3, 1e-2), "weight_decay": (0.0,), "betas": ((0.8, 0.9),), "epochs": (1, 5)}


@dataclass
class Splits:
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


def make_splits(dataset: str, data_dir: str, val_size: float | int, seed: int) -> Splits:
    """Training data minus a stratified validation split; the dataset's own test split.

    ``val_size``: a fraction of the training data (float) or a number of images (int).
    """
    from sklearn.model_selection import train_test_split

    train, test = load_arrays(dataset, data_dir)
    idx_tr, idx_val = train_test_split(np.arange(len(train)), test_size=val_size,
                                       stratify=train.y, random_state=seed)
    return Splits(train.subset(np.sort(idx_tr)), train.subset(np.sort(idx_val)), test)


def train_experts(splits: Splits, dataset: str, ood: float, experts_per_loader: int,
                  epochs: int, lr: float, seed: int) -> list[dict[str, torch.Tensor]]:
    """30 experts (3 per loader) from one initialisation, each on its class-exclusion loader."""
    num_loaders = 10
    partitioner = ClassExclusionPartitioner(num_partitions=num_loaders, ood_fraction=ood, disjoint=False)
    partitioner.dataset = Dataset.from_dict({"label": splits.train.y, "row": np.arange(len(splits.train))})
    init = make_model(dataset, seed=seed).state_dict()
    experts = []
    for loader in range(num_loaders):
        rows = np.asarray(partitioner.load_partition(loader)["row"])
        for copy in range(experts_per_loader):
            model = make_model(dataset)
            model.load_state_dict(init)
            # The paper's expert recipe: AdamW, beta1 0.8, beta2 0.9, eps 1e-5, no weight decay.
            train(model, splits.train.subset(rows), epochs=epochs, lr=lr, batch_size=64,
                  optimizer="adamw", betas=(0.8, 0.9), eps=1e-5, seed=seed_for(seed, loader, copy))
            experts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return experts


def greedy_soup(experts: list[dict], order: list[int], score) -> tuple[dict, list[int]]:
    """Appendix A.4 greedy soup: add ingredients in ``order``; keep one iff the score strictly improves."""
    kept = [order[0]]
    best = score(experts[order[0]])
    for i in order[1:]:
        candidate = fedsoup.soup([experts[j] for j in kept + [i]])
        s = score(candidate)
        if s > best:
            kept.append(i)
            best = s
    return fedsoup.soup([experts[j] for j in kept]), kept


def run_level(splits: Splits, dataset: str, ood: float, *, experts_per_loader: int, epochs: int,
              lr: float, seed: int, grid: dict[str, tuple]) -> dict[str, Any]:
    """All merges for one OOD level; returns accuracies and the chosen AME hyperparameters."""
    t0 = time.perf_counter()
    experts = train_experts(splits, dataset, ood, experts_per_loader, epochs, lr, seed)
    model = make_model(dataset)

    def acc(state: dict, data: ArrayDataset) -> float:
        model.load_state_dict(state)
        return evaluate(model, data)[1]

    val_acc = [acc(e, splits.val) for e in experts]
    ascending = [int(i) for i in np.argsort(val_acc, kind="stable")]
    merged: dict[str, dict] = {}
    merged["Best ingredient"] = experts[ascending[-1]]
    merged["Soup"] = fedsoup.soup(experts)
    merged["Greedy soup (asc)"], kept_asc = greedy_soup(experts, ascending, lambda s: acc(s, splits.val))
    merged["Greedy soup (desc)"], kept_desc = greedy_soup(experts, ascending[::-1], lambda s: acc(s, splits.val))

    best_val, best_hp, best_state = -1.0, None, None
    with _fedsoup_warnings_silenced():
        for lr_, wd, betas, ep in itertools.product(grid["lr"], grid["weight_decay"], grid["betas"],
                                                    grid["epochs"]):
            hp = {**AME_FIXED, "lr": lr_, "weight_decay": wd, "betas": betas, "epochs": ep}
            state = fedsoup.merge(experts, order_by=val_acc, seed=seed, **hp)
            v = acc(state, splits.val)
            if v > best_val:  # first best wins: ties go to the earlier (smaller) setting
                best_val, best_hp, best_state = v, hp, state
    merged["AME-AdamW"] = best_state

    row = {"ood": ood, "seconds": 0.0,
           "ame_hyperparameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in best_hp.items()},
           "greedy_kept": {"asc": len(kept_asc), "desc": len(kept_desc)},
           "expert_val_acc": {"min": min(val_acc), "max": max(val_acc)}}
    for name in METHODS:
        row[name] = {"val": acc(merged[name], splits.val), "train": acc(merged[name], splits.train),
                     "test": acc(merged[name], splits.test)}
    row["ame_minus_soup_rel_norm"] = _relative_distance(merged["AME-AdamW"], merged["Soup"])
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


@contextlib.contextmanager
def _fedsoup_warnings_silenced():
    """The grid tries large learning rates on purpose; merge's WARNING for every setting that
    leaves the ball of Proposition 2 would bury the results (validation rejects those settings)."""
    logger = logging.getLogger("fedsoup")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _relative_distance(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over all floating tensors: how far AME moved away from the soup."""
    keys = [k for k in b if b[k].is_floating_point()]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
    return float(diff / torch.cat([b[k].flatten() for k in keys]).norm())


def summarise(per_seed: list[list[dict]]) -> list[dict]:
    """Per OOD level: every method's accuracy as mean ± std over seeds, and AME-AdamW − soup paired by seed."""
    summary = []
    for level_rows in zip(*per_seed):  # the same OOD level in every seed's run
        entry: dict[str, Any] = {"ood": level_rows[0]["ood"]}
        for m in METHODS:
            entry[m] = {split: Spread.of([r[m][split] for r in level_rows]).as_dict()
                        for split in ("val", "train", "test")}
        entry["ame_minus_soup"] = PairedDifference.of([r["AME-AdamW"]["test"] for r in level_rows],
                                                      [r["Soup"]["test"] for r in level_rows]).as_dict()
        entry["ame_minus_soup_rel_norm"] = Spread.of([r["ame_minus_soup_rel_norm"] for r in level_rows]).as_dict()
        summary.append(entry)
    return summary


def _spread(cell: dict) -> Spread:
    return Spread.of(cell["values"])


def table1(summary: list[dict]) -> str:
    """Test accuracy, mean ± std over seeds; the best mean per row in bold."""
    lines = ["| OOD | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    for entry in summary:
        cells = [_spread(entry[m]["test"]) for m in METHODS]
        top = max(c.mean for c in cells)
        texts = [f"**{c.text()}**" if c.mean == top else c.text() for c in cells]
        lines.append(f"| {entry['ood']:.0%} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def difference_table(summary: list[dict]) -> str:
    """AME-AdamW − soup in test accuracy, paired by seed, with a 95% t-interval."""
    lines = ["| OOD | AME-AdamW − soup (points), mean [95% CI] | std | AME better / tie / worse | "
             "‖AME − soup‖ / ‖soup‖ |", "|---|---:|---:|---:|---:|"]
    for entry in summary:
        d = PairedDifference.of(entry["AME-AdamW"]["test"]["values"], entry["Soup"]["test"]["values"])
        std = "-" if np.isnan(d.std) else f"{100 * d.std:.2f}"
        lines.append(f"| {entry['ood']:.0%} | {d.text()} | {std} | {d.wins} / {d.ties} / {d.losses} | "
                     f"{_spread(entry['ame_minus_soup_rel_norm']).text('.3f')} |")
    return "\n".join(lines) + "\n"


def table2(summary: list[dict]) -> str:
    head = "| | " + " | ".join(f"{e['ood']:.0%} OOD" for e in summary) + " |"
    lines = [head, "|---|" + "---:|" * len(summary)]
    for label, method, split in (("Best ingredient, train", "Best ingredient", "train"),
                                 ("Best ingredient, test", "Best ingredient", "test"),
                                 ("AME-AdamW, train", "AME-AdamW", "train"),
                                 ("AME-AdamW, test", "AME-AdamW", "test"),
                                 ("Soup, train", "Soup", "train"),
                                 ("Soup, test", "Soup", "test")):
        lines.append(f"| {label} | " + " | ".join(_spread(e[method][split]).text() for e in summary) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, summary: list[dict], title: str) -> None:
    """Left: test accuracy per method (bars: mean, whiskers: ± std). Right: AME − soup with its 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=90, gridspec_kw={"width_ratios": [2.4, 1]})
    width = 0.8 / len(METHODS)
    x = np.arange(len(summary))
    for i, m in enumerate(METHODS):
        cells = [_spread(e[m]["test"]) for e in summary]
        ax.bar(x + (i - (len(METHODS) - 1) / 2) * width, [c.mean for c in cells], width, label=m,
               yerr=[0.0 if np.isnan(c.std) else c.std for c in cells], capsize=1.5,
               error_kw={"elinewidth": 0.8})
    labels = [f"{e['ood']:.0%}" for e in summary]
    ax.set_xticks(x, labels)
    ax.set_xlabel("OOD fraction")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.15)  # headroom for the legend
    ax.set_title(textwrap.fill(title, 85), fontsize=8)
    ax.legend(fontsize=6.5, ncol=3, loc="upper right")
    ax.grid(axis="y", alpha=0.3)

    diffs = [PairedDifference.of(e["AME-AdamW"]["test"]["values"], e["Soup"]["test"]["values"]) for e in summary]
    mean = np.array([100 * d.mean for d in diffs])
    half = np.array([0.0 if np.isnan(d.low) else 100 * (d.high - d.mean) for d in diffs])
    ax_d.axhline(0.0, color="grey", lw=0.8)
    ax_d.errorbar(x, mean, yerr=half, fmt="o", color="tab:purple", capsize=3)
    ax_d.set_xticks(x, labels)
    ax_d.set_xlabel("OOD fraction")
    ax_d.set_ylabel("AME-AdamW − soup (points)")
    ax_d.set_title("paired by seed, 95% t-interval", fontsize=8)
    ax_d.grid(alpha=0.3)
    save_png(fig, path)


def setting_of(args: argparse.Namespace, epochs: int, lr: float, per_seed: list[dict]) -> str:
    seeds = [run["seed"] for run in per_seed]
    return (f"{args.dataset}: {10 * args.experts_per_loader} experts, {epochs} AdamW epochs (lr {lr:g}), "
            f"one initialisation per seed, validation split {per_seed[0]['val_size']} images, "
            f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")


def write_outputs(out: Path, per_seed: list[dict], setting: str, seconds: float) -> str:
    """``table1.md``, ``table2.md``, ``results.json`` and ``table1.png`` for the seeds run so far."""
    summary = summarise([run["levels"] for run in per_seed])
    t1, t2, td = table1(summary), table2(summary), difference_table(summary)
    atomic_write_text(out / "table1.md", f"Test accuracy, mean ± std over seeds. {setting}\n\n{t1}\n"
                                         f"AME-AdamW − soup, paired by seed:\n\n{td}")
    atomic_write_text(out / "table2.md", f"Train and test accuracy, mean ± std over seeds. {setting}\n\n{t2}")
    atomic_write_text(out / "results.json", json.dumps(
        {"setting": setting, "seeds": [run["seed"] for run in per_seed], "seconds": seconds,
         "summary": summary, "per_seed": per_seed}, indent=2))
    plot(out / "table1.png", summary, f"Table 1 protocol - {setting}")
    return f"{setting}\n\n{t1}\n{td}\n{t2}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.paper_table1", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    p.add_argument("--data-dir", default="", help="CIFAR-10 binary batches or a saved HF dataset")
    p.add_argument("--ood", type=float, nargs="+", default=list(OOD_LEVELS), help="OOD fractions")
    p.add_argument("--experts-per-loader", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="expert training epochs (digits 10, cifar10 5)")
    p.add_argument("--lr", type=float, default=None, help="expert AdamW lr (digits 3e-3, cifar10 1e-3)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.15,
                     help="validation split as a fraction of the training data (default 0.15)")
    val.add_argument("--val-size", type=int, default=None, help="validation split as a number of images")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="repeat the whole protocol (split, initialisation, experts, selection) per seed")
    p.add_argument("--quick", action="store_true", help="a small AME grid (for tests and smoke runs)")
    p.add_argument("--out", type=Path, default=Path("results/paper_table1"),
                   help="each run writes a fresh OUT/<date>T<time>/ and links OUT/latest to it")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    epochs = args.epochs or (10 if args.dataset == "digits" else 5)
    lr = args.lr or (3e-3 if args.dataset == "digits" else 1e-3)
    val_size = args.val_size if args.val_size is not None else args.val_fraction
    grid = QUICK_GRID if args.quick else AME_GRID
    start = time.perf_counter()
    per_seed = []
    out = None
    for seed in args.seeds:
        try:
            splits = make_splits(args.dataset, args.data_dir, val_size, seed)
        except (OSError, ValueError) as err:  # missing files, unreachable hub, bad data, bad split size
            print(f"error: {err}", file=sys.stderr)
            return 2
        rows = []
        for ood in args.ood:
            row = run_level(splits, args.dataset, ood, experts_per_loader=args.experts_per_loader,
                            epochs=epochs, lr=lr, seed=seed, grid=grid)
            rows.append(row)
            print(f"seed {seed}, {ood:.0%} OOD: " + ", ".join(f"{m} {row[m]['test']:.2%}" for m in METHODS)
                  + f"; |AME-soup|/|soup| = {row['ame_minus_soup_rel_norm']:.3f}  ({row['seconds']} s)",
                  flush=True)
        per_seed.append({"seed": seed, "val_size": len(splits.val), "levels": rows})
        # Written after every seed, so a long run that is stopped keeps the seeds it finished.
        out = out or fresh_run_dir(args.out)  # never over an earlier run's files
        text = write_outputs(out, per_seed, setting_of(args, epochs, lr, per_seed),
                             round(time.perf_counter() - start, 1))
    link_latest(out)
    seconds = round(time.perf_counter() - start, 1)
    print(f"\n{text}\nwall time {seconds} s; wrote {out}/table1.md, table2.md, results.json, table1.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
