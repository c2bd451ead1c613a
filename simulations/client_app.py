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
        _, val_set = train_val_split(load_partition(cfg, pid, n), cfg.val_fraction, seed_for(cfg.seed, pid))
        model = make_model(cfg.dataset)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss, acc = evaluate(model, val_set)
        metrics = {"num-examples": len(val_set)}
        if len(val_set):
            metrics.update({"eval-loss": loss, "eval-acc": acc})
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


app = make_client_app()
