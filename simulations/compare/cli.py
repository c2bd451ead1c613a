"""``python -m simulations.compare``: the command line over run / report / sweeps."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsoup.atomic import atomic_write_text
from fedsoup.report import counted
from simulations.compare.presets import PRESETS
from simulations.compare.report import describe, seeds_table, write_outputs
from simulations.compare.run import (
    Comparison, OnRound, OnStrategy, RoundProgress, StrategyRun, check_server_only, flower_logs, parse_assignments,
    parse_strategy, run_comparison, run_comparison_inprocess,
)
from simulations.compare.sweeps import SweepPoint, parse_sweep, sweep_pairs, write_sweep_outputs
from simulations.config import SimConfig
from simulations.run_dirs import fresh_run_dir, link_latest

__all__ = ["build_parser", "main", "run_seeds", "run_sweep"]


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
                   help="where runs go: each run writes a fresh OUT/<date>T<time>/ and links OUT/latest "
                        "to it (default OUT: results/compare-<preset or custom>)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="repeat the comparison for these seeds (shards, inits and batches all change) "
                        "and add a mean ± std table (default: the preset's seeds, else the config's seed)")
    p.add_argument("--backend", choices=("ray", "inprocess"), default=None,
                   help="ray: Flower's simulation engine; inprocess: no Ray, one client "
                        "after the other (same numbers, for quick sweeps). Default: the preset's, else ray")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs Ray may use (default: all); each client takes one")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("-q", "--quiet", action="store_true",
                       help="no progress (bar and one line per strategy); tables and paths are still printed")
    shown.add_argument("-v", "--verbose", action="store_true",
                       help="also Flower's own logs: per-round sampling and metrics, final dumps "
                            "(default: Flower's warnings and errors only)")
    return p


def _runs_of(preset: Mapping[str, Any], specs: Sequence[str]) -> list[StrategyRun]:
    if specs:
        return [StrategyRun(*parse_strategy(s)) for s in specs]
    return [StrategyRun(str(s.get("label", s["strategy"])), {k: v for k, v in s.items() if k != "label"})
            for s in preset["strategies"]]


def _check(base: Mapping[str, Any], runs: Sequence[StrategyRun], sweep: tuple[str, Sequence[Any]] | None) -> None:
    """Every config of the command, validated before anything runs (raises ValueError)."""
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"strategy labels must be unique, got {labels}; add label=...")
    for value in (sweep[1] if sweep else [None]):
        base_v = base if value is None else {**base, sweep[0]: value}
        SimConfig.from_run_config(base_v)
        for run in runs:
            check_server_only(run.label, run.overrides)
            SimConfig.from_run_config(base_v, run.overrides)
    if sweep and sweep[0] in {k for r in runs for k in r.overrides}:
        raise ValueError(f"--sweep key '{sweep[0]}' is also set by a strategy; sweep a shared key")


def _total_rounds(base: Mapping[str, Any], runs: Sequence[StrategyRun], sweep: tuple[str, Sequence[str]] | None,
                  seeds: Sequence[int | None]) -> int:
    """Rounds of every strategy × seed (× swept value): the progress bar's total."""
    bases = [{**base, sweep[0]: value} for value in sweep[1]] if sweep else [base]
    return len(seeds) * sum(SimConfig.from_run_config(b, r.overrides).num_server_rounds for b in bases for r in runs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("FLWR_HOME", str(Path.cwd() / ".flwr"))
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    preset = PRESETS.get(args.preset or "", {"base": {}, "strategies": [{"strategy": "fedavg"}]})
    try:
        base = {**preset["base"], **parse_assignments(args.set, "--set")}
        runs = _runs_of(preset, args.strategy)
        sweep = parse_sweep(args.sweep) if args.sweep else preset.get("sweep")
        _check(base, runs, sweep)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sweep = (sweep[0], tuple(str(v) for v in sweep[1])) if sweep else None
    seeds = list(args.seeds or preset.get("seeds") or [None])
    out = fresh_run_dir(args.out or Path("results") / f"compare-{args.preset or 'custom'}")
    print(f"writing to {out}", flush=True)
    total = _total_rounds(base, runs, sweep, seeds)
    progress = RoundProgress(total, quiet=args.quiet)
    options = {"backend": args.backend or preset.get("backend", "ray"),
               "ray_config": {"init_args": {"num_cpus": args.num_cpus}} if args.num_cpus else None,
               "on_round": progress.step, "on_strategy": progress.strategy_done}
    if not args.quiet:
        print(f"running {counted(len(runs), 'strategy', 'strategies')} ({counted(total, 'round')} in all, "
              f"{options['backend']} backend; set-up first: starting the simulation, the clients loading their "
              f"shards)", flush=True)
    start = time.perf_counter()
    with flower_logs(args.verbose), contextlib.closing(progress):
        if sweep:
            written = run_sweep(base, runs, seeds, out, sweep, preset.get("pairs"), **options)
        else:
            run_seeds(base, runs, seeds, out, **options)
            plot = "perplexity.png" if SimConfig.from_run_config(base).task == "lm" else "accuracy.png"
            written = "table.md and seed-*/" if len(seeds) > 1 else f"table.md, results.json, results.csv, {plot}"
    link_latest(out)
    print(f"wrote {out}/{written} ({time.perf_counter() - start:.0f} s)")
    return 0


def run_sweep(base: Mapping[str, Any], runs: Sequence[StrategyRun], seeds: Sequence[int | None], out: Path,
              sweep: tuple[str, Sequence[str]], pairs: Sequence[tuple[str, str]] | None, **run_options: Any) -> str:
    """The comparison per swept value (each over ``seeds``) in ``out/<key>-<value>/``, then the sweep's
    tables and plot in ``out``; returns what was written."""
    key, values = sweep
    points = []
    for value in values:
        per_seed = run_seeds({**base, key: value}, runs, seeds, out / f"{key}-{value}", **run_options)
        points.append(SweepPoint(float(value), per_seed))
    labels = [r.label for r in runs]
    setting = sweep_setting(base, key, values, seeds)
    text = write_sweep_outputs(out, key, points, labels, sweep_pairs(pairs, labels), setting)
    print(f"\n{setting}\n\n{text}")
    return f"sweep.md, sweep.json, sweep.png and {key}-*/"


def sweep_setting(base: Mapping[str, Any], key: str, values: Sequence[str], seeds: Sequence[int | None]) -> str:
    """The shared setting of a sweep in one line (without the swept key's own value)."""
    setting = describe(SimConfig.from_run_config({**base, key: values[0]})).rsplit(", seed", 1)[0]
    if key == "ood-fraction":
        setting = setting.replace(f" {float(values[0]):.0%} OOD", "")
    return (f"{setting}; {key} {', '.join(values)}; "
            f"seeds {', '.join(map(str, seeds)) if list(seeds) != [None] else 'from the config'}")


def run_seeds(base: Mapping[str, Any], runs: Sequence[StrategyRun], seeds: Sequence[int | None], out: Path,
              *, backend: str, ray_config: Mapping[str, Any] | None = None,
              on_round: OnRound | None = None, on_strategy: OnStrategy | None = None) -> list[list[StrategyRun]]:
    """The comparison once per seed (``None``: the config's seed); outputs per seed and a mean ± std table."""
    per_seed: list[list[StrategyRun]] = []
    for seed in seeds:
        base_s = base if seed is None else {**base, "seed": seed}
        runs_s = [StrategyRun(r.label, dict(r.overrides)) for r in runs]
        comparison: Comparison
        if backend == "ray":
            comparison = run_comparison(base_s, runs_s, backend_config=ray_config, on_round=on_round,
                                        on_strategy=on_strategy)
        else:
            comparison = run_comparison_inprocess(base_s, runs_s, on_round=on_round, on_strategy=on_strategy)
        out_s = out if len(seeds) == 1 else out / f"seed-{seed}"
        table = write_outputs(out_s, base_s, comparison)
        print(f"\n{describe(SimConfig.from_run_config(base_s))}\n\n{table}", flush=True)
        per_seed.append(runs_s)
    if len(seeds) > 1 and SimConfig.from_run_config(base).task == "lm":
        _write_lm_seeds(out, base, per_seed, seeds)
    elif len(seeds) > 1:
        summary = seeds_table(per_seed, seeds)
        setting = describe(SimConfig.from_run_config(base)).rsplit(", seed", 1)[0]
        atomic_write_text(out / "table.md", f"{setting}, seeds {', '.join(map(str, seeds))}\n\n{summary}")
        print(summary)
    return per_seed


def _write_lm_seeds(out: Path, base: Mapping[str, Any], per_seed: Sequence[Sequence[StrategyRun]],
                    seeds: Sequence[int | None]) -> None:
    """The language-model comparison over seeds: ``table.md`` (mean ± std), ``summary.json``,
    ``perplexity.png`` with error bars."""
    import json

    from simulations.compare.lm_report import describe_lm, lm_seeds_table, plot_perplexity_seeds, seeds_summary
    from simulations.lm_corpus import corpus_identity

    corpus = corpus_identity()
    setting = describe_lm(SimConfig.from_run_config(base), corpus).rsplit(", seed", 1)[0]
    setting += f", seeds {', '.join(map(str, seeds))}"
    summary = lm_seeds_table(per_seed, [s for s in seeds if s is not None])
    atomic_write_text(out / "table.md", f"{setting}\n\n{summary}")
    atomic_write_text(out / "summary.json", json.dumps(
        {"setting": setting, "corpus": corpus, "seeds": list(seeds), "strategies": seeds_summary(per_seed)}, indent=2))
    plot_perplexity_seeds(out / "perplexity.png", per_seed, setting)
    print(summary)