"""Flower ServerApp: runs the configured strategy with a centralised test evaluation every round.

``flwr run .`` component ``serverapp``. The strategy is chosen by the run-config
key ``strategy`` (see ``simulations.strategy_factory``); the global model is
evaluated on the held-out test set before round 1 and after every round.
With ``output-dir`` set, per-round metrics (``rounds.json``) and the final model
(``final_model.safetensors``) are written there atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedsoup.atomic import atomic_path, atomic_write_text
from simulations.config import SimConfig
from simulations.data import load_testset
from simulations.models import make_model
from simulations.strategy_factory import build_strategy
from simulations.task import evaluate

RoundsSink = Callable[[list[dict[str, Any]]], None]


def make_evaluate_fn(cfg: SimConfig) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Centralised evaluation of the global model on the test set (Flower's ``evaluate_fn``);
    for the language-model task, of the global adapter on every client's held-out text."""
    if cfg.task == "lm":
        return _lm_evaluate_fn(cfg)
    testset = load_testset(cfg)
    model = make_model(cfg.dataset)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, testset)
        return MetricRecord({"test-loss": loss, "test-accuracy": acc})

    return evaluate_fn


def _lm_evaluate_fn(cfg: SimConfig) -> Callable[[int, ArrayRecord], MetricRecord]:
    from peft import set_peft_model_state_dict

    from simulations import lm_task

    texts = lm_task.texts_of(cfg)
    model = lm_task.adapter_model(cfg, lm_task.base_state(cfg))

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_peft_model_state_dict(model, arrays.to_torch_state_dict())
        return MetricRecord(lm_task.evaluate_texts(model, texts, cfg))

    return evaluate_fn


def initial_arrays(cfg: SimConfig) -> ArrayRecord:
    """Round 0's global model, or for the language-model task round 0's global LoRA adapter
    (the base is trained, or read from its cache, here: before any client needs it)."""
    if cfg.task == "lm":
        from simulations import lm_task

        return ArrayRecord(lm_task.initial_adapter(cfg, lm_task.base_state(cfg)))
    return ArrayRecord(make_model(cfg.dataset, seed=cfg.seed).state_dict())


def rounds_table(result: Any, seconds: Mapping[int, float]) -> list[dict[str, Any]]:
    """One row per round (0 = initial model) from a ``flwr.serverapp.strategy.Result``."""
    rows = []
    for rnd in sorted(result.evaluate_metrics_serverapp):
        row: dict[str, Any] = {"round": rnd}
        row.update(dict(result.evaluate_metrics_serverapp[rnd]))
        train_metrics = result.train_metrics_clientapp.get(rnd)
        if train_metrics is not None:
            row.update({f"clients-{k}": v for k, v in dict(train_metrics).items()})
        eval_metrics = result.evaluate_metrics_clientapp.get(rnd)  # with fraction-evaluate > 0
        if eval_metrics is not None:
            row.update({f"clients-{k}": v for k, v in dict(eval_metrics).items()})
        if rnd in seconds:
            row["elapsed-s"] = round(seconds[rnd], 3)
        rows.append(row)
    return rows


def run_server(grid: Grid, cfg: SimConfig, sink: RoundsSink | None = None, *,
               on_round: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Run ``cfg.strategy`` for ``cfg.num_server_rounds`` rounds; return the per-round rows.

    ``on_round`` is called after each round's evaluation (a progress bar's step).
    """
    torch.set_num_threads(1)
    if cfg.strategy == "central":  # no federation: the pooled clients trained in this process
        from simulations.lm_task import central_rows

        rows = central_rows(cfg, on_round)
        _write_rows(cfg, rows)
        if sink is not None:
            sink(rows)
        return rows
    strategy = build_strategy(cfg, cfg.num_partitions)
    initial = initial_arrays(cfg)
    evaluate_fn = make_evaluate_fn(cfg)
    start = time.perf_counter()
    seconds: dict[int, float] = {}

    def timed_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        seconds[server_round] = time.perf_counter() - start
        metrics = evaluate_fn(server_round, arrays)
        if on_round is not None and server_round > 0:
            on_round()
        return metrics

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.num_server_rounds,
        train_config=ConfigRecord({"local-epochs": cfg.local_epochs}),
        evaluate_fn=timed_evaluate,
    )
    rows = rounds_table(result, seconds)
    if cfg.output_dir:
        _write_rows(cfg, rows)
        final = result.arrays if len(result.arrays) else initial  # no round aggregated
        _write_final(cfg, Path(cfg.output_dir), final)
    if sink is not None:
        sink(rows)
    return rows


def _write_rows(cfg: SimConfig, rows: list[dict[str, Any]]) -> None:
    if not cfg.output_dir:
        return
    record: dict[str, Any] = {"config": cfg.to_run_config(), "rounds": rows}
    if cfg.task == "lm":
        from simulations.lm_corpus import corpus_identity

        record["corpus"] = corpus_identity()
    atomic_write_text(Path(cfg.output_dir) / "rounds.json", json.dumps(record, indent=2))


def _write_final(cfg: SimConfig, out: Path, final: ArrayRecord) -> None:
    """``final_model.safetensors``; for the language-model task a PEFT adapter directory
    ``final_adapter/`` (``adapter_model.safetensors`` + ``adapter_config.json``, loadable with
    ``PeftModel.from_pretrained`` on the cached base)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in final.to_torch_state_dict().items()}
    if cfg.task == "lm":
        from simulations.lm_task import lora_config

        config = lora_config(cfg).to_dict()
        atomic_write_text(out / "final_adapter" / "adapter_config.json",
                          json.dumps(config, indent=2, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
        target = out / "final_adapter" / "adapter_model.safetensors"
    else:
        target = out / "final_model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata={"strategy": cfg.strategy, "format": "pt"})


def make_server_app(overrides: Mapping[str, Any] | None = None, sink: RoundsSink | None = None) -> ServerApp:
    """A ServerApp whose run config is ``DEFAULTS | context.run_config | overrides``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, SimConfig.from_run_config(context.run_config, overrides), sink)

    return app


app = make_server_app()
