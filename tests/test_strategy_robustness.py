"""Bad client replies are left out (one WARNING naming the node), dtypes are kept.

The central property: a round with bad replies gives exactly the model of the same
round without them.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAdam, FedAvg

from strategies import METRIC_CLIENTS_LEFT_OUT, METRIC_CLIENTS_USED, FedSoup
from strategies.inprocess import InProcessGrid, error_reply, serverapp_identity, train_content, reply

GOOD_NODES = [3, 8, 5]
BAD_NODE = 6


@pytest.fixture(autouse=True)
def _serverapp():
    with serverapp_identity():
        yield


def global_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "fc.weight": rng.normal(size=(6, 4)).astype(np.float32),
        "fc.bias": rng.normal(size=(6,)).astype(np.float32),
        "bn.running_var": np.ones(6, dtype=np.float64),
        "emb.weight": rng.normal(size=(3, 2)).astype(np.float16),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def client_arrays(node: int, server_round: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([node, server_round])
    out = {}
    for key, value in global_model().items():
        if np.issubdtype(value.dtype, np.floating):
            out[key] = (value + rng.normal(scale=0.5, size=value.shape)).astype(value.dtype)
        else:
            out[key] = np.asarray(value + node)  # e.g. batches seen: differs per client
    return out


def good_content(node: int, server_round: int = 1) -> RecordDict:
    return train_content(client_arrays(node, server_round), num_examples=10 * node, acc=0.1 * node)


STRATEGIES = {
    "default": lambda: FedSoup(),
    "ame+fedadam": lambda: FedSoup(
        soup={"optimizer": "adam", "lr": 0.05, "epochs": 2, "batch_size": 2, "shuffle": True},
        stew={"optimizer": "fedadam", "lr": 0.1},
    ),
    "momentum-ordered": lambda: FedSoup(
        soup={"optimizer": "sgd", "lr": 0.5, "schedule": "constant"},
        stew={"optimizer": "sgd", "lr": 1.0, "momentum": 0.5},
        order_by="acc",
    ),
}


def aggregate(strategy, contents: dict[int, RecordDict | str], configure: bool = True):
    """One round: ``contents`` maps node -> reply content, or an error reason string."""
    arrays = ArrayRecord({k: Array(v) for k, v in global_model().items()})
    grid = InProcessGrid(sorted(contents))
    if configure:
        instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    else:
        instructions = list(FedAvg(min_train_nodes=1, min_available_nodes=1).configure_train(1, arrays, ConfigRecord(), grid))
    replies = []
    for msg in instructions:
        content = contents[msg.metadata.dst_node_id]
        replies.append(error_reply(msg, content) if isinstance(content, str) else reply(msg, content))
    return strategy.aggregate_train(1, replies)


def with_arrays(arrays: dict, num_examples=60, **metrics) -> RecordDict:
    return train_content(arrays, num_examples=num_examples, acc=0.6, **metrics)


def bad_arrays(change) -> dict:
    arrays = client_arrays(BAD_NODE)
    change(arrays)
    return arrays


def _set(key, value):
    def change(arrays):
        arrays[key] = value

    return change


def _nan(arrays):
    arrays["fc.weight"][2, 1] = np.nan


def _inf(arrays):
    arrays["fc.bias"][0] = -np.inf


def _drop(arrays):
    del arrays["fc.bias"]


BAD_REPLIES = {
    "error reply": (lambda: "CUDA out of memory", "error reply"),
    "NaN": (lambda: with_arrays(bad_arrays(_nan)), "'fc.weight' contains NaN or Inf"),
    "Inf": (lambda: with_arrays(bad_arrays(_inf)), "'fc.bias' contains NaN or Inf"),
    "missing key": (lambda: with_arrays(bad_arrays(_drop)), "array 'fc.bias' missing (present in the global model)"),
    "extra key": (lambda: with_arrays(bad_arrays(_set("head.weight", np.ones(2, np.float32)))), "array 'head.weight' not in the global model"),
    "other shape": (lambda: with_arrays(bad_arrays(_set("fc.bias", np.ones(7, np.float32)))), "array 'fc.bias' has shape (7,), but the global model has (6,)"),
    "int for float": (lambda: with_arrays(bad_arrays(_set("fc.bias", np.ones(6, np.int64)))), "array 'fc.bias' is int64, but the global model has float32"),
    "zero weight": (lambda: with_arrays(client_arrays(BAD_NODE), num_examples=0), "is not positive"),
    "negative weight": (lambda: with_arrays(client_arrays(BAD_NODE), num_examples=-5), "is not positive"),
    "NaN weight": (lambda: with_arrays(client_arrays(BAD_NODE), num_examples=float("nan")), "'num-examples' is nan"),
    "list weight": (lambda: with_arrays(client_arrays(BAD_NODE), num_examples=[1, 2]), "not a single number"),
    "missing weight": (
        lambda: train_content(client_arrays(BAD_NODE), acc=0.6, other=1.0),
        "no weight 'num-examples' in its MetricRecord",
    ),
    "two ArrayRecords": (
        lambda: RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in client_arrays(BAD_NODE).items()}),
                "more": ArrayRecord({k: Array(v) for k, v in client_arrays(BAD_NODE).items()}),
                "metrics": MetricRecord({"num-examples": 60, "acc": 0.6}),
            }
        ),
        "expected exactly one ArrayRecord, found 2",
    ),
    "no MetricRecord": (
        lambda: RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in client_arrays(BAD_NODE).items()})}),
        "expected exactly one MetricRecord, found 0",
    ),
    "corrupt array bytes": (
        lambda: with_arrays(client_arrays(BAD_NODE)),  # corrupted below, after serialisation
        "cannot be read",
    ),
}


def _corrupt(content: RecordDict) -> RecordDict:
    array = content["arrays"]["fc.weight"]
    content["arrays"]["fc.weight"] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=b"garbage")
    return content


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
@pytest.mark.parametrize("kind", list(BAD_REPLIES))
def test_bad_reply_is_left_out_and_round_equals_round_without_it(kind, strategy_name, caplog):
    make_bad, reason = BAD_REPLIES[kind]
    bad = make_bad()
    if kind == "corrupt array bytes":
        bad = _corrupt(bad)
    clean = {n: good_content(n) for n in GOOD_NODES}
    dirty = {**{n: good_content(n) for n in GOOD_NODES}, BAD_NODE: bad}

    expected, expected_metrics = aggregate(STRATEGIES[strategy_name](), clean)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        got, metrics = aggregate(STRATEGIES[strategy_name](), dirty)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"node {BAD_NODE}" in warnings[0] and reason in warnings[0], warnings[0]
    assert metrics[METRIC_CLIENTS_USED] == len(GOOD_NODES)
    assert metrics[METRIC_CLIENTS_LEFT_OUT] == 1
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy(), err_msg=key)
    assert metrics["acc"] == pytest.approx(expected_metrics["acc"])


def test_flower_fedavg_raises_where_fedsoup_leaves_the_offender_out():
    dirty = {**{n: good_content(n) for n in GOOD_NODES}, BAD_NODE: with_arrays(bad_arrays(_drop))}
    with pytest.raises(InconsistentMessageReplies):
        aggregate(FedAvg(), dirty)
    arrays, _ = aggregate(FedSoup(), dirty)
    assert arrays is not None


def test_all_replies_bad_keeps_the_global_model(caplog):
    contents = {3: "timeout", 4: with_arrays(bad_arrays(_nan)), 5: with_arrays(client_arrays(5), num_examples=0)}
    strategy = FedSoup(stew={"optimizer": "fedadam", "lr": 0.1})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = aggregate(strategy, contents)
    assert arrays is None  # Strategy.start keeps the current global model
    assert metrics[METRIC_CLIENTS_USED] == 0 and metrics[METRIC_CLIENTS_LEFT_OUT] == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("left out reply from node" in w for w in warnings) == 3
    assert strategy.server_stew.optimizer is None  # no step was taken
    for key, value in global_model().items():  # FedSoup's own notion of the global model is unchanged
        np.testing.assert_array_equal(strategy.state_dict()["global"][key].numpy(), value)


def test_replies_of_no_arrays_leave_the_global_model_unchanged(caplog):
    """Before: with no model sent (the reference then is what most replies hold), replies of
    empty ArrayRecords were merged by ``fedsoup.soup([{}, {}])`` into ``{}``, a global model of
    nothing, "2 replies merged". ``fedsoup.merge``/``soup`` now refuse a state dict holding no
    tensors, naming its ingredient, so each such reply is left out and the model is kept."""
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = aggregate(FedSoup(), {3: with_arrays({}), 5: with_arrays({})}, configure=False)
    assert arrays is None and metrics[METRIC_CLIENTS_USED] == 0 and metrics[METRIC_CLIENTS_LEFT_OUT] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("left out reply from node" in w and w.endswith("holds no tensors") for w in warnings) == 2


def test_no_replies_at_all():
    strategy = FedSoup()
    arrays, metrics = strategy.aggregate_train(1, [])
    assert arrays is None and metrics[METRIC_CLIENTS_USED] == 0


def test_missing_order_by_metric_leaves_reply_out(caplog):
    contents = {n: good_content(n) for n in GOOD_NODES}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = aggregate(FedSoup(order_by="val-acc"), contents)
    assert arrays is None
    assert "no order_by metric 'val-acc'" in caplog.text


def test_without_configure_train_majority_structure_is_the_reference(caplog):
    """No model was sent (aggregate_train called directly): the majority structure wins."""
    dirty = {**{n: good_content(n) for n in GOOD_NODES}, BAD_NODE: with_arrays(bad_arrays(_drop))}
    clean = {n: good_content(n) for n in GOOD_NODES}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        got, _ = aggregate(FedSoup(), dirty, configure=False)
    expected, _ = aggregate(FedSoup(), clean, configure=False)
    assert f"node {BAD_NODE}" in caplog.text
    for key in expected:
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())


def test_float_dtype_mismatch_is_cast_not_dropped():
    """A client answering float64 for a float32 model still counts; the result stays float32."""
    contents = {n: good_content(n) for n in GOOD_NODES}
    upcast = client_arrays(BAD_NODE)
    upcast["fc.weight"] = upcast["fc.weight"].astype(np.float64)
    contents[BAD_NODE] = with_arrays(upcast)
    arrays, metrics = aggregate(FedSoup(), contents)
    assert metrics[METRIC_CLIENTS_USED] == 4
    assert arrays["fc.weight"].numpy().dtype == np.float32


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
def test_dtypes_are_kept_and_integer_buffers_never_optimised(strategy_name):
    contents = {n: good_content(n) for n in GOOD_NODES}
    arrays, _ = aggregate(STRATEGIES[strategy_name](), contents)
    for key, value in global_model().items():
        assert arrays[key].numpy().dtype == value.dtype, key
        assert arrays[key].numpy().shape == value.shape, key
    # Non-floating arrays keep the global model's value (no single client decides them,
    # docs/design.md §2.3): never averaged, stepped, or copied from one reply.
    assert all(client_arrays(n)["bn.num_batches_tracked"] != global_model()["bn.num_batches_tracked"] for n in GOOD_NODES)
    assert arrays["bn.num_batches_tracked"].numpy() == global_model()["bn.num_batches_tracked"]


def test_without_a_global_model_non_floating_arrays_are_the_median_of_the_replies():
    contents = {n: good_content(n) for n in GOOD_NODES}
    contents[BAD_NODE] = with_arrays(bad_arrays(_set("bn.num_batches_tracked", np.array(10**12, np.int64))))
    arrays, _ = aggregate(FedSoup(), contents, configure=False)
    counters = sorted(int(client_arrays(n)["bn.num_batches_tracked"]) for n in GOOD_NODES) + [10**12]
    assert arrays["bn.num_batches_tracked"].numpy() == sorted(counters)[1]  # the lower median of 4


def test_flower_changes_dtypes_fedsoup_does_not():
    """Documented difference: Flower's FedAvg averages int64 into float64, FedAdam returns float64."""
    contents = {n: good_content(n) for n in GOOD_NODES}
    flower_avg, _ = aggregate(FedAvg(), contents)
    assert flower_avg["bn.num_batches_tracked"].numpy().dtype == np.float64
    floats = {n: train_content({k: v for k, v in client_arrays(n).items() if k.startswith("fc")}, num_examples=n) for n in GOOD_NODES}
    arrays = ArrayRecord({k: Array(v) for k, v in global_model().items() if k.startswith("fc")})
    grid = InProcessGrid(GOOD_NODES)
    for strategy, expected_dtype in ((FedAdam(), np.float64), (FedSoup(stew={"optimizer": "fedadam"}), np.float32)):
        instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        out, _ = strategy.aggregate_train(1, [reply(m, floats[m.metadata.dst_node_id]) for m in instructions])
        assert out["fc.weight"].numpy().dtype == expected_dtype


def test_arrival_order_does_not_matter():
    contents = {n: good_content(n) for n in [11, 2, 7, 5]}
    strategy_kwargs = {"soup": {"optimizer": "adam", "lr": 0.05, "epochs": 2}, "stew": {"optimizer": "fedyogi", "lr": 0.01}}
    arrays = ArrayRecord({k: Array(v) for k, v in global_model().items()})
    results = []
    for order in ([11, 2, 7, 5], [5, 7, 2, 11]):
        strategy = FedSoup(**strategy_kwargs)
        instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, arrays, ConfigRecord(), InProcessGrid(order))}
        out, _ = strategy.aggregate_train(1, [reply(instructions[n], contents[n]) for n in order])
        results.append(out)
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key].numpy(), results[1][key].numpy())


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
def test_replies_are_read_in_place_and_never_modified(strategy_name):
    """FedSoup reads reply arrays as zero-copy views of the message bytes: they must stay intact."""
    contents = {n: good_content(n) for n in GOOD_NODES}
    before = {n: {k: bytes(a.data) for k, a in c["arrays"].items()} for n, c in contents.items()}
    strategy = STRATEGIES[strategy_name]()
    for _ in range(2):  # the second round also steps a stateful stew from these views
        aggregate(strategy, contents)
    for node, content in contents.items():
        for key, array in content["arrays"].items():
            assert array.data == before[node][key], (node, key)


def test_fortran_ordered_reply_arrays_are_read_correctly():
    contents = {n: good_content(n) for n in GOOD_NODES}
    fortran = client_arrays(BAD_NODE)
    fortran["fc.weight"] = np.asfortranarray(fortran["fc.weight"])
    contents[BAD_NODE] = with_arrays(fortran)
    c_order = {**contents, BAD_NODE: with_arrays(client_arrays(BAD_NODE))}
    got, _ = aggregate(FedSoup(), contents)
    expected, _ = aggregate(FedSoup(), c_order)
    np.testing.assert_array_equal(got["fc.weight"].numpy(), expected["fc.weight"].numpy())


def test_bad_evaluate_replies_are_left_out(caplog):
    """Flower's FedAvg raises on inconsistent evaluate replies; FedSoup averages the rest."""
    arrays = ArrayRecord({k: Array(v) for k, v in global_model().items()})
    grid = InProcessGrid([1, 2, 3, 4, 5])
    strategy = FedSoup()
    instructions = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(1, arrays, ConfigRecord(), grid)}

    def metrics(**values):
        return RecordDict({"metrics": MetricRecord(values)})

    replies = [
        reply(instructions[1], metrics(**{"num-examples": 10, "acc": 0.5})),
        reply(instructions[2], metrics(**{"num-examples": 30, "acc": 0.9})),
        reply(instructions[3], metrics(**{"num-examples": 10, "loss": 0.1})),  # other keys
        reply(instructions[4], metrics(**{"num-examples": -1, "acc": 1.0})),  # bad weight
        error_reply(instructions[5], "evaluation crashed"),
    ]
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_evaluate(1, replies)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.aggregate_evaluate(1, replies)
    assert result["acc"] == pytest.approx(0.8)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("aggregate_evaluate: left out reply from node" in w for w in warnings)
    assert any("node 3" in w and "unexpected metric 'loss'" in w for w in warnings)


def test_metrics_that_cannot_be_aggregated_cost_the_metrics_not_the_round(caplog):
    contents = {n: good_content(n) for n in GOOD_NODES}
    for n, length in zip(GOOD_NODES, (2, 3, 2)):  # list metrics of different lengths
        contents[n]["metrics"]["curve"] = [0.5] * length
    with pytest.raises(ValueError):
        aggregate(FedAvg(), contents)
    arrays, metrics = aggregate(FedSoup(), contents)
    assert arrays is not None and metrics[METRIC_CLIENTS_USED] == 3
    assert "could not aggregate the client metrics" in caplog.text
