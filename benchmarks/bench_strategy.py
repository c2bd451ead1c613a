"""Benchmark ``aggregate_train``: FedSoup against Flower's FedAvg on the same replies.

Targets: default ``FedSoup()`` at most 1.1x FedAvg's time (issue 4); FedSoup with an
Adam ClientSoup of 5 epochs, batch 2 (the fused AME kernel), at most 2.5x (issue 9). Every strategy aggregates the same
10 replies of a ~4M-parameter float32 model; runs are interleaved (A, B, C, A, B, C,
...) so that machine load hits all of them alike, and the median is reported.

``--busy`` is the busy-host case (issue 21): the same comparison while a CPU-bound
process keeps one core of this process's CPU set busy, with torch's default thread
count (``--threads 0``); the targets are the same. FedSoup chooses its aggregation's
threads from the idle cores (``strategies.threads``); the row "threads not scoped"
is FedSoup() told that the host is idle, i.e. the behaviour before that choice.

    .venv/bin/python benchmarks/bench_strategy.py            # 10 replies, 4M params
    .venv/bin/python benchmarks/bench_strategy.py --repeats 9 --params 1e6
    .venv/bin/python benchmarks/bench_strategy.py --busy --params 1e6    # torch's default threads

``--lora`` is the federated-LoRA case (issue 27): one round of 50 PEFT adapter replies, 24
target modules of 1024 x 1024 at r = 16 (``--replies``, ``--modules``, ``--dim``,
``--rank``). Targets: ``FedSoup(adapter_config=...)`` (the ``factors`` mode, the default)
at most 1.1x Flower's FedAvg on the same replies; the ``products`` mode with its randomized
SVD back to rank 16 at most 10x. The clients either drift 10% from the global adapter (the
default: a round's clients start from it) or are independent random adapters
(``--clients independent``: the flattest spectrum, the SVD's slowest case). The row
``products + stew=fedadam`` steps on the dense ``ΔW`` and prints its optimizer state.

    .venv/bin/python benchmarks/bench_strategy.py --lora --repeats 3
    .venv/bin/python benchmarks/bench_strategy.py --lora --repeats 3 --clients independent
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import statistics
import time
from unittest import mock

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg

from strategies import FedSoup
from strategies import threads as strategy_threads
from strategies.inprocess import InProcessGrid, serverapp_identity, train_content, reply


def model_shapes(params: float) -> dict[str, tuple[int, ...]]:
    """A small MLP-like layout with about ``params`` parameters (4M by default)."""
    width = int((params / 4) ** 0.5)
    return {
        "fc1.weight": (2 * width, width),
        "fc1.bias": (2 * width,),
        "fc2.weight": (width, 2 * width),
        "fc2.bias": (width,),
        "bn.running_mean": (width,),
        "bn.num_batches_tracked": (),
    }


def make_round(params: float, replies: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = model_shapes(params)

    def model(scale: float) -> dict[str, np.ndarray]:
        return {
            k: np.asarray(rng.integers(0, 100), dtype=np.int64) if k.endswith("num_batches_tracked")
            else (scale * rng.standard_normal(s, dtype=np.float32))
            for k, s in shapes.items()
        }

    global_model = model(1.0)
    arrays = ArrayRecord({k: Array(v) for k, v in global_model.items()})
    contents = {
        node: train_content({k: v + model(0.1)[k] for k, v in global_model.items()}, num_examples=100 + node)
        for node in range(1, replies + 1)
    }
    num_params = sum(int(np.prod(s)) for s in shapes.values())
    return arrays, contents, num_params


PEFT_PREFIX = "base_model.model.model.layers."


def make_adapter_round(replies: int, modules: int, dim: int, rank: int, clients: str, seed: int = 0):
    """A global PEFT adapter (``modules`` LoRA pairs on ``dim x dim`` layers) and ``replies`` client adapters."""
    rng = np.random.default_rng(seed)
    names = [f"{PEFT_PREFIX}{m // 4}.self_attn.{('q', 'k', 'v', 'o')[m % 4]}_proj" for m in range(modules)]

    def factors() -> dict[str, np.ndarray]:
        out = {}
        for name in names:
            out[name + ".lora_A.weight"] = rng.standard_normal((rank, dim), dtype=np.float32) / np.float32(dim ** 0.5)
            out[name + ".lora_B.weight"] = rng.standard_normal((dim, rank), dtype=np.float32) * np.float32(0.01)
        return out

    global_adapter = factors()
    arrays = ArrayRecord({k: Array(v) for k, v in global_adapter.items()})
    contents = {}
    for node in range(1, replies + 1):
        if clients == "independent":
            model = factors()
        else:
            model = {k: v + 0.1 * np.float32(v.std()) * rng.standard_normal(v.shape, dtype=np.float32)
                     for k, v in global_adapter.items()}
        contents[node] = train_content(model, num_examples=100 + node)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    return arrays, contents, config


def stew_state_bytes(strategy) -> int:
    """The bytes of a FedSoup ServerStew's optimizer state (0 before its first step)."""
    optimizer = strategy.server_stew.optimizer
    if optimizer is None:
        return 0
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def interleaved_times(candidates: dict, arrays: ArrayRecord, contents: dict, args, on_run=None) -> dict[str, list[float]]:
    """Seconds of ``aggregate_train`` per candidate: one untimed warm-up each (imports, allocator,
    thread pools), then ``args.repeats`` rounds of A, B, C, ... so that machine load hits all alike.
    ``on_run(name, strategy, round_metrics)`` sees every timed run."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for make in candidates.values():
        time_aggregate(make(), arrays, contents, args.threads)
    for _ in range(args.repeats):
        for name, make in candidates.items():
            strategy, round_metrics = make(), {}
            times[name].append(time_aggregate(strategy, arrays, contents, args.threads, round_metrics))
            if on_run is not None:
                on_run(name, strategy, round_metrics)
    return times


def _verdict(ratio: float, target: float | None) -> str:
    return "" if target is None else f"<= {target:g}x {'OK' if ratio <= target else 'MISSED'}"


def ratio_rows(times: dict[str, list[float]], targets: dict[str, float], base: str = "Flower FedAvg"):
    """Per candidate, in order: its name, median seconds, ratio to ``base``'s median, verdict against its target."""
    reference = statistics.median(times[base])
    for name, values in times.items():
        median = statistics.median(values)
        yield name, median, median / reference, _verdict(median / reference, targets.get(name))


def lora_main(args) -> None:
    """The ``--lora`` benchmark (module docstring)."""
    arrays, contents, config = make_adapter_round(args.replies, args.modules, args.dim, args.rank, args.clients)
    candidates = {
        "Flower FedAvg": lambda: FedAvg(),
        "FedSoup factors (default)": lambda: FedSoup(adapter_config=config),
        "FedSoup products (SVD to r)": lambda: FedSoup(adapter_config=config, soup={"lora": "products"}),
    }
    if not args.no_stew:
        candidates["FedSoup products + stew=fedadam"] = lambda: FedSoup(
            adapter_config=config, soup={"lora": "products"}, stew={"optimizer": "fedadam", "lr": 0.01})
    metrics, state = {}, {}

    def record_figures(name: str, strategy, round_metrics: dict) -> None:
        metrics[name] = round_metrics
        if isinstance(strategy, FedSoup):
            state[name] = stew_state_bytes(strategy)

    with serverapp_identity():
        times = interleaved_times(candidates, arrays, contents, args, record_figures)
    targets = {"FedSoup factors (default)": 1.1, "FedSoup products (SVD to r)": 10.0}
    reply_mb = sum(c["arrays"].count_bytes() for c in contents.values()) / 1e6
    print(f"aggregate_train of {args.replies} adapter replies ({args.clients} clients), {args.modules} modules of "
          f"{args.dim}x{args.dim} at r={args.rank} ({reply_mb:.0f} MB of replies), median of {args.repeats} "
          f"interleaved runs, torch threads: {args.threads or 'default'}, load {os.getloadavg()[0]:.2f}")
    print(f"{'strategy':<34} {'median s':>9} {'x FedAvg':>9}  {'target':<13} {'stew state':>10}  round metrics")
    for name, median, ratio, verdict in ratio_rows(times, targets):
        shown = {k.removeprefix("fedsoup-lora-"): round(v, 4) for k, v in metrics.get(name, {}).items()
                 if k.startswith("fedsoup-lora-")}
        stew = f"{state[name] / 1e6:.1f} MB" if name in state else ""
        print(f"{name:<34} {median:>9.3f} {ratio:>9.2f}  {verdict:<13} {stew:>10}  {shown}")


def time_aggregate(strategy, arrays: ArrayRecord, contents: dict, threads: int = 0, metrics: dict | None = None) -> float:
    """Seconds for one ``aggregate_train`` (``configure_train`` is done first, untimed).

    ``threads > 0`` sets torch's intra-op threads again first, so that no candidate
    runs on a thread count another one left behind.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    grid = InProcessGrid(sorted(contents))
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    replies = [reply(m, contents[m.metadata.dst_node_id]) for m in instructions]
    start = time.perf_counter()
    out, round_metrics = strategy.aggregate_train(1, replies)
    elapsed = time.perf_counter() - start
    assert out is not None
    if metrics is not None and round_metrics is not None:
        metrics.update(round_metrics)
    return elapsed


def _spin(core: int | None) -> None:
    """A CPU-bound loop, pinned to ``core`` where the OS allows it."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    while True:
        pass


@contextlib.contextmanager
def busy_core():
    """One CPU-bound process on one core of this process's CPU set, for the block."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [None]
    process = multiprocessing.get_context("fork").Process(target=_spin, args=(cores[-1],), daemon=True)
    process.start()
    try:
        time.sleep(0.5)  # let it reach the run queue
        yield
    finally:
        process.terminate()
        process.join()


class _Unscoped:
    """``FedSoup()`` as if the host were idle: the aggregation keeps every thread torch has."""

    def __init__(self) -> None:
        self.strategy = FedSoup()

    def __getattr__(self, name):
        return getattr(self.strategy, name)

    def aggregate_train(self, *args, **kwargs):
        with mock.patch.object(strategy_threads, "busy_cores", lambda: 0.0):
            return self.strategy.aggregate_train(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=4e6, help="model size (default 4e6)")
    parser.add_argument("--replies", type=int, default=None, help="client replies per round (default 10; --lora 50)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per strategy (median; default 7)")
    parser.add_argument("--lora", action="store_true", help="the federated-LoRA case (issue 27)")
    parser.add_argument("--modules", type=int, default=24, help="--lora: LoRA target modules (default 24)")
    parser.add_argument("--dim", type=int, default=1024, help="--lora: d_out = d_in of each module (default 1024)")
    parser.add_argument("--rank", type=int, default=16, help="--lora: r (default 16)")
    parser.add_argument("--clients", choices=("drift", "independent"), default="drift",
                        help="--lora: clients drift 10%% from the global adapter (default) or are independent")
    parser.add_argument("--no-stew", action="store_true", help="--lora: skip the products + fedadam row")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default 1: Flower's numpy FedAvg runs on one core too; with --busy 0, "
        "torch's default, the issue-21 case; 0 = torch's default)",
    )
    parser.add_argument(
        "--busy", action="store_true", help="keep one core busy with another process while timing (issue 21)"
    )
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 0 if args.busy else 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # per-round INFO lines would be timed too
    if args.lora:
        args.replies = 50 if args.replies is None else args.replies
        return lora_main(args)
    args.replies = 10 if args.replies is None else args.replies

    arrays, contents, num_params = make_round(args.params, args.replies)
    candidates = {
        "Flower FedAvg": lambda: FedAvg(),
        "FedSoup() (defaults)": lambda: FedSoup(),
        "FedSoup(soup=Adam, 5 epochs, batch 2)": lambda: FedSoup(
            soup={"optimizer": "adam", "lr": 1e-2, "epochs": 5, "batch_size": 2}
        ),
        "Flower FedAdam": lambda: FedAdam(eta=0.1),
        "FedSoup(stew=fedadam)": lambda: FedSoup(stew={"optimizer": "fedadam", "lr": 0.1}),
    }
    if args.busy:
        candidates["FedSoup() (threads not scoped)"] = _Unscoped
    with serverapp_identity(), (busy_core() if args.busy else contextlib.nullcontext()):
        times = interleaved_times(candidates, arrays, contents, args)

    targets = {"FedSoup() (defaults)": 1.1, "FedSoup(soup=Adam, 5 epochs, batch 2)": 2.5}
    print(f"aggregate_train of {args.replies} replies, {num_params / 1e6:.2f}M params (float32), "
          f"median of {args.repeats} interleaved runs, torch threads: {args.threads or 'default'}"
          f"{', one core kept busy by another process' if args.busy else ''}, load {os.getloadavg()[0]:.2f}")
    print(f"{'strategy':<40} {'median s':>9} {'x FedAvg':>9}  target")
    for name, median, ratio, verdict in ratio_rows(times, targets):
        print(f"{name:<40} {median:>9.4f} {ratio:>9.2f}  {verdict}")


if __name__ == "__main__":
    main()
