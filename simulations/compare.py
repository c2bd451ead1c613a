"""Compare strategies on the same client shards and seed in Flower's simulation engine.

    python -m simulations.compare --preset demo
    python -m simulations.compare --strategy fedavg --strategy fedmedian \\
        --strategy "fedsoup soup-optimizer=adam soup-lr=0.01 label=AME-Adam" \\
        --set attack=cauchy-noise --set attack-fraction=0.2 --out results/robust

Every ``--strategy`` is a strategy name followed by run-config overrides that only
the server sees (``soup-*``, ``stew-*``, ``server-*``, ...) and an optional
``label=``. Everything the clients see (data, partitioning, local training,
attacks, seed) is shared, so all strategies train on identical shards.

One ``flwr.simulation.run_simulation`` (Ray backend) runs the whole comparison:
the ServerApp runs the strategies one after the other over the same simulated
SuperNodes, which pays Ray's start-up once. Outputs in ``--out``:
``results.json`` and ``results.csv`` (per strategy and round), ``accuracy.png``
(test accuracy against rounds) and ``table.md`` (final accuracies).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shlex
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsoup.atomic import atomic_write_text
from simulations.config import SimConfig
from simulations.figures import save_png
from simulations.stats import PairedDifference, Spread

# Keys that change what a client does; they must be equal for every compared strategy.
CLIENT_KEYS = frozenset({
    "dataset", "data-dir", "partitioning", "num-partitions", "ood-fraction", "dirichlet-alpha",
    "classes-per-partition", "val-fraction", "local-epochs", "batch-size", "lr", "momentum",
    "seed", "attack", "attack-fraction", "attack-scale",
})

# AME ClientSoup used by the presets: Adam over the clients' pseudogradients, pivot
# at the global model, 5 shuffled epochs in mini-batches of 2 clients, harmonic
# decay, clients visited by validation accuracy (best first, as the paper sorts
# ingredients; FedSoup breaks ties by the partition id each client reports, which
# makes the order - and so the result - independent of the node ids Ray draws at
# random). Picked by a small sweep on the demo setting (docs/simulations.md); it
# does not beat FedAvg there - see the measured table.
AME_CLIENT_SOUP = {
    "soup-optimizer": "adam", "soup-lr": 0.01, "soup-schedule": "harmonic",
    "soup-epochs": 5, "soup-batch-size": 2, "soup-shuffle": True,
    "soup-beta1": 0.8, "soup-beta2": 0.9, "soup-eps": 1e-5, "order-by": "val-acc",
    "soup-pivot": "global",
}
# ServerStew with Flower's FedAdam update (eta 0.1, betas 0.9/0.99, tau 1e-3).
ADAM_STEW = {"stew-optimizer": "fedadam", "stew-lr": 0.1, "stew-beta1": 0.9,
             "stew-beta2": 0.99, "stew-eps": 1e-3}

PRESETS: dict[str, dict[str, Any]] = {
    # `make demo`: digits, class-exclusion shards, FedAvg vs FedAdam vs FedSoup (AME ClientSoup).
    "demo": {
        "base": {"dataset": "digits", "partitioning": "class-exclusion", "ood-fraction": 0.5,
                 "num-partitions": 10, "num-server-rounds": 20, "local-epochs": 2, "seed": 0},
        "strategies": [
            {"strategy": "fedavg", "label": "FedAvg"},
            {"strategy": "fedadam", "label": "FedAdam"},
            {"strategy": "fedsoup", "label": "FedSoup (AME ClientSoup)", **AME_CLIENT_SOUP},
            {"strategy": "fedsoup", "label": "FedSoup (AME ClientSoup + Adam ServerStew)",
             **AME_CLIENT_SOUP, **ADAM_STEW},
        ],
    },
    # The demo's four strategies as client data become more exclusive: every client misses
    # 50..90% of the classes (class-exclusion), 5 seeds, in process (no Ray: 100 short runs).
    "ood-sweep": {
        "base": {"dataset": "digits", "partitioning": "class-exclusion",
                 "num-partitions": 10, "num-server-rounds": 20, "local-epochs": 2},
        "sweep": ("ood-fraction", (0.5, 0.6, 0.7, 0.8, 0.9)),
        "seeds": (0, 1, 2, 3, 4),
        "backend": "inprocess",
        "strategies": [
            {"strategy": "fedavg", "label": "FedAvg"},
            {"strategy": "fedadam", "label": "FedAdam"},
            {"strategy": "fedsoup", "label": "FedSoup (AME ClientSoup)", **AME_CLIENT_SOUP},
            {"strategy": "fedsoup", "label": "FedSoup (AME ClientSoup + Adam ServerStew)",
             **AME_CLIENT_SOUP, **ADAM_STEW},
        ],
        # Paired differences reported per swept value: each FedSoup against the Flower
        # strategy with the same server update (mean vs AME soup; FedAdam vs soup + Adam stew).
        "pairs": (("FedSoup (AME ClientSoup)", "FedAvg"),
                  ("FedSoup (AME ClientSoup + Adam ServerStew)", "FedAdam")),
    },
    # Heavy-tailed Byzantine noise from 20% of the clients.
    "robust": {
        "base": {"dataset": "digits", "partitioning": "dirichlet", "dirichlet-alpha": 1.0,
                 "num-partitions": 10, "num-server-rounds": 20, "local-epochs": 2, "seed": 0,
                 "attack": "cauchy-noise", "attack-fraction": 0.2, "attack-scale": 1.0},
        "strategies": [
            {"strategy": "fedavg", "label": "FedAvg"},
            {"strategy": "fedmedian", "label": "FedMedian"},
            {"strategy": "fedtrimmedavg", "label": "FedTrimmedAvg"},
            {"strategy": "krum", "label": "Krum"},
            {"strategy": "fedsoup", "label": "FedSoup (AME ClientSoup)", **AME_CLIENT_SOUP},
        ],
    },
}


@dataclass
class StrategyRun:
    label: str
    overrides: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = float("nan")


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fedsoup soup-lr=0.01 label=X"`` -> ``("X", {"strategy": "fedsoup", "soup-lr": "0.01"})``."""
    words = shlex.split(spec)
    if not words:
        raise ValueError("empty --strategy")
    overrides: dict[str, Any] = {"strategy": words[0]}
    overrides.update(_parse_assignments(words[1:], "--strategy"))
    label = overrides.pop("label", words[0])
    return str(label), overrides


def _parse_assignments(words: Sequence[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"{flag}: expected key=value, got '{word}'")
        out[key.strip()] = value.strip()
    return out


def check_server_only(label: str, overrides: Mapping[str, Any]) -> None:
    shared = sorted(CLIENT_KEYS & set(overrides))
    if shared:
        raise ValueError(
            f"strategy '{label}' overrides client-side key(s) {shared}; those must be the "
            "same for every compared strategy - pass them with --set instead"
        )


def run_comparison(
    base: Mapping[str, Any],
    runs: list[StrategyRun],
    *,
    backend_config: Mapping[str, Any] | None = None,
) -> list[StrategyRun]:
    """Run every strategy in ``runs`` in one simulation; fills ``run.rows`` and ``run.seconds``."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from simulations.client_app import make_client_app
    from simulations.server_app import run_server

    base_cfg = SimConfig.from_run_config(base)  # validate before starting Ray
    configs = []
    for run in runs:
        check_server_only(run.label, run.overrides)
        configs.append(SimConfig.from_run_config(base, run.overrides))

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for run, cfg in zip(runs, configs):
            logging.getLogger("flwr").info("=== %s ===", run.label)
            start = time.perf_counter()
            run.rows = run_server(grid, cfg)
            run.seconds = time.perf_counter() - start

    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False},
    }
    for key, value in (backend_config or {}).items():
        if isinstance(value, Mapping):
            backend.setdefault(key, {}).update(value)
        else:
            backend[key] = value
    run_simulation(
        server_app=server_app,
        client_app=make_client_app(base),
        num_supernodes=base_cfg.num_partitions,
        backend_config=backend,
    )
    missing = [r.label for r in runs if not r.rows]
    if missing:
        raise RuntimeError(f"the simulation ended without results for: {', '.join(missing)}")
    return runs


def run_comparison_inprocess(base: Mapping[str, Any], runs: list[StrategyRun]) -> list[StrategyRun]:
    """The same comparison without Ray: clients are called in turn in this process.

    Uses ``strategies.inprocess.InProcessGrid`` (a Flower Grid that calls the
    ClientApp in this process) and the very same ClientApp; results are identical
    to the Ray backend (every client's update is a pure function of the global
    model, its shard and the seed). Meant for quick sweeps and tests.
    """
    from flwr.app import Context, RecordDict

    from simulations.client_app import make_client_app
    from simulations.server_app import run_server
    from strategies.inprocess import InProcessGrid, serverapp_identity

    base_cfg = SimConfig.from_run_config(base)
    configs = []
    for run in runs:
        check_server_only(run.label, run.overrides)
        configs.append(SimConfig.from_run_config(base, run.overrides))
    client_app = make_client_app(base)
    n = base_cfg.num_partitions
    node_ids = [1000 + p for p in range(n)]
    contexts = {
        node: Context(run_id=1, node_id=node, node_config={"partition-id": p, "num-partitions": n},
                      state=RecordDict(), run_config={})
        for p, node in enumerate(node_ids)
    }

    def client(message):
        return client_app(message, contexts[message.metadata.dst_node_id])

    with serverapp_identity():
        for run, cfg in zip(runs, configs):
            start = time.perf_counter()
            run.rows = run_server(InProcessGrid(node_ids, client), cfg)
            run.seconds = time.perf_counter() - start
    return runs


# ----------------------------------------------------------------- outputs


def markdown_table(runs: Sequence[StrategyRun]) -> str:
    lines = [
        "| strategy | final test acc | best test acc (round) | final test loss | wall time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        final = run.rows[-1]
        best = max(run.rows, key=lambda r: r["test-accuracy"])
        lines.append(
            f"| {run.label} | {final['test-accuracy']:.4f} | {best['test-accuracy']:.4f} "
            f"({best['round']}) | {final['test-loss']:.4f} | {run.seconds:.1f} |"
        )
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
    part = cfg.partitioning
    if part == "class-exclusion":
        part += f" {cfg.ood_fraction:.0%} OOD"
    elif part == "dirichlet":
        part += f" α={cfg.dirichlet_alpha}"
    text = (f"{cfg.dataset}, {cfg.num_partitions} clients, {part}, "
            f"{cfg.local_epochs} local epochs, seed {cfg.seed}")
    if cfg.attack != "none" and cfg.attack_fraction > 0:
        text += f", {cfg.attack} x{cfg.attack_scale:g} from {cfg.attack_fraction:.0%} of clients"
    return text


def write_outputs(out: Path, base: Mapping[str, Any], runs: Sequence[StrategyRun]) -> str:
    cfg = SimConfig.from_run_config(base)
    table = markdown_table(runs)
    atomic_write_text(out / "results.json", json.dumps({
        "setting": describe(cfg),
        "base-config": cfg.to_run_config(),
        "strategies": [{"label": r.label, "overrides": r.overrides, "seconds": r.seconds,
                        "rounds": r.rows} for r in runs],
    }, indent=2))
    write_csv(out / "results.csv", runs)
    plot_accuracy(out / "accuracy.png", runs, describe(cfg))
    atomic_write_text(out / "table.md", f"{describe(cfg)}\n\n{table}")
    return table


# --------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulations.compare",
        description="Run several Flower strategies on identical client shards and compare test accuracy.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="a ready-made comparison")
    p.add_argument("--strategy", action="append", default=[], metavar="'NAME [key=value ...]'",
                   help="a strategy and its server-side overrides (repeatable; replaces the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a shared run-config key, e.g. --set num-server-rounds=30 (repeatable)")
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help="repeat the comparison for each (numeric) value of one shared run-config key, e.g. "
                        "--sweep ood-fraction=0.5,0.7,0.9; adds a table and a plot against that key")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: results/compare-<preset or custom>)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="repeat the comparison for these seeds (shards, inits and batches all change) "
                        "and add a mean ± std table (default: the preset's seeds, else the config's seed)")
    p.add_argument("--backend", choices=("ray", "inprocess"), default=None,
                   help="ray: Flower's simulation engine; inprocess: no Ray, one client "
                        "after the other (same numbers, for quick sweeps). Default: the preset's, else ray")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs Ray may use (default: all); each client takes one")
    return p


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("FLWR_HOME", str(Path.cwd() / ".flwr"))
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    preset = PRESETS.get(args.preset or "", {"base": {}, "strategies": [{"strategy": "fedavg"}]})
    try:
        base = {**preset["base"], **_parse_assignments(args.set, "--set")}
        if args.strategy:
            runs = [StrategyRun(*parse_strategy(s)) for s in args.strategy]
        else:
            runs = [StrategyRun(str(s.get("label", s["strategy"])),
                                {k: v for k, v in s.items() if k != "label"})
                    for s in preset["strategies"]]
        labels = [r.label for r in runs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"strategy labels must be unique, got {labels}; add label=...")
        sweep = parse_sweep(args.sweep) if args.sweep else preset.get("sweep")
        for value in (sweep[1] if sweep else [None]):
            base_v = base if value is None else {**base, sweep[0]: value}
            SimConfig.from_run_config(base_v)
            for run in runs:
                check_server_only(run.label, run.overrides)
                SimConfig.from_run_config(base_v, run.overrides)
        if sweep and sweep[0] in {k for r in runs for k in r.overrides}:
            raise ValueError(f"--sweep key '{sweep[0]}' is also set by a strategy; sweep a shared key")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or Path("results") / f"compare-{args.preset or 'custom'}"
    backend = args.backend or preset.get("backend", "ray")
    seeds = list(args.seeds or preset.get("seeds") or [None])
    ray_config = {"init_args": {"num_cpus": args.num_cpus}} if args.num_cpus else None
    start = time.perf_counter()
    if not sweep:
        run_seeds(base, runs, seeds, out, backend=backend, ray_config=ray_config)
        written = "table.md and seed-*/" if len(seeds) > 1 else "table.md, results.json, results.csv, accuracy.png"
    else:
        key, values = sweep[0], tuple(str(v) for v in sweep[1])
        points = []
        for value in values:
            out_v = out / f"{key}-{value}"  # e.g. ood-fraction-0.7/seed-3/
            per_seed = run_seeds({**base, key: value}, runs, seeds, out_v, backend=backend, ray_config=ray_config)
            points.append(SweepPoint(float(value), per_seed))
        pairs = _sweep_pairs(preset.get("pairs"), labels)
        setting = describe(SimConfig.from_run_config({**base, key: values[0]})).rsplit(", seed", 1)[0]
        setting = (setting.replace(f" {float(values[0]):.0%} OOD", "") if key == "ood-fraction" else setting)
        setting += (f"; {key} {', '.join(values)}; "
                    f"seeds {', '.join(map(str, seeds)) if seeds != [None] else 'from the config'}")
        text = write_sweep_outputs(out, key, points, labels, pairs, setting)
        print(f"\n{setting}\n\n{text}")
        written = f"sweep.md, sweep.json, sweep.png and {key}-*/"
    print(f"wrote {out}/{written} ({time.perf_counter() - start:.0f} s)")
    return 0


def run_seeds(base: Mapping[str, Any], runs: Sequence[StrategyRun], seeds: Sequence[int | None], out: Path,
              *, backend: str, ray_config: Mapping[str, Any] | None = None) -> list[list[StrategyRun]]:
    """The comparison once per seed (``None``: the config's seed); outputs per seed and a mean ± std table."""
    per_seed: list[list[StrategyRun]] = []
    for seed in seeds:
        base_s = base if seed is None else {**base, "seed": seed}
        runs_s = [StrategyRun(r.label, dict(r.overrides)) for r in runs]
        if backend == "ray":
            run_comparison(base_s, runs_s, backend_config=ray_config)
        else:
            run_comparison_inprocess(base_s, runs_s)
        out_s = out if len(seeds) == 1 else out / f"seed-{seed}"
        table = write_outputs(out_s, base_s, runs_s)
        print(f"\n{describe(SimConfig.from_run_config(base_s))}\n\n{table}", flush=True)
        per_seed.append(runs_s)
    if len(seeds) > 1:
        summary = seeds_table(per_seed, seeds)
        setting = describe(SimConfig.from_run_config(base)).rsplit(", seed", 1)[0]
        atomic_write_text(out / "table.md", f"{setting}, seeds {', '.join(map(str, seeds))}\n\n{summary}")
        print(summary)
    return per_seed


def seeds_table(per_seed: Sequence[Sequence[StrategyRun]], seeds: Sequence[int]) -> str:
    """Final test accuracy per strategy: mean and standard deviation over seeds, and each seed."""
    lines = ["| strategy | final test acc, mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---:|" + "---:|" * len(seeds)]
    for i, run in enumerate(per_seed[0]):
        finals = [runs[i].rows[-1]["test-accuracy"] for runs in per_seed]
        lines.append(f"| {run.label} | {Spread.of(finals).text('.4f')} | "
                     + " | ".join(f"{f:.4f}" for f in finals) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- sweeps


@dataclass
class SweepPoint:
    """One swept value and the comparison's runs for every seed."""

    value: float
    per_seed: list[list[StrategyRun]]

    def finals(self, label: str) -> list[float]:
        """Final test accuracy of strategy ``label``, one per seed."""
        return [next(r for r in runs if r.label == label).rows[-1]["test-accuracy"] for runs in self.per_seed]


def _sweep_pairs(pairs: Sequence[tuple[str, str]] | None, labels: Sequence[str]) -> list[tuple[str, str]]:
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


if __name__ == "__main__":
    sys.exit(main())
