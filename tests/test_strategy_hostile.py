"""Hostile replies (issue 21): no malformed reply can take over a round or crash the server.

A table of replies an attacker can send, each driven through ``strategies.inprocess``
(the project's in-process Flower grid) in three ways, for FedSoup's defaults and for an
AME-Adam ClientSoup with a FedAdam stew:

- *first*: the hostile reply reports ``partition-id`` −1, so it is visited before the
  3 honest replies; the round's model must equal the round of the honest replies alone
  (or, where a documented rule keeps the reply, that rule's result);
- *alone*: the round receives only the hostile reply (replies);
- *start*: a 3-round ``Strategy.start()`` with the hostile node in every round completes,
  and ends where the honest nodes alone would have.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SType

from fedsoup.errors import MergeInputError, OptionError
from strategies import METRIC_CLIENTS_LEFT_OUT, METRIC_CLIENTS_USED, METRIC_FALLBACK, FedSoup, threads
from strategies.client_soup import capped_shares
from strategies.inprocess import InProcessGrid, reply, serverapp_identity
from strategies.rounds import FALLBACK_MERGE, FALLBACK_PREVIOUS, FALLBACK_SOUP
from tests.strategy_helpers import as_numpy, assert_same_model

HONEST = {3: 0, 8: 1, 5: 2}  # node id -> the partition id it reports
HOSTILE = 6
SECOND_HOSTILE = 7
ROUNDS = 3

STRATEGIES = {
    "default": lambda **kw: FedSoup(**kw),
    "ame-adam+fedadam": lambda **kw: FedSoup(
        soup={"optimizer": "adam", "lr": 0.05, "epochs": 2, "batch_size": 2, "shuffle": True},
        stew={"optimizer": "fedadam", "lr": 0.1},
        **kw,
    ),
}


@pytest.fixture(autouse=True)
def _serverapp():
    with serverapp_identity():
        yield


def initial_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "fc.weight": rng.normal(size=(6, 4)).astype(np.float32),
        "fc.bias": rng.normal(size=(6,)).astype(np.float32),
        "emb.weight": rng.normal(size=(3, 2)).astype(np.float16),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def honest_arrays(node: int, server_round: int, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A local training step: floats move by a (node, round) perturbation, counters advance."""
    rng = np.random.default_rng([node, server_round])
    out = {}
    for key, value in model.items():
        if np.issubdtype(value.dtype, np.floating):
            out[key] = (value + rng.normal(scale=0.3, size=value.shape)).astype(value.dtype)
        else:
            out[key] = np.asarray(value + 10 * node, dtype=value.dtype)
    return out


def content(arrays: dict[str, np.ndarray | Array], num_examples: float, partition: int) -> RecordDict:
    record = ArrayRecord({k: v if isinstance(v, Array) else Array(np.asarray(v)) for k, v in arrays.items()})
    metrics = MetricRecord({"num-examples": num_examples, "acc": 0.5, "partition-id": partition})
    return RecordDict({"arrays": record, "metrics": metrics})


def honest_content(node: int, server_round: int, model: dict[str, np.ndarray]) -> RecordDict:
    return content(honest_arrays(node, server_round, model), 10 * node, HONEST[node])


def npy_bytes(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def lying_array(metadata_like: np.ndarray, data: bytes) -> Array:
    """An Array whose metadata describes ``metadata_like`` but whose bytes are ``data``."""
    return Array(dtype=str(metadata_like.dtype), shape=tuple(metadata_like.shape), stype=SType.NUMPY, data=data)


# ----------------------------------------------------------------------
# The table. Each maker gets (server_round, global model) and returns the hostile
# replies as (node whose instruction it answers, content).
# ----------------------------------------------------------------------

Maker = Callable[[int, dict[str, np.ndarray]], list[tuple[int, RecordDict]]]


@dataclass(frozen=True)
class Case:
    make: Maker
    outcome: str = "left out"  # or "dominates" (kept by the weight rule), "duplicate" (node 3 counts for nothing)


def _with_bias(make_array: Callable[[np.ndarray], Array | np.ndarray], **kwargs) -> Maker:
    def make(server_round, model):
        arrays: dict = honest_arrays(HOSTILE, server_round, model)
        arrays["fc.bias"] = make_array(arrays["fc.bias"])
        return [(HOSTILE, content(arrays, kwargs.get("num_examples", 60), -1))]

    return make


def _with(key: str, change: Callable[[np.ndarray], np.ndarray]) -> Maker:
    def make(server_round, model):
        arrays = honest_arrays(HOSTILE, server_round, model)
        arrays[key] = change(arrays[key].copy())
        return [(HOSTILE, content(arrays, 60, -1))]

    return make


def _weights(*values: float) -> Maker:
    def make(server_round, model):
        nodes = (HOSTILE, SECOND_HOSTILE)[: len(values)]
        return [(n, content(honest_arrays(n, server_round, model), w, -1 - i)) for i, (n, w) in enumerate(zip(nodes, values))]

    return make


def _duplicate(server_round, model):
    """A second reply under node 3's id (its instruction), visited first, pulling far away."""
    arrays = {k: (v * 100 if np.issubdtype(v.dtype, np.floating) else v) for k, v in honest_arrays(3, server_round, model).items()}
    return [(3, content(arrays, 10_000, -1))]


def _nan(value):
    value[0, 0] = np.nan
    return value


CASES = {
    "int64 under float32 metadata": Case(_with_bias(lambda b: lying_array(b, npy_bytes(np.full(b.shape, 10000, np.int64))))),
    "complex under float32 metadata": Case(
        _with_bias(lambda b: lying_array(b, npy_bytes(np.full(b.shape, 10000 + 1j, np.complex64))))
    ),
    "bool under float32 metadata": Case(_with_bias(lambda b: lying_array(b, npy_bytes(np.ones(b.shape, bool))))),
    "header shape differs from metadata": Case(
        _with_bias(lambda b: lying_array(b, npy_bytes(np.full((2, 3), 10000, np.float32))))
    ),
    "bytes short": Case(_with_bias(lambda b: lying_array(b, npy_bytes(np.full(b.shape, 10000, np.float32))[:-4]))),
    "bytes long": Case(
        _with_bias(lambda b: lying_array(b, npy_bytes(np.full(b.shape, 10000, np.float32)) + b"\x00" * 16))
    ),
    "float64 1e300 to a float32 model": Case(_with_bias(lambda b: np.full(b.shape, 1e300, np.float64))),
    "float32 1e5 to a float16 array": Case(_with("emb.weight", lambda v: np.full(v.shape, 1e5, np.float32))),
    "NaN": Case(_with("fc.weight", _nan)),
    "negative num-examples": Case(_weights(-5.0)),
    "num-examples 1e308 x2": Case(_weights(1e308, 1e308), outcome="dominates"),
    "duplicate node id": Case(_duplicate, outcome="duplicate"),
}


# ----------------------------------------------------------------------
# Driving rounds
# ----------------------------------------------------------------------


def round_replies(instructions: list[Message], case: Case | None, server_round: int, honest: bool = True) -> list[Message]:
    """The replies of one round: the honest nodes' (if ``honest``), then the hostile ones."""
    by_node = {m.metadata.dst_node_id: m for m in instructions}
    model = {k: a.numpy() for k, a in instructions[0].content.array_records["arrays"].items()}
    replies = []
    if honest:
        replies += [reply(by_node[n], honest_content(n, server_round, model)) for n in HONEST if n in by_node]
    if case is not None:
        for node, hostile in case.make(server_round, model):
            replies.append(reply(by_node[node], hostile))
            if case.outcome == "duplicate" and not honest:
                replies.append(reply(by_node[node], honest_content(node, server_round, model)))
    return replies


def nodes_for(case: Case | None) -> list[int]:
    nodes = list(HONEST)
    if case is not None and case.outcome != "duplicate":
        nodes += sorted({n for n, _ in case.make(1, initial_model())})
    return nodes


def one_round(strategy: FedSoup, case: Case | None, honest: bool = True, nodes: list[int] | None = None):
    arrays = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    grid = InProcessGrid(nodes if nodes is not None else nodes_for(case))
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    return strategy.aggregate_train(1, round_replies(instructions, case, 1, honest))


def honest_only_round(strategy_name: str, without: tuple[int, ...] = ()):
    nodes = [n for n in HONEST if n not in without]
    arrays = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    strategy = STRATEGIES[strategy_name]()
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), InProcessGrid(nodes)))
    return strategy.aggregate_train(1, round_replies(instructions, None, 1))


def dominating_round(strategy_name: str) -> ArrayRecord:
    """The documented result of two replies claiming 1e308 examples each: their equal-weight round."""
    strategy = STRATEGIES[strategy_name]()
    arrays = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), InProcessGrid(nodes_for(CASES["num-examples 1e308 x2"]))))
    replies = round_replies(instructions, Case(_weights(1.0, 1.0)), 1, honest=False)
    out, _ = strategy.aggregate_train(1, replies)
    return out


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
@pytest.mark.parametrize("case_name", list(CASES))
def test_hostile_reply_visited_first_cannot_take_over_the_round(case_name, strategy_name):
    case = CASES[case_name]
    got, metrics = one_round(STRATEGIES[strategy_name](), case)
    assert got is not None
    if case.outcome == "left out":
        expected, _ = honest_only_round(strategy_name)
        assert_same_model(got, expected)
        assert metrics[METRIC_CLIENTS_USED] == len(HONEST)
        assert metrics[METRIC_CLIENTS_LEFT_OUT] == 1
    elif case.outcome == "duplicate":
        expected, _ = honest_only_round(strategy_name, without=(3,))
        assert_same_model(got, expected)
        assert metrics[METRIC_CLIENTS_USED] == len(HONEST) - 1
        assert metrics[METRIC_CLIENTS_LEFT_OUT] == 2
    else:  # a claimed weight is honoured, as in FedAvg: the claimants dominate
        dominant = as_numpy(dominating_round(strategy_name))
        honest = as_numpy(honest_only_round(strategy_name)[0])
        values = as_numpy(got)
        assert all(np.isfinite(v).all() for v in values.values())
        if strategy_name == "default":
            assert_same_model(got, dominating_round(strategy_name))
            assert metrics[METRIC_FALLBACK] == FALLBACK_MERGE
        else:
            for key in ("fc.weight", "fc.bias"):
                assert np.linalg.norm(values[key] - dominant[key]) < 0.1 * np.linalg.norm(values[key] - honest[key])
            # FedAdam's first step hides whether AME or its fallback made the round: it is the
            # fallback. The shuffled plan's first batch is two honest replies of weight ~1e-307,
            # so the harmonic η_1 = lr/V_1 ≈ 8e304 and the Adam step overflows float32.
            assert metrics[METRIC_FALLBACK] == FALLBACK_SOUP
        assert metrics[METRIC_CLIENTS_USED] == len(HONEST) + 2
    model = initial_model()
    assert got["bn.num_batches_tracked"].numpy() == model["bn.num_batches_tracked"]


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
@pytest.mark.parametrize("case_name", list(CASES))
def test_hostile_reply_alone_keeps_or_sets_the_model_without_raising(case_name, strategy_name):
    case = CASES[case_name]
    strategy = STRATEGIES[strategy_name]()
    got, metrics = one_round(strategy, case, honest=False)
    if case.outcome == "dominates":
        assert_same_model(got, dominating_round(strategy_name))
    else:
        assert got is None  # no usable reply: the global model stays as it was
        assert metrics[METRIC_CLIENTS_USED] == 0
        for key, value in initial_model().items():
            np.testing.assert_array_equal(strategy.state_dict()["global"][key].numpy(), value)


class Clients:
    """Honest nodes train; the hostile node(s) answer with the case's replies (and evaluate honestly)."""

    def __init__(self, case: Case | None) -> None:
        self.case = case

    def __call__(self, msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            return reply(msg, RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 0.25})}))
        raise AssertionError("train messages are answered by HostileGrid")


class HostileGrid(InProcessGrid):
    """An in-process grid whose train rounds are answered by :func:`round_replies` (duplicates included)."""

    def __init__(self, case: Case | None, nodes: list[int] | None = None) -> None:
        super().__init__(nodes_for(case) if nodes is None else nodes, Clients(case))
        self.case = case

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return super().send_and_receive(messages, timeout=timeout)
        server_round = int(messages[0].content["config"]["server-round"])
        return round_replies(messages, self.case, server_round)


def run(strategy_name: str, case: Case | None, nodes: list[int] | None = None):
    strategy = STRATEGIES[strategy_name](min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    return strategy.start(HostileGrid(case, nodes), initial, num_rounds=ROUNDS)


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
@pytest.mark.parametrize("case_name", list(CASES))
def test_three_round_start_completes_with_a_hostile_node(case_name, strategy_name):
    case = CASES[case_name]
    result = run(strategy_name, case)
    assert sorted(result.train_metrics_clientapp) == list(range(1, ROUNDS + 1))
    got = as_numpy(result.arrays)
    assert all(np.isfinite(v).all() for v in got.values() if v.dtype.kind == "f")
    rounds = result.train_metrics_clientapp.values()
    if case.outcome == "left out":
        assert_same_model(result.arrays, run(strategy_name, None).arrays)
        assert all(m[METRIC_CLIENTS_LEFT_OUT] == 1 and m[METRIC_FALLBACK] == FALLBACK_MERGE for m in rounds)
    elif case.outcome == "duplicate":  # node 3 counts for nothing, every round
        assert_same_model(result.arrays, run(strategy_name, None, nodes=[n for n in HONEST if n != 3]).arrays)
        assert all(m[METRIC_CLIENTS_LEFT_OUT] == 2 for m in rounds)
    else:
        assert all(m[METRIC_CLIENTS_USED] == len(HONEST) + 2 for m in rounds)


# ----------------------------------------------------------------------
# The rules behind the table
# ----------------------------------------------------------------------


def test_a_normal_round_reports_fallback_0():
    _, metrics = one_round(FedSoup(), None)
    assert metrics[METRIC_FALLBACK] == FALLBACK_MERGE


def test_a_diverging_merge_falls_back_to_the_plain_soup(caplog):
    diverging = {"optimizer": "sgd", "lr": 1e30, "schedule": "constant", "epochs": 3}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        got, metrics = one_round(FedSoup(soup=diverging), None)
    expected, _ = one_round(FedSoup(), None)
    assert_same_model(got, expected)
    assert metrics[METRIC_FALLBACK] == FALLBACK_SOUP and metrics[METRIC_CLIENTS_USED] == len(HONEST)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the ClientSoup merge failed in round 1" in warnings[0]
    assert "using the plain soup of the same replies" in warnings[0]


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
def test_when_the_soup_fails_too_the_previous_model_is_kept(strategy_name, monkeypatch, caplog):
    import fedsoup

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fedsoup, "merge", broken)
    monkeypatch.setattr(fedsoup, "soup", broken)
    strategy = STRATEGIES[strategy_name]()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        got, metrics = one_round(strategy, None)
    assert got is None and metrics[METRIC_FALLBACK] == FALLBACK_PREVIOUS
    assert "using the previous model" in caplog.text
    for key, value in initial_model().items():
        np.testing.assert_array_equal(strategy.state_dict()["global"][key].numpy(), value)


def test_a_diverging_stew_keeps_the_previous_model_and_its_state(caplog):
    """x_{t-1} = -3e38, replies +3e38 (finite float32): SGD with lr 2 would step to 9e38 = Inf."""
    strategy = FedSoup(stew={"optimizer": "sgd", "lr": 2.0})
    model = {"w": np.full(4, -3e38, np.float32)}
    grid = InProcessGrid(list(HONEST))
    instructions = list(strategy.configure_train(1, ArrayRecord({"w": Array(model["w"])}), ConfigRecord(), grid))
    replies = [reply(m, content({"w": np.full(4, 3e38, np.float32)}, 10, HONEST[m.metadata.dst_node_id])) for m in instructions]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        got, metrics = strategy.aggregate_train(1, replies)
    assert got is None and metrics[METRIC_FALLBACK] == FALLBACK_PREVIOUS
    assert "x_t is NaN or Inf" in caplog.text
    assert strategy.server_stew.optimizer is None  # the failed step left no state behind


def test_an_input_error_naming_an_ingredient_leaves_only_that_reply_out(monkeypatch, caplog):
    import fedsoup

    real_merge, calls = fedsoup.merge, []

    def merge(models, options=None, **kwargs):
        calls.append(len(models))
        if len(calls) == 1:
            raise MergeInputError("is poisoned", ingredient=1, key="fc.bias")
        return real_merge(models, options, **kwargs)

    monkeypatch.setattr(fedsoup, "merge", merge)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        got, metrics = one_round(FedSoup(), None)
    assert calls == [3, 2]
    # Visiting order is by partition id: node 3, node 8, node 5; ingredient 1 is node 8.
    assert "left out reply from node 8: array 'fc.bias' is poisoned" in caplog.text
    assert metrics[METRIC_CLIENTS_USED] == 2 and metrics[METRIC_FALLBACK] == FALLBACK_MERGE


def test_an_input_error_naming_no_ingredient_is_a_merge_failure_not_a_bad_reply(monkeypatch, caplog):
    import fedsoup

    def merge(models, options=None, **kwargs):
        raise MergeInputError("pivot contains NaN or Inf values", key="fc.bias")

    monkeypatch.setattr(fedsoup, "merge", merge)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        got, metrics = one_round(STRATEGIES["ame-adam+fedadam"](), None)
    assert metrics[METRIC_CLIENTS_USED] == len(HONEST) and metrics[METRIC_FALLBACK] == FALLBACK_SOUP
    assert "left out" not in caplog.text


@pytest.mark.parametrize("odd", [0, 1, 2])
def test_merge_blames_the_odd_ingredient_wherever_it_is(odd):
    import fedsoup

    models = [{"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)} for _ in range(3)]
    models[odd]["a"] = np.zeros(4, np.float32)
    with pytest.raises(MergeInputError) as info:
        fedsoup.merge(models)
    assert (info.value.ingredient, info.value.key) == (odd, "a")


@pytest.mark.parametrize(
    "weights, cap, expected",
    [
        ([1.0, 1.0, 1.0, 1.0], 0.5, [0.25] * 4),  # no one above the cap: unchanged
        ([1e308, 1e308, 30, 80, 50], 0.25, [0.25, 0.25, 0.5 * 30 / 160, 0.5 * 80 / 160, 0.5 * 50 / 160]),
        ([8.0, 1.0, 1.0], 0.5, [0.5, 0.25, 0.25]),
        ([8.0, 4.0, 1.0, 1.0], 0.4, [0.4, 0.4, 0.1, 0.1]),  # capping one pushes the next over: capped too
        ([5.0, 1.0, 1.0], 0.2, [1 / 3] * 3),  # n * cap < 1: nothing fits, equal shares
    ],
)
def test_capped_shares(weights, cap, expected):
    exponent = math.frexp(max(weights))[1]
    shares = capped_shares([math.ldexp(w, -exponent) for w in weights], cap)
    assert shares == pytest.approx(expected)
    assert math.fsum(shares) == pytest.approx(1.0)


def test_max_weight_share_bounds_a_client_claiming_a_huge_weight():
    case = CASES["num-examples 1e308 x2"]
    got, _ = one_round(FedSoup(max_weight_share=0.25), case)
    model = initial_model()
    arrays = {n: honest_arrays(n, 1, model) for n in (*HONEST, HOSTILE, SECOND_HOSTILE)}
    weights = {HOSTILE: 0.25, SECOND_HOSTILE: 0.25} | {n: 0.5 * 10 * n / (10 * sum(HONEST)) for n in HONEST}
    for key in ("fc.weight", "fc.bias"):
        expected = sum(weights[n] * arrays[n][key].astype(np.float64) for n in weights)
        np.testing.assert_allclose(got[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(OptionError):
        FedSoup(max_weight_share=0.0)


@pytest.mark.parametrize(
    "kwargs, mean",
    [
        ({}, True),
        ({"max_weight_share": 0.6}, True),  # a weighted mean still (of capped weights; none reaches 0.6 here)
        ({"stew": {"optimizer": "sgd", "lr": 1.0}}, True),
        ({"soup": {"optimizer": "adam", "lr": 0.05}}, False),
        ({"order_by": "acc"}, False),
        ({"stew": {"optimizer": "sgd", "lr": 1.0, "momentum": 0.9}}, False),
        ({"stew": {"optimizer": "sgd", "lr": 0.5}}, False),
        ({"stew": {"optimizer": "fedadam", "lr": 0.1}}, False),
        ({"stew": {"optimizer": "fedyogi", "lr": 0.1}}, False),
        ({"stew": {"optimizer": "fedadagrad", "lr": 0.1}}, False),
    ],
)
def test_mean_aggregate_says_whether_the_round_is_the_weighted_mean(kwargs, mean):
    strategy = FedSoup(**kwargs)
    assert strategy.mean_aggregate is mean
    with pytest.raises(AttributeError):
        strategy.mean_aggregate = True  # read-only
    if mean:  # and it is: the round equals the weighted mean of the replies
        got, _ = one_round(strategy, None)
        arrays = {n: honest_arrays(n, 1, initial_model()) for n in HONEST}
        total = sum(10 * n for n in HONEST)
        for key in ("fc.weight", "fc.bias"):
            expected = sum(10 * n / total * arrays[n][key].astype(np.float64) for n in HONEST)
            np.testing.assert_allclose(got[key].numpy(), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cores, busy, limit, expected",
    [(2, 0.1, 2, 2), (2, 1.0, 2, 1), (2, 0.6, 2, 1), (2, 7.9, 2, 1), (8, 2.2, 8, 6), (8, 0.0, 4, 4), (1, 0.0, 1, 1)],
)
def test_choose_threads(cores, busy, limit, expected):
    assert threads.choose_threads(cores, busy, limit) == expected


def test_the_aggregation_uses_the_idle_cores_and_restores_the_thread_counts(monkeypatch):
    import fedsoup
    import torch

    seen = []
    real_merge = fedsoup.merge
    monkeypatch.setattr(fedsoup, "merge", lambda models, options=None, **kw: seen.append(torch.get_num_threads()) or real_merge(models, options, **kw))
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.0)  # another process keeps one core busy
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one_round(FedSoup(), None)
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
        one_round(FedSoup(), None)
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_busy_cores_reads_the_host_load():
    assert 0.0 <= threads.busy_cores() < 10_000
    assert threads.available_cores() >= 1


def test_replies_with_other_metric_keys_cannot_exclude_an_honest_reply(caplog):
    """Two replies with an extra metric key outnumber the honest one: its model still counts."""
    strategy = FedSoup()
    arrays = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), InProcessGrid([3, HOSTILE, SECOND_HOSTILE])))
    replies = []
    for msg in instructions:
        node = msg.metadata.dst_node_id
        reply_content = content(honest_arrays(node, 1, initial_model()), 10 * node, {3: 0, HOSTILE: 1, SECOND_HOSTILE: 2}[node])
        if node != 3:
            reply_content["metrics"]["exfiltrate"] = 1.0
        replies.append(reply(msg, reply_content))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        got, metrics = strategy.aggregate_train(1, replies)
    assert metrics[METRIC_CLIENTS_USED] == 3 and metrics[METRIC_CLIENTS_LEFT_OUT] == 0
    assert "metrics of node 3 not aggregated" in caplog.text and "its model is used" in caplog.text
    assert metrics["exfiltrate"] == 1.0  # the metrics are the majority's
    model = initial_model()
    weights = {n: 10 * n for n in (3, HOSTILE, SECOND_HOSTILE)}
    expected = sum(w * honest_arrays(n, 1, model)["fc.bias"].astype(np.float64) for n, w in weights.items()) / sum(weights.values())
    np.testing.assert_allclose(got["fc.bias"].numpy(), expected, rtol=1e-5)


def test_numbers_too_large_for_a_float_are_not_numbers():
    """MetricRecord holds Python ints of any size in-process (the wire holds int64): 10**400
    as a weight leaves the reply out, as a partition id counts as not reported."""
    strategy = FedSoup()
    arrays = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), InProcessGrid([*HONEST, HOSTILE, SECOND_HOSTILE])))
    replies = []
    for msg in instructions:
        node = msg.metadata.dst_node_id
        if node == HOSTILE:
            replies.append(reply(msg, content(honest_arrays(node, 1, initial_model()), 10**400, 3)))
        elif node == SECOND_HOSTILE:
            replies.append(reply(msg, content(honest_arrays(node, 1, initial_model()), 70, 10**400)))
        else:
            replies.append(reply(msg, honest_content(node, 1, initial_model())))
    got, metrics = strategy.aggregate_train(1, replies)
    assert got is not None
    assert metrics[METRIC_CLIENTS_USED] == len(HONEST) + 1 and metrics[METRIC_CLIENTS_LEFT_OUT] == 1
