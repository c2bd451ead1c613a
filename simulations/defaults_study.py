"""Measure AME's safe defaults (``fedsoup.defaults``): the numbers behind docs/defaults.md.

Three studies, each printing a markdown table:

- ``ball``: Adam, AdamW, Adagrad and RMSprop with no ``lr`` on synthetic ingredients of
  a federated-round-like spread (1e-3) and an expert-like spread (1e-1): distance of
  the merge to the soup relative to the ingredients' RMS spread ``√(Σ ω_i‖x_i − s‖²)``
  and to the radius of Proposition 2's ball, with the old default ``lr = 1`` and with
  the scale-aware default.
- ``experts``: real ingredients. The Table 1 protocol's 30 digits experts (one
  initialisation, class-exclusion loaders, AdamW; ``simulations.paper_table1``) and the
  10 client models of one federated round (digits, 50% class exclusion, after 3 FedAvg
  rounds; pivot at the global model as FedSoup does): test accuracy of the soup and of
  each adaptive optimizer with defaults, and of Adam for several fractions ``c``.
- ``cauchy``: Appendix F (``simulations.paper_cauchy``'s setting, 300 points from a
  Cauchy population, AME from (10, 10), batch 20, 200 epochs) with Adam and no ``lr``:
  how often AME lands closer to the population median than the soup. Each trial is
  its own tensor key, so each gets its own scale-aware ``lr`` as a separate merge would.

    python -m simulations.defaults_study ball experts cauchy     # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch

import fedsoup
from fedsoup import defaults

ADAPTIVE = ("adam", "adamw", "adagrad", "rmsprop")
FRACTIONS = (0.003, 0.01, 0.03, 0.1)


@contextlib.contextmanager
def lr_fraction(fraction: float) -> Iterator[None]:
    """Run merges with another ``DEFAULT_LR_FRACTION`` (the study's sweep)."""
    saved = defaults.DEFAULT_LR_FRACTION
    defaults.DEFAULT_LR_FRACTION = fraction
    try:
        yield
    finally:
        defaults.DEFAULT_LR_FRACTION = saved


def distances(models: Sequence[dict], merged: dict, pivot: dict | None = None) -> tuple[float, float, float]:
    """(‖w − s‖, RMS spread √(Σω‖x−s‖²), ball radius max(‖x_i − s‖, ‖w_0 − s‖)) over floating keys."""
    soup = fedsoup.soup(models)
    keys = [k for k, v in soup.items() if v.is_floating_point()]

    def dist(state: dict) -> float:
        return math.sqrt(sum(float(torch.sum((state[k].double() - soup[k].double()) ** 2)) for k in keys))

    per_model = [dist(m) for m in models]
    radius = max(per_model + ([dist(pivot)] if pivot is not None else []))
    rms = math.sqrt(sum(d * d for d in per_model) / len(per_model))
    return dist(merged), rms, radius


# ------------------------------------------------------------------- ball


def synthetic(n: int, spread: float, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` MLP-shaped ingredients around one base; biases spread 10x less than weights."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"fc1.weight": (64, 64), "fc1.bias": (64,), "fc2.weight": (10, 64), "fc2.bias": (10,)}
    base = {k: 0.1 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    return [{k: v + spread * (0.1 if k.endswith("bias") else 1.0) * torch.randn(v.shape, generator=gen)
             for k, v in base.items()} for _ in range(n)]


def ball_rows(label: str, models: list[dict], **merge_kwargs) -> list[str]:
    rows = []
    for name in ADAPTIVE:
        cells = []
        for lr in (1.0, None):
            merged = fedsoup.merge(models, optimizer=name, lr=lr, **merge_kwargs)
            d, rms, radius = distances(models, merged)
            cells.append(f"{d / rms:.3g} | {d / radius:.3g}")
        rows.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return rows


def study_ball(n: int = 8) -> str:
    lines = ["| ingredients | optimizer | lr=1: ‖w−s‖/spread | lr=1: ‖w−s‖/R | default: ‖w−s‖/spread "
             "| default: ‖w−s‖/R |", "|---|---|---:|---:|---:|---:|"]
    for spread in (1e-3, 1e-1):
        lines += ball_rows(f"{n} synthetic, spread {spread:g}", synthetic(n, spread))
    experts, _splits = table1_experts(0.5, 0)
    lines += ball_rows("Table 1: 30 digits experts, 50% OOD", experts)
    _global, clients, weights, _test = federated_round(3, 0)
    lines += ball_rows("FedAvg round 4: 10 digits clients", clients, weights=weights)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------- experts


def table1_experts(ood: float, seed: int) -> tuple[list[dict], object]:
    from simulations.paper_table1 import make_splits, train_experts

    splits = make_splits("digits", "", 0.15, seed)
    experts = train_experts(splits, "digits", ood, 3, 10, 3e-3, seed)
    return experts, splits


def federated_round(rounds_before: int, seed: int) -> tuple[dict, list[dict], list[float], object]:
    """The global model after ``rounds_before`` FedAvg rounds and the next round's client models."""
    from simulations.config import SimConfig
    from simulations.data import load_partition, load_testset
    from simulations.models import make_model
    from simulations.task import seed_for, train

    cfg = SimConfig(seed=seed)
    shards = [load_partition(cfg, p, cfg.num_partitions) for p in range(cfg.num_partitions)]
    model = make_model("digits", seed=seed)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    for rnd in range(1, rounds_before + 2):
        clients, weights = [], []
        for p, shard in enumerate(shards):
            model.load_state_dict(global_state)
            train(model, shard, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                  momentum=cfg.momentum, seed=seed_for(seed, rnd, p))
            clients.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(float(len(shard)))
        if rnd <= rounds_before:
            global_state = fedsoup.soup(clients, weights)
    return global_state, clients, weights, load_testset(cfg)


def accuracy(state: dict, data) -> float:
    from simulations.models import make_model
    from simulations.task import evaluate

    model = make_model("digits")
    model.load_state_dict(state)
    return evaluate(model, data)[1]


def expert_rows(label: str, models: list[dict], test, *, weights=None, pivot=None) -> list[str]:
    """Soup; every adaptive optimizer with defaults; Adam at other fractions c; the
    Table 1 protocol's AME-AdamW (batch 2, shuffled, 5 epochs) with no lr; Adam with lr=1."""
    from simulations.paper_table1 import AME_FIXED

    kwargs = {"weights": weights}
    if pivot is not None:
        kwargs["pivot"] = pivot
    protocol = {**{k: v for k, v in AME_FIXED.items() if k != "pivot"}, "epochs": 5}
    soup = fedsoup.soup(models, weights)
    rows = [f"| {label} | soup | - | {accuracy(soup, test):.4f} | 0 | 0 |"]
    c0 = defaults.DEFAULT_LR_FRACTION
    runs = [(name, c0, {"optimizer": name}) for name in ADAPTIVE]
    runs += [("adam", c, {"optimizer": "adam"}) for c in FRACTIONS]
    runs += [("AdamW, Table 1 protocol (batch 2, shuffled, 5 epochs)", c0, protocol)]
    runs += [("adam, lr=1 (old default)", None, {"optimizer": "adam", "lr": 1.0})]
    for name, c, options in runs:
        with lr_fraction(c0 if c is None else c):
            merged = fedsoup.merge(models, **kwargs, **options)
        d, rms, radius = distances(models, merged, pivot)
        shown = "-" if c is None else f"{c:g}"
        rows.append(f"| {label} | {name} | {shown} | {accuracy(merged, test):.4f} | {d / rms:.3g} | {d / radius:.3g} |")
    return rows


def study_experts(seeds: Sequence[int] = (0, 1), oods: Sequence[float] = (0.5, 0.8)) -> str:
    lines = ["| ingredients | merge (no lr) | c | test acc | ‖w−s‖/spread | ‖w−s‖/R |",
             "|---|---|---:|---:|---:|---:|"]
    for seed in seeds:
        for ood in oods:
            experts, splits = table1_experts(ood, seed)
            lines += expert_rows(f"Table 1: 30 experts, {ood:.0%} OOD, seed {seed}", experts, splits.test)
        global_state, clients, weights, test = federated_round(3, seed)
        lines += expert_rows(f"FedAvg round 4: 10 clients, pivot soup, seed {seed}", clients, test, weights=weights)
        lines += expert_rows(f"FedAvg round 4: 10 clients, pivot global, seed {seed}", clients, test,
                             weights=weights, pivot=global_state)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ cauchy


def study_cauchy(trials: int = 300, seed: int = 0, epochs: int = 200) -> str:
    """Appendix F with no lr: per-trial keys, so each trial has its own default lr."""
    from simulations.paper_cauchy import START, draw

    lines = ["| distribution | AME settings (lr not given) | median dist. AME | median dist. soup "
             "| trials closer than soup |", "|---|---|---:|---:|---:|"]
    for distribution in ("cauchy", "gaussian"):
        rng = np.random.default_rng(seed)
        pop = draw(distribution, rng, 60_000)
        reference = np.median(pop, axis=0)
        samples = np.stack([pop[rng.choice(60_000, 300, replace=False)] for _ in range(trials)])
        models = [{f"trial{t}": torch.from_numpy(samples[t, i].copy()) for t in range(trials)} for i in range(300)]
        pivot = {f"trial{t}": torch.tensor(START, dtype=torch.float64) for t in range(trials)}
        soup_dist = np.linalg.norm(samples.mean(axis=1) - reference, axis=1)
        settings = {
            "defaults (harmonic, betas 0.9/0.999)": {},
            "Figure 17 panel minus lr (constant, betas 0.2/0.2)": {"schedule": "constant", "betas": (0.2, 0.2)},
            "harmonic, betas 0.2/0.2": {"betas": (0.2, 0.2)},
        }
        for label, hp in settings.items():
            merged = fedsoup.merge(models, optimizer="adam", pivot=pivot, epochs=epochs, batch_size=20,
                                   shuffle=True, seed=seed, **hp)
            est = np.stack([merged[f"trial{t}"].numpy() for t in range(trials)])
            dist = np.linalg.norm(est - reference, axis=1)
            lines.append(f"| {distribution} | {label} | {np.median(dist):.3f} | {np.median(soup_dist):.3f} "
                         f"| {np.mean(dist < soup_dist):.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.defaults_study", description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="+", choices=("ball", "experts", "cauchy"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=300, help="cauchy: number of trials")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for study in args.studies:
        if study == "ball":
            print(study_ball())
        elif study == "experts":
            print(study_experts())
        else:
            print(study_cauchy(args.trials, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
