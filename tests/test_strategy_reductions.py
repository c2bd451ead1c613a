"""docs/design.md §3 reduction table: FedSoup with a plain soup equals Flower's own strategies.

Both sides are driven through the same round loop as ``Strategy.start``
(``configure_train`` then ``aggregate_train``) with the same fake client replies:
each client returns ``global + a deterministic perturbation of (node, round)``.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from fedsoup.errors import OptionError, UnknownOptionError
from strategies import METRIC_AME_SOUP_DISTANCE, METRIC_CLIENTS_USED, METRIC_STEW_GRAD_NORM, FedSoup
from strategies.inprocess import InProcessGrid, serverapp_identity, train_content, reply

NODES = [31, 4, 17, 9]
ROUNDS = 4


@pytest.fixture(autouse=True)
def _serverapp():
    with serverapp_identity():
        yield


def initial_arrays(dtype=np.float32) -> ArrayRecord:
    rng = np.random.default_rng(1234)
    return ArrayRecord(
        {
            "conv.weight": Array(rng.normal(size=(4, 3, 3, 3)).astype(dtype)),
            "conv.bias": Array(rng.normal(size=(4,)).astype(dtype)),
            "fc.weight": Array(rng.normal(size=(5, 36)).astype(dtype)),
            "fc.bias": Array(np.zeros(5, dtype=dtype)),
        }
    )


def client_update(node: int, server_round: int, arrays: ArrayRecord) -> dict:
    """A fake local training: a node- and round-specific step away from the global model."""
    rng = np.random.default_rng([node, server_round])
    return {k: (a.numpy() + rng.normal(scale=0.3, size=a.shape)).astype(a.numpy().dtype) for k, a in arrays.items()}


def run_rounds(strategy, arrays: ArrayRecord, rounds: int = ROUNDS, nodes=NODES):
    """The train half of ``Strategy.start``: returns the final arrays and per-round metrics."""
    grid = InProcessGrid(nodes)
    history = []
    for server_round in range(1, rounds + 1):
        instructions = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = [
            reply(
                msg,
                train_content(
                    client_update(msg.metadata.dst_node_id, server_round, arrays),
                    num_examples=10 + msg.metadata.dst_node_id,
                    loss=float(msg.metadata.dst_node_id),
                ),
            )
            for msg in instructions
        ]
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        history.append(metrics)
        if new_arrays is not None:
            arrays = new_arrays
    return {k: a.numpy() for k, a in arrays.items()}, history


REDUCTIONS = [
    pytest.param(FedSoup, {}, FedAvg, {}, id="FedAvg-defaults"),
    pytest.param(FedSoup, {"stew": {"optimizer": "sgd", "lr": 1.0}}, FedAvg, {}, id="FedAvg"),
    pytest.param(
        FedSoup,
        {"stew": {"optimizer": "sgd", "lr": 0.7, "momentum": 0.9}},
        FedAvgM,
        {"server_learning_rate": 0.7, "server_momentum": 0.9},
        id="FedAvgM",
    ),
    pytest.param(
        FedSoup,
        {"stew": {"optimizer": "sgd", "lr": 1.5}},
        FedAvgM,
        {"server_learning_rate": 1.5, "server_momentum": 0.0},
        id="FedAvgM-no-momentum",
    ),
    pytest.param(
        FedSoup,
        {"stew": {"optimizer": "fedadam", "lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-2}},
        FedAdam,
        {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
        id="FedAdam",
    ),
    pytest.param(
        FedSoup,
        {"stew": {"optimizer": "fedadagrad", "lr": 0.1, "eps": 1e-3}},
        FedAdagrad,
        {"eta": 0.1, "tau": 1e-3},
        id="FedAdagrad",
    ),
    pytest.param(
        FedSoup,
        {"stew": {"optimizer": "fedyogi", "lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-3}},
        FedYogi,
        {"eta": 0.02, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
        id="FedYogi",
    ),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ours, our_kwargs, flower, flower_kwargs", REDUCTIONS)
def test_fedsoup_reduces_to_flower_strategy(ours, our_kwargs, flower, flower_kwargs, dtype):
    expected, _ = run_rounds(flower(**flower_kwargs), initial_arrays(dtype))
    got, history = run_rounds(ours(**our_kwargs), initial_arrays(dtype))
    # float32: Flower sums replies in sampling order, FedSoup in node-id order, so the
    # results differ by float32 rounding only; float64 makes that rounding negligible.
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-11}
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], err_msg=key, **tol)
        assert got[key].dtype == dtype  # FedSoup never changes dtypes (Flower's FedAdam returns float64)
    moved = np.abs(got["fc.weight"] - initial_arrays(dtype)["fc.weight"].numpy()).max()
    assert moved > 1e-2  # the rounds did something, so the comparison means something
    assert all(m[METRIC_CLIENTS_USED] == len(NODES) for m in history)
    assert all(m[METRIC_AME_SOUP_DISTANCE] == 0.0 for m in history)
    assert all(m[METRIC_STEW_GRAD_NORM] > 0 for m in history)


def test_reduction_fails_when_settings_differ():
    """Guard against a vacuous comparison: a different server lr must not match."""
    expected, _ = run_rounds(FedAdam(eta=0.05), initial_arrays(np.float64))
    got, _ = run_rounds(FedSoup(stew={"optimizer": "fedadam", "lr": 0.06}), initial_arrays(np.float64))
    assert not np.allclose(got["fc.weight"], expected["fc.weight"], rtol=1e-6, atol=1e-8)


def test_default_fedsoup_without_configure_train_is_fedavg():
    """FedAvg's aggregate_train needs no configure_train; neither does default FedSoup."""
    arrays = initial_arrays()
    grid = InProcessGrid(NODES)
    with serverapp_identity():
        instructions = list(FedAvg().configure_train(1, arrays, ConfigRecord(), grid))
    contents = {
        m.metadata.dst_node_id: train_content(client_update(m.metadata.dst_node_id, 1, arrays), num_examples=m.metadata.dst_node_id)
        for m in instructions
    }
    replies = [reply(m, contents[m.metadata.dst_node_id]) for m in instructions]
    expected, expected_metrics = FedAvg().aggregate_train(1, replies)
    got, metrics = FedSoup().aggregate_train(1, replies)
    for key in expected:
        np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=1e-6, atol=1e-6)
    assert METRIC_STEW_GRAD_NORM not in metrics  # no x_{t-1} known: no pseudogradient to report


def test_plain_soup_equals_weighted_mean_exactly_in_float64():
    arrays = initial_arrays(np.float64)
    got, _ = run_rounds(FedSoup(), arrays, rounds=1)
    updates = {n: client_update(n, 1, arrays) for n in NODES}
    total = sum(10 + n for n in NODES)
    for key in got:
        manual = sum((10 + n) / total * updates[n][key] for n in NODES)
        np.testing.assert_allclose(got[key], manual, rtol=1e-13, atol=1e-13)


def test_ame_soup_reports_its_distance_from_the_plain_soup():
    soup = {"optimizer": "adam", "lr": 0.05, "epochs": 3, "batch_size": 2, "shuffle": True}
    plain, _ = run_rounds(FedSoup(), initial_arrays(), rounds=1)
    ame, history = run_rounds(FedSoup(soup=soup), initial_arrays(), rounds=1)
    distance = np.sqrt(sum(((ame[k].astype(np.float64) - plain[k]) ** 2).sum() for k in ame))
    assert distance > 1e-3
    assert history[0][METRIC_AME_SOUP_DISTANCE] == pytest.approx(distance, rel=1e-4)


def test_soup_pivot_and_order_by_reach_the_merge(monkeypatch):
    import fedsoup

    calls = []
    real_merge = fedsoup.merge

    def spy(models, options=None, **kwargs):
        calls.append(kwargs)
        return real_merge(models, options, **kwargs)

    soup = {"optimizer": "sgd", "lr": 0.5, "schedule": "constant"}
    strategy = FedSoup(soup=soup, soup_pivot="global", order_by="loss", seed=3)
    twin = FedSoup(soup=soup, soup_pivot="global", order_by="loss", seed=3)
    monkeypatch.setattr(fedsoup, "merge", spy)
    arrays = initial_arrays()
    run_rounds(strategy, arrays, rounds=2)
    first = calls[0]
    weights, expected = first["weights"], [10 + n for n in sorted(NODES)]  # node-id order, num-examples weights
    assert [w / sum(weights) for w in weights] == pytest.approx([w / sum(expected) for w in expected])
    assert first["order_by"] == [float(n) for n in sorted(NODES)]  # the 'loss' metric of each reply
    assert set(first["pivot"]) == set(arrays.keys())  # the global model sent this round
    for key, tensor in first["pivot"].items():
        np.testing.assert_array_equal(tensor.numpy(), arrays[key].numpy())
    assert calls[0]["seed"] != calls[1]["seed"]  # a fresh seed per round, derived from seed=3
    again = []
    monkeypatch.setattr(fedsoup, "merge", lambda models, options=None, **kw: again.append(kw) or real_merge(models, options, **kw))
    run_rounds(twin, arrays, rounds=2)
    assert [c["seed"] for c in again] == [c["seed"] for c in calls]


def test_soup_pivot_soup_lets_merge_start_from_the_soup(monkeypatch):
    import fedsoup

    calls = []
    real_merge = fedsoup.merge
    strategy = FedSoup(soup={"optimizer": "adam", "lr": 0.01}, soup_pivot="soup")
    monkeypatch.setattr(fedsoup, "merge", lambda models, options=None, **kw: calls.append(kw) or real_merge(models, options, **kw))
    run_rounds(strategy, initial_arrays(), rounds=1)
    assert calls[0]["pivot"] is None and strategy.client_soup.options.pivot == "soup"  # the options' rule


@pytest.mark.parametrize(
    "kwargs, error, option, match",
    [
        ({"soup": {"weights": [1, 2]}}, OptionError, "weights", "weighted_by_key"),
        ({"soup": {"pivot": "first"}}, OptionError, "pivot", "soup_pivot"),
        ({"soup": {"order_by": [1, 2]}}, OptionError, "order_by", "order_by"),
        ({"soup": {"optimizer": "adamm"}}, OptionError, "optimizer", "did you mean 'adam'"),
        ({"soup": {"optimizer": "adam", "shufle": True}}, UnknownOptionError, "shufle", "did you mean 'shuffle'"),
        ({"soup": {"optimizer": "adam", "betas": (0.9,)}}, OptionError, "betas", "invalid betas for Adam"),
        ({"stew": {"optimizer": "no-such-optimizer"}}, OptionError, "optimizer", "unknown optimizer"),
        ({"stew": {"optimizer": "adam", "beta": (0.9, 0.99)}}, UnknownOptionError, "beta", "did you mean 'betas'"),
        ({"stew": {"optimizer": "adam", "betas": (0.9,)}}, OptionError, "betas", "invalid betas for Adam"),
    ],
)
def test_bad_settings_fail_at_construction_with_typed_errors(kwargs, error, option, match):
    with pytest.raises(error, match=match) as raised:
        FedSoup(**kwargs)
    assert raised.value.option == option


@pytest.mark.parametrize("kwargs, match", [({"soup_pivot": "first"}, "soup_pivot"), ({"order_by": 3}, "order_by")])
def test_bad_fedsoup_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FedSoup(**kwargs)


def test_summary_logs_settings(caplog_flwr):
    FedSoup(soup={"optimizer": "adam", "lr": 0.01}, stew={"optimizer": "fedadam", "lr": 0.1}, order_by="val-acc").summary()
    text = caplog_flwr.text
    assert "FedSoup settings" in text
    assert "fedsoup.merge(optimizer='adam', lr=0.01)" in text
    assert "by client metric 'val-acc'" in text
    assert "ServerStew: fedadam(lr=0.1)" in text
    assert "then by 'partition-id', then by node id" in text
    assert "Weighted by: 'num-examples'" in text  # FedAvg's part follows


@pytest.fixture
def caplog_flwr(caplog):
    import logging

    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def test_soup_device_reaches_the_merge_and_the_result_comes_back_to_the_cpu(monkeypatch):
    import fedsoup

    calls = []
    real_merge = fedsoup.merge
    monkeypatch.setattr(fedsoup, "merge", lambda models, options=None, **kw: calls.append(options) or real_merge(models, options, **kw))
    soup = {"optimizer": "adam", "lr": 0.05, "epochs": 2}
    on_cpu, _ = run_rounds(FedSoup(soup={**soup, "device": "cpu"}), initial_arrays(), rounds=1)
    default, _ = run_rounds(FedSoup(soup=soup), initial_arrays(), rounds=1)
    assert calls[0].device == "cpu" and calls[1].device is None
    for key in default:
        np.testing.assert_array_equal(on_cpu[key], default[key])
    with pytest.raises(OptionError, match="device"):
        FedSoup(soup={**soup, "device": "no-such-device"})
