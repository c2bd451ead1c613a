"""Visiting order without tricks: by order_by, ties by the key clients report, then node id.

Two runs whose clients get other node ids (as Ray draws them at random) give the
same ordered soup, because ties are broken by the partition id each client reports;
that key never shows up in the aggregated metrics.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from strategies import FedSoup
from strategies.inprocess import InProcessGrid, reply, serverapp_identity

PARTITIONS = 5
VAL_ACC = [0.5, 0.75, 0.5, 0.5, 0.75]  # ties, as on small validation shards
SOUP = {"optimizer": "adam", "lr": 0.05, "epochs": 2, "batch_size": 1}


@pytest.fixture(autouse=True)
def _serverapp():
    with serverapp_identity():
        yield


def initial_arrays() -> ArrayRecord:
    rng = np.random.default_rng(3)
    return ArrayRecord({"w": Array(rng.normal(size=(4, 3)).astype(np.float32)), "b": Array(np.zeros(3, np.float32))})


class Clients:
    """Each node is a partition; what it replies depends on the partition, never on its node id."""

    def __init__(self, node_of_partition: list[int], where: str = "config") -> None:
        self.partition_of = {node: p for p, node in enumerate(node_of_partition)}
        self.where = where

    def __call__(self, msg: Message) -> Message:
        partition = self.partition_of[msg.metadata.dst_node_id]
        if msg.metadata.message_type == MessageType.EVALUATE:
            return reply(msg, RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 0.1 * partition})}))
        server_round = int(msg.content["config"]["server-round"])
        rng = np.random.default_rng([partition, server_round])
        arrays = {k: a.numpy() + rng.normal(scale=0.3, size=a.shape).astype(np.float32) for k, a in msg.content["arrays"].items()}
        metrics = {"num-examples": 10 + partition, "val-acc": VAL_ACC[partition]}
        records = {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()})}
        if self.where == "config":
            records["node"] = ConfigRecord({"partition-id": partition})
        elif self.where == "metrics":
            metrics["partition-id"] = partition
        records["metrics"] = MetricRecord(metrics)
        return reply(msg, RecordDict(records))


NODE_IDS_RUN_A = [8123, 17, 990, 4, 61]  # partition p runs on node NODE_IDS_RUN_A[p]
NODE_IDS_RUN_B = [5, 7002, 31, 12, 999]


def run(node_of_partition, strategy, where="config", rounds=2):
    grid = InProcessGrid(sorted(node_of_partition), Clients(node_of_partition, where))
    return strategy.start(grid, initial_arrays(), num_rounds=rounds)


def arrays(result) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in result.arrays.items()}


@pytest.mark.parametrize("where", ["config", "metrics"])
@pytest.mark.parametrize("order_by", ["val-acc", None])
def test_ordered_soup_is_reproducible_when_node_ids_are_shuffled(where, order_by):
    make = lambda: FedSoup(soup=SOUP, order_by=order_by, min_available_nodes=PARTITIONS)  # noqa: E731
    a = arrays(run(NODE_IDS_RUN_A, make(), where))
    b = arrays(run(NODE_IDS_RUN_B, make(), where))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_without_the_tie_break_key_node_ids_decide_and_the_runs_differ():
    """The control: the soup is order-sensitive, so node ids alone give other models."""
    make = lambda: FedSoup(soup=SOUP, order_by="val-acc", tie_break_key=None, min_available_nodes=PARTITIONS)  # noqa: E731
    a = arrays(run(NODE_IDS_RUN_A, make()))
    b = arrays(run(NODE_IDS_RUN_B, make()))
    assert not np.array_equal(a["w"], b["w"])


def test_the_tie_break_key_is_configurable():
    make = lambda: FedSoup(soup=SOUP, order_by="val-acc", tie_break_key="site", min_available_nodes=PARTITIONS)  # noqa: E731
    # Clients report "partition-id", not "site": nothing breaks the ties, node ids decide.
    assert not np.array_equal(arrays(run(NODE_IDS_RUN_A, make()))["w"], arrays(run(NODE_IDS_RUN_B, make()))["w"])


def test_the_tie_break_key_never_becomes_a_metric():
    """FedAvg averages every metric a client reports; FedSoup leaves the tie-break key out."""
    ours = run(NODE_IDS_RUN_A, FedSoup(order_by="val-acc", min_available_nodes=PARTITIONS), where="metrics")
    theirs = run(NODE_IDS_RUN_A, FedAvg(min_available_nodes=PARTITIONS), where="metrics")
    for server_round, metrics in ours.train_metrics_clientapp.items():
        assert "partition-id" in theirs.train_metrics_clientapp[server_round]
        assert "partition-id" not in metrics
        assert metrics["val-acc"] == pytest.approx(theirs.train_metrics_clientapp[server_round]["val-acc"])


def test_order_is_by_score_then_tie_key_then_node_id(monkeypatch):
    import fedsoup

    seen = []
    real_merge = fedsoup.merge
    monkeypatch.setattr(fedsoup, "merge", lambda models, options=None, **kw: seen.append(kw) or real_merge(models, options, **kw))
    run(NODE_IDS_RUN_B, FedSoup(soup=SOUP, order_by="val-acc", min_available_nodes=PARTITIONS), rounds=1)
    # Given to merge in tie-key (partition) order; merge sorts by score stably.
    # (FedSoup scales the weights by one power of two so that their sum cannot overflow.)
    weights = seen[0]["weights"]
    assert [w / sum(weights) for w in weights] == pytest.approx([(10 + p) / sum(range(10, 10 + PARTITIONS)) for p in range(PARTITIONS)])
    assert seen[0]["order_by"] == VAL_ACC
