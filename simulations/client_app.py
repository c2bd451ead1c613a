"""Flower ClientApp: local training on the client's shard (``flwr run .`` component ``clientapp``).

Node config (set by Flower's simulation engine, or by ``flower-supernode
--node-config`` in a deployment): ``partition-id`` and ``num-partitions``.
Everything else comes from the run config (``simulations.config.SimConfig``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from simulations.attacks import attack_update, malicious_partitions
from simulations.config import SimConfig
from simulations.data import load_partition, train_val_split
from simulations.models import make_model
from simulations.task import evaluate, seed_for, train


def _node(context: Context, cfg: SimConfig) -> tuple[int, int]:
    try:
        pid = int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError(
            "node config lacks 'partition-id': start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None
    return pid, int(context.node_config.get("num-partitions", cfg.num_partitions))


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``DEFAULTS | context.run_config | overrides``.

    ``overrides`` lets ``simulations.compare`` (which runs through
    ``flwr.simulation.run_simulation``, where the run config is empty) configure runs.
    """
    app = ClientApp()

    def setup(context: Context) -> tuple[SimConfig, int, int]:
        torch.set_num_threads(1)  # one core per simulated client
        cfg = SimConfig.from_run_config(context.run_config, overrides)
        pid, n = _node(context, cfg)
        return cfg, pid, n

    @app.train()
    def train_fn(msg: Message, context: Context) -> Message:
        cfg, pid, n = setup(context)
        if cfg.task == "lm":
            return _lm_train(msg, cfg, pid)
        server_round = int(msg.content["config"].get("server-round", 0))
        train_set, val_set = train_val_split(load_partition(cfg, pid, n), cfg.val_fraction, seed_for(cfg.seed, pid))
        model = make_model(cfg.dataset)
        global_state = msg.content["arrays"].to_torch_state_dict()
        model.load_state_dict(global_state)
        loss = train(model, train_set, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                     momentum=cfg.momentum, seed=seed_for(cfg.seed, server_round, pid))
        _, val_acc = evaluate(model, val_set)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        malicious = pid in malicious_partitions(n, cfg.attack_fraction, cfg.seed)
        if malicious and cfg.attack != "none":
            state = attack_update(state, global_state, cfg.attack, cfg.attack_scale,
                                  seed_for(cfg.seed, server_round, pid, 7))
        metrics = {"train-loss": loss, "num-examples": len(train_set)}
        if len(val_set):
            metrics["val-acc"] = val_acc
        # The partition id is a stable name for this client (Ray draws node ids at random):
        # FedSoup breaks ties in its visiting order by it. In a ConfigRecord, no strategy
        # averages it into the round's metrics.
        node = ConfigRecord({"partition-id": pid})
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics), "node": node})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_fn(msg: Message, context: Context) -> Message:
        cfg, pid, n = setup(context)
        if cfg.task == "lm":
            return _lm_evaluate(msg, cfg, pid)
        _, val_set = train_val_split(load_partition(cfg, pid, n), cfg.val_fraction, seed_for(cfg.seed, pid))
        model = make_model(cfg.dataset)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss, acc = evaluate(model, val_set)
        metrics = {"num-examples": len(val_set)}
        if len(val_set):
            metrics.update({"eval-loss": loss, "eval-acc": acc})
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _lm_train(msg: Message, cfg: SimConfig, pid: int) -> Message:
    """The language-model task: fine-tune the global LoRA adapter on this client's package group and
    reply with ``get_peft_model_state_dict`` as an ArrayRecord (as Flower's FlowerTune clients do)."""
    from simulations import lm_task
    from simulations.lm_corpus import CLIENT_GROUPS, read_group

    server_round = int(msg.content["config"].get("server-round", 0))
    text = read_group(CLIENT_GROUPS[pid], cfg.lm_heldout)
    model = lm_task.adapter_model(cfg, lm_task.base_state(cfg), msg.content["arrays"].to_torch_state_dict())
    loss = lm_task.train_steps(model, [lm_task.as_tokens(text.train)], steps=cfg.lm_local_steps, lr=cfg.lr,
                               batch=cfg.batch_size, seq_len=cfg.lm_seq_len,
                               seed=seed_for(cfg.seed, server_round, pid))
    metrics = {"train-loss": loss, "num-examples": len(text.train)}
    content = RecordDict({"arrays": ArrayRecord(lm_task.adapter_state(model)), "metrics": MetricRecord(metrics),
                          "node": ConfigRecord({"partition-id": pid})})
    return Message(content=content, reply_to=msg)


def _lm_evaluate(msg: Message, cfg: SimConfig, pid: int) -> Message:
    """Perplexity of the global adapter on this client's held-out text."""
    import math

    from simulations import lm_task
    from simulations.lm_corpus import CLIENT_GROUPS, read_group

    text = read_group(CLIENT_GROUPS[pid], cfg.lm_heldout)
    model = lm_task.adapter_model(cfg, lm_task.base_state(cfg), msg.content["arrays"].to_torch_state_dict())
    nll = lm_task.mean_nll(model, text.heldout, cfg.lm_seq_len, cfg.lm_eval_bytes)
    metrics = {"num-examples": min(len(text.heldout), cfg.lm_eval_bytes), "eval-loss": nll,
               "eval-perplexity": math.exp(nll)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


app = make_client_app()
