"""End to end: FedSoup in Flower's simulation engine improves a model over rounds.

A ServerApp and a ClientApp defined here (a tiny torch classifier, 4 clients on
generated data) run with ``flwr.simulation.run_simulation``; the server uses an AME
ClientSoup ordered by the clients' validation accuracy and an adaptive (FedAdam)
ServerStew. One client sends NaNs in round 2: the round goes on without it.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

NUM_CLIENTS = 4
NUM_ROUNDS = 3
NUM_CLASSES = 3
NUM_FEATURES = 8
NAN_CLIENT, NAN_ROUND = 3, 2


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(NUM_FEATURES, 16),
        torch.nn.BatchNorm1d(16),  # brings an int64 buffer (num_batches_tracked) along
        torch.nn.ReLU(),
        torch.nn.Linear(16, NUM_CLASSES),
    )


def make_data(seed: int, n: int, balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs whose class means are shared by everyone; clients see class imbalance."""
    means = np.random.default_rng(42).normal(scale=2.0, size=(NUM_CLASSES, NUM_FEATURES))
    rng = np.random.default_rng(seed)
    priors = np.ones(NUM_CLASSES) if balanced else np.roll([0.6, 0.25, 0.15], seed)
    labels = rng.choice(NUM_CLASSES, size=n, p=priors / priors.sum())
    features = means[labels] + rng.normal(size=(n, NUM_FEATURES))
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    partition = int(context.node_config["partition-id"])
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = make_data(partition, 96)
    x_val, y_val = make_data(100 + partition, 48)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        for start in range(0, len(x), 16):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[start : start + 16]), y[start : start + 16]).backward()
            optimizer.step()
    _, val_acc = evaluate(model, x_val, y_val)
    state = model.state_dict()
    if partition == NAN_CLIENT and int(msg.content["config"]["server-round"]) == NAN_ROUND:
        state["0.weight"] = torch.full_like(state["0.weight"], float("nan"))  # a diverged client
    metrics = MetricRecord({"num-examples": len(x), "val-acc": val_acc})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, acc = evaluate(model, *make_data(200 + partition, 48))
    metrics = MetricRecord({"num-examples": 48, "loss": loss, "acc": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def make_server_app(results: dict, checkpoint_dir: str) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from strategies import FedSoup

        x_test, y_test = make_data(1000, 600, balanced=True)

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = make_model()
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(model, x_test, y_test)
            return MetricRecord({"loss": loss, "acc": acc})

        strategy = FedSoup(
            soup={"optimizer": "adam", "lr": 0.01, "epochs": 3, "batch_size": 2, "shuffle": True},
            stew={"optimizer": "fedadam", "lr": 0.05},
            soup_pivot="global",
            order_by="val-acc",
            checkpoint_dir=checkpoint_dir,
            min_train_nodes=NUM_CLIENTS,
            min_evaluate_nodes=NUM_CLIENTS,
            min_available_nodes=NUM_CLIENTS,
        )
        results["result"] = strategy.start(
            grid,
            ArrayRecord(make_model().state_dict()),
            num_rounds=NUM_ROUNDS,
            evaluate_fn=central_evaluate,
        )

    return app


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fedsoup_in_flower_simulation_improves_the_model(tmp_path, monkeypatch):
    from flwr.simulation import run_simulation

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # Ray's opt-in to its future GPU-variable behaviour, which ends its FutureWarning (no GPU here),
    # as simulations/compare/run.py sets it
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray workers unpickle the ClientApp by importing this module: let them find it.
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, root, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(sys, "path", [here, root, *sys.path])

    results: dict = {}
    run_simulation(
        server_app=make_server_app(results, str(tmp_path / "checkpoints")),
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )

    result = results["result"]
    central = result.evaluate_metrics_serverapp
    assert sorted(central) == list(range(NUM_ROUNDS + 1))
    assert central[NUM_ROUNDS]["acc"] > central[0]["acc"] + 0.2
    assert central[NUM_ROUNDS]["loss"] < central[0]["loss"]
    train = result.train_metrics_clientapp
    assert sorted(train) == list(range(1, NUM_ROUNDS + 1))
    for server_round, metrics in train.items():
        expected_used = NUM_CLIENTS - 1 if server_round == NAN_ROUND else NUM_CLIENTS
        assert metrics["fedsoup-clients-used"] == expected_used
        assert metrics["fedsoup-ame-soup-distance"] > 0  # AME differs from the plain soup
        assert metrics["fedsoup-stew-grad-norm"] > 0
    final = result.arrays.to_torch_state_dict()
    assert final["1.num_batches_tracked"].dtype == torch.int64
    assert all(t.dtype == torch.float32 for k, t in final.items() if not k.endswith("num_batches_tracked"))
    assert (tmp_path / "checkpoints" / "state.json").is_file()
