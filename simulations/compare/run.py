"""Running a comparison: every strategy, one after the other, over the same simulated clients.

One ``flwr.simulation.run_simulation`` (Ray backend) runs a whole comparison: the
ServerApp runs the strategies in turn over the same SuperNodes, so Ray starts once.
``run_comparison_inprocess`` runs the same ClientApp without Ray (identical numbers).

Before the first strategy, a warm-up pays what would otherwise land in the first
strategy's time: Ray's workers loading the ClientApp and their shards (one evaluation
of the initial model on every client) and the compilation of the merge kernel. Its
time is reported as the comparison's set-up, apart from each strategy's rounds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsoup.report import counted
from simulations.compare.presets import CLIENT_KEYS
from simulations.config import SimConfig

__all__ = [
    "StrategyRun", "Comparison", "RoundProgress", "parse_strategy", "parse_assignments", "check_server_only",
    "run_comparison", "run_comparison_inprocess", "flower_logs",
]

OnRound = Callable[[], None]
OnStrategy = Callable[["StrategyRun"], None]


@dataclass
class StrategyRun:
    """One compared strategy: its label, its server-side overrides and, once run, its rows."""

    label: str
    overrides: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = float("nan")  # the strategy's rounds (and evaluations), set-up excluded


@dataclass
class Comparison:
    """The runs of one comparison and its shared set-up time (simulation start, warm-up)."""

    runs: list[StrategyRun]
    setup_seconds: float = float("nan")


class RoundProgress:
    """One tqdm bar over every round of every strategy (× seed × swept value) of a command.

    Shown only on a terminal (``disable=None``: never in a log file, a pipe or captured
    output) and never with ``quiet``.
    """

    def __init__(self, total: int, *, quiet: bool = False, file=None) -> None:
        self._bar = None
        self._quiet = quiet
        if not quiet and total > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="strategy × seed × round", unit="round", dynamic_ncols=True,
                             file=sys.stderr if file is None else file, disable=None)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def strategy_done(self, run: StrategyRun) -> None:
        """One line per finished strategy on stdout (also in a log or a pipe; never with ``quiet``),
        e.g. ``FedAvg: 20 rounds in 19.8 s, final test accuracy 0.9289``."""
        if self._quiet:
            return
        from tqdm import tqdm

        tqdm.write(strategy_line(run), file=sys.stdout)  # above the bar, which stays at the bottom

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def strategy_line(run: StrategyRun) -> str:
    """A finished strategy in one line: its rounds, their time and its final test metric."""
    rounds = [r for r in run.rows if r.get("round", 1) > 0]
    text = f"{run.label}: {counted(len(rounds), 'round')} in {run.seconds:.1f} s"
    last = run.rows[-1] if run.rows else {}
    for key, name, fmt in (("test-accuracy", "test accuracy", ".4f"), ("test-perplexity", "test perplexity", ".3f")):
        if key in last:
            return f"{text}, final {name} {last[key]:{fmt}}"
    return text


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fedsoup soup-lr=0.01 label=X"`` -> ``("X", {"strategy": "fedsoup", "soup-lr": "0.01"})``."""
    words = shlex.split(spec)
    if not words:
        raise ValueError("empty --strategy")
    overrides: dict[str, Any] = {"strategy": words[0]}
    overrides.update(parse_assignments(words[1:], "--strategy"))
    label = overrides.pop("label", words[0])
    return str(label), overrides


def parse_assignments(words: Sequence[str], flag: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``."""
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


def strategy_configs(base: Mapping[str, Any], runs: Sequence[StrategyRun]) -> list[SimConfig]:
    """Each run's validated config (before anything starts)."""
    configs = []
    for run in runs:
        check_server_only(run.label, run.overrides)
        configs.append(SimConfig.from_run_config(base, run.overrides))
    return configs


def compile_kernels() -> None:
    """A tiny AME-Adam merge: numba compiles (or loads from its cache) the fused kernel now."""
    import torch

    import fedsoup

    fedsoup.merge([{"w": torch.zeros(4)}, {"w": torch.ones(4)}], optimizer="adam", lr=0.1)


def warm_up_clients(grid, cfg: SimConfig) -> None:
    """One evaluation of the initial model on every node: workers load the ClientApp and their shards."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from simulations.server_app import initial_arrays

    arrays = initial_arrays(cfg)
    messages = [
        Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 0})}),
                dst_node_id=node, message_type=MessageType.EVALUATE)
        for node in grid.get_node_ids()
    ]
    grid.send_and_receive(messages)


def _run_strategies(grid, runs: Sequence[StrategyRun], configs: Sequence[SimConfig], on_round: OnRound | None,
                    on_strategy: OnStrategy | None = None) -> None:
    from simulations.server_app import run_server

    for run, cfg in zip(runs, configs):
        logging.getLogger("flwr").info("=== %s ===", run.label)
        start = time.perf_counter()
        run.rows = run_server(grid, cfg, on_round=on_round)
        run.seconds = time.perf_counter() - start
        if on_strategy is not None:
            on_strategy(run)


def run_comparison(
    base: Mapping[str, Any],
    runs: list[StrategyRun],
    *,
    backend_config: Mapping[str, Any] | None = None,
    on_round: OnRound | None = None,
    on_strategy: OnStrategy | None = None,
) -> Comparison:
    """Run every strategy in ``runs`` in one Ray simulation; fills ``run.rows`` and ``run.seconds``."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from flwr.simulation import run_simulation

    from simulations.client_app import make_client_app

    base_cfg = SimConfig.from_run_config(base)  # validate before starting Ray
    configs = strategy_configs(base, runs)
    comparison = Comparison(runs)
    started = time.perf_counter()

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        warm_up_clients(grid, base_cfg)
        compile_kernels()
        comparison.setup_seconds = time.perf_counter() - started
        _run_strategies(grid, runs, configs, on_round, on_strategy)

    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False},
    }
    # Ray's FutureWarning "will no longer override accelerator visible devices env var if
    # num_gpus=0" asks for this opt-in to its future behaviour; clients here take no GPU, so
    # nothing changes but the warning printed by every simulation (a user's own value wins).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    for key, value in (backend_config or {}).items():
        if isinstance(value, Mapping):
            backend.setdefault(key, {}).update(value)
        else:
            backend[key] = value
    with _without_run_simulation_deprecation():
        run_simulation(
            server_app=server_app,
            client_app=make_client_app(base),
            num_supernodes=base_cfg.num_partitions,
            backend_config=backend,
        )
    missing = [r.label for r in runs if not r.rows]
    if missing:
        raise RuntimeError(f"the simulation ended without results for: {', '.join(missing)}")
    return comparison


class _RunSimulationDeprecation(logging.Filter):
    """Drops Flower's one "DEPRECATED FEATURE: The `run_simulation` function ..." log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            isinstance(record.msg, str) and record.msg.startswith("DEPRECATED FEATURE")
            and isinstance(record.args, tuple) and record.args
            and str(record.args[0]).startswith("The `run_simulation` function is deprecated")
        )


@contextlib.contextmanager
def _without_run_simulation_deprecation():
    """Silence that one deprecation while ``run_simulation`` runs, and nothing else.

    Why: its replacement, ``flwr run``, starts a SuperLink and loads the apps from a
    project directory in other processes; a comparison runs ServerApp objects built in
    this process (the strategies in turn, results collected in memory), which only
    ``run_simulation`` can. Every other Flower message, deprecations included, still shows.
    """
    from flwr.common.logger import FLOWER_LOGGER

    only_this = _RunSimulationDeprecation()
    FLOWER_LOGGER.addFilter(only_this)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(only_this)


class _ExpectedSkipOfFederatedEvaluation(logging.Filter):
    """Drops Flower's "fraction_evaluate is set to 0.0. Federated evaluation will be skipped." warning:
    the comparisons evaluate every global model on the server's test set and skip client-side
    evaluation on purpose (``fraction-evaluate`` 0 by default)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("fraction_evaluate is set to 0.0."))


@contextlib.contextmanager
def flower_logs(verbose: bool):
    """Flower's logger while a command runs: with ``verbose`` as Flower sets it (INFO lines per
    round: sampling, aggregated metrics, the final dumps); otherwise warnings and errors only, less
    the expected skip of federated evaluation. Restored on exit.

    Import flwr first: importing it sets its logger to DEBUG, which would undo a level set earlier.
    """
    from flwr.common.logger import FLOWER_LOGGER

    if verbose:
        yield
        return
    level, expected = FLOWER_LOGGER.level, _ExpectedSkipOfFederatedEvaluation()
    FLOWER_LOGGER.setLevel(logging.WARNING)
    FLOWER_LOGGER.addFilter(expected)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(expected)
        FLOWER_LOGGER.setLevel(level)


def run_comparison_inprocess(base: Mapping[str, Any], runs: list[StrategyRun], *,
                             on_round: OnRound | None = None, on_strategy: OnStrategy | None = None) -> Comparison:
    """The same comparison without Ray: clients are called in turn in this process.

    Uses ``strategies.inprocess.InProcessGrid`` (a Flower Grid that calls the
    ClientApp in this process) and the very same ClientApp; results are identical
    to the Ray backend (every client's update is a pure function of the global
    model, its shard and the seed). Meant for quick sweeps and tests.
    """
    from flwr.app import Context, RecordDict

    from simulations.client_app import make_client_app
    from strategies.inprocess import InProcessGrid, serverapp_identity

    started = time.perf_counter()
    base_cfg = SimConfig.from_run_config(base)
    configs = strategy_configs(base, runs)
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

    comparison = Comparison(runs)
    with serverapp_identity():
        compile_kernels()
        comparison.setup_seconds = time.perf_counter() - started
        _run_strategies(InProcessGrid(node_ids, client), runs, configs, on_round, on_strategy)
    return comparison
