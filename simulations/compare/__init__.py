"""Compare strategies on the same client shards and seed in Flower's simulation engine.

    python -m simulations.compare --preset demo
    python -m simulations.compare --strategy fedavg --strategy fedmedian \\
        --strategy "fedsoup soup-optimizer=adam soup-lr=0.01 label=AME-Adam" \\
        --set attack=cauchy-noise --set attack-fraction=0.2 --out results/robust

Every ``--strategy`` is a strategy name followed by run-config overrides that only
the server sees (``soup-*``, ``stew-*``, ``server-*``, ...) and an optional
``label=``. Everything the clients see (data, partitioning, local training,
attacks, seed) is shared, so all strategies train on identical shards.

Each command writes a fresh run directory ``<out>/<date>T<time>/`` and then points
``<out>/latest`` at it: ``results.json`` and ``results.csv`` (per strategy and
round), ``accuracy.png`` (test accuracy against rounds) and ``table.md`` (final
accuracies, each strategy's rounds time and the shared set-up time).

The package's seams: :mod:`~simulations.compare.presets` (the ready-made
comparisons), :mod:`~simulations.compare.run` (running one comparison),
:mod:`~simulations.compare.report` (its tables, files and plot),
:mod:`~simulations.compare.sweeps` (repeating it per swept value and seed) and
:mod:`~simulations.compare.cli` (the command line).
"""

from simulations.compare.cli import build_parser, main, run_seeds
from simulations.compare.presets import ADAM_STEW, AME_CLIENT_SOUP, CLIENT_KEYS, PRESETS
from simulations.compare.report import describe, markdown_table, seeds_table, write_outputs
from simulations.compare.run import (
    Comparison, RoundProgress, StrategyRun, check_server_only, parse_strategy, run_comparison,
    run_comparison_inprocess,
)
from simulations.compare.sweeps import SweepPoint, parse_sweep, write_sweep_outputs

__all__ = [
    "ADAM_STEW", "AME_CLIENT_SOUP", "CLIENT_KEYS", "PRESETS", "Comparison", "RoundProgress", "StrategyRun",
    "SweepPoint", "build_parser", "check_server_only", "describe", "main", "markdown_table", "parse_strategy",
    "parse_sweep", "run_comparison", "run_comparison_inprocess", "run_seeds", "seeds_table", "write_outputs",
    "write_sweep_outputs",
]
