"""Reproduce Appendix F / Figure 17: AME as a statistical estimator on heavy tails.

Protocol (paper, Appendix F.3): draw a "population" of 60,000 two-dimensional
points from a standard Cauchy (top row) or standard Gaussian (bottom row). Each
of 300 trials subsamples 300 points - the "models" - and estimates their centre
with the model soup (the mean) and with AME started far away at (10, 10):

    (a)/(d) Adam-AME  lr 0.1 / 0.01, beta1 = beta2 = 0.2, eps 1e-8, constant lr
    (b)/(e) GD-AME    lr 1 / 0.1, constant
    (c)/(f) GD-AME    lr 1 / 0.1, decaying as O(1/t) (``schedule="poly", alpha=-1``)

all with batches of 20 models and 200 ensemble epochs. The reference is the
population median (the paper's proxy for the Cauchy MLE; for the Gaussian it is
also the mean).

All 300 trials run as ONE ``fedsoup.merge`` call: ingredient ``i`` is the
``(trials, 2)`` tensor of every trial's ``i``-th point. Adam and SGD update
each coordinate independently, so this is exactly 300 separate merges that
share one visiting order - which is fine, the trials' samples being independent.

    python -m simulations.paper_cauchy                 # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedsoup
from fedsoup.atomic import atomic_write_text
from simulations.figures import save_png
from simulations.run_dirs import fresh_run_dir, link_latest

START = (10.0, 10.0)


def panels(distribution: str) -> list[tuple[str, dict[str, Any]]]:
    """The three AME estimators of one row of Figure 17, with the paper's hyperparameters."""
    small = distribution == "gaussian"  # the bottom row uses 10x smaller learning rates
    adam_lr, gd_lr = (0.01, 0.1) if small else (0.1, 1.0)
    return [
        (f"Adam-AME (lr {adam_lr:g})", {"optimizer": "adam", "lr": adam_lr, "betas": (0.2, 0.2),
                                        "eps": 1e-8, "schedule": "constant"}),
        (f"GD-AME (lr {gd_lr:g})", {"optimizer": "sgd", "lr": gd_lr, "schedule": "constant"}),
        (f"GD-AME (lr {gd_lr:g}/t)", {"optimizer": "sgd", "lr": gd_lr, "schedule": "poly", "alpha": -1.0}),
    ]


def draw(distribution: str, rng: np.random.Generator, population: int) -> np.ndarray:
    if distribution == "cauchy":
        return rng.standard_cauchy((population, 2))
    if distribution == "gaussian":
        return rng.standard_normal((population, 2))
    raise ValueError(f"unknown distribution '{distribution}'")


def run_distribution(distribution: str, *, trials: int, ingredients: int, population: int,
                     epochs: int, batch_size: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    pop = draw(distribution, rng, population)
    reference = np.median(pop, axis=0)
    samples = np.stack([pop[rng.choice(population, ingredients, replace=False)] for _ in range(trials)])
    models = [{"w": torch.from_numpy(np.ascontiguousarray(samples[:, i, :]))} for i in range(ingredients)]
    pivot = {"w": torch.tensor(START, dtype=torch.float64).expand(trials, 2).clone()}

    soup = samples.mean(axis=1)
    estimates = {"Soup (mean)": soup}
    for label, hp in panels(distribution):
        merged = fedsoup.merge(models, pivot=pivot, epochs=epochs, batch_size=batch_size,
                               shuffle=True, seed=seed, **hp)
        estimates[label] = merged["w"].numpy()

    soup_dist = np.linalg.norm(soup - reference, axis=1)
    summary: dict[str, Any] = {"reference (population median)": reference.tolist(), "estimators": {}}
    for label, est in estimates.items():
        dist = np.linalg.norm(est - reference, axis=1)
        summary["estimators"][label] = {
            "median distance": float(np.median(dist)),
            "mean distance": float(np.mean(dist)),
            "90th pct distance": float(np.quantile(dist, 0.9)),
            "closer than soup": float(np.mean(dist < soup_dist)),
        }
    return {"summary": summary, "estimates": estimates, "reference": reference}


def markdown(results: dict[str, dict[str, Any]], setting: str) -> str:
    lines = [setting, "",
             "| distribution | estimator | median dist. | mean dist. | 90th pct dist. | trials closer than soup |",
             "|---|---|---:|---:|---:|---:|"]
    for dist_name, res in results.items():
        for label, s in res["summary"]["estimators"].items():
            closer = "-" if label.startswith("Soup") else f"{s['closer than soup']:.0%}"
            lines.append(f"| {dist_name} | {label} | {s['median distance']:.3f} | {s['mean distance']:.3g} "
                         f"| {s['90th pct distance']:.3g} | {closer} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, results: dict[str, dict[str, Any]]) -> None:
    """Figure 17 layout: one row per distribution, one panel per AME estimator vs the soup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results)
    fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, 3.5 * len(rows)), dpi=90, squeeze=False)
    for r, name in enumerate(rows):
        res = results[name]
        ref = res["reference"]
        soup = res["estimates"]["Soup (mean)"]
        span = 3.0 if name == "cauchy" else 0.4  # the Gaussian soups are ~0.07 from the median
        for c, label in enumerate(k for k in res["estimates"] if not k.startswith("Soup")):
            ax = axes[r][c]
            ame = res["estimates"][label]
            ax.scatter(soup[:, 0], soup[:, 1], s=6, c="tab:blue", alpha=0.5, label="soup (mean)")
            ax.scatter(ame[:, 0], ame[:, 1], s=6, c="tab:red", alpha=0.5, label="AME")
            ax.scatter([ref[0]], [ref[1]], s=80, c="tab:green", marker="*", label="population median")
            ax.set_xlim(ref[0] - span, ref[0] + span)
            ax.set_ylim(ref[1] - span, ref[1] + span)
            def outside(points: np.ndarray) -> int:
                return int(np.sum(np.any(np.abs(points - ref) > span, axis=1)))

            ax.set_title(f"{name}: {label}\noutside the frame: {outside(soup)} soup, {outside(ame)} AME",
                         fontsize=8)
            ax.grid(alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=7, loc="lower left")
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.paper_cauchy", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--ingredients", type=int, default=300)
    p.add_argument("--population", type=int, default=60_000)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distributions", nargs="+", choices=("cauchy", "gaussian"), default=["cauchy", "gaussian"])
    p.add_argument("--out", type=Path, default=Path("results/paper_cauchy"),
                   help="each run writes a fresh OUT/<date>T<time>/ and links OUT/latest to it")
    args = p.parse_args(argv)
    if args.ingredients > args.population:
        print("error: --ingredients must not exceed --population", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    results = {d: run_distribution(d, trials=args.trials, ingredients=args.ingredients,
                                   population=args.population, epochs=args.epochs,
                                   batch_size=args.batch_size, seed=args.seed)
               for d in args.distributions}
    setting = (f"{args.trials} trials of {args.ingredients} points from a population of {args.population:,}; "
               f"AME from {START}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}. "
               "Distance = Euclidean distance to the population median.")
    table = markdown(results, setting)
    out = fresh_run_dir(args.out)  # never over an earlier run's files
    atomic_write_text(out / "cauchy.md", table)
    atomic_write_text(out / "results.json", json.dumps(
        {"setting": setting, **{d: r["summary"] for d, r in results.items()}}, indent=2))
    plot(out / "cauchy.png", results)
    link_latest(out)
    print(table)
    print(f"wrote {out}/cauchy.md, results.json, cauchy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
