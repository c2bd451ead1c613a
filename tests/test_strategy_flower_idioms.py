"""FedSoup under Flower's own unit-test idioms (``strategy_utils_test.py``, ``fedavgm_test.py``,
``fedopt_test.py``): replies made as ``Mock(spec=Message)`` without node ids, ``aggregate_train``
without a prior ``configure_train``, ``current_arrays`` set by hand, positional arguments."""

from __future__ import annotations

import inspect
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg

import fedsoup
from strategies import METRIC_CLIENTS_USED, FedSoup
from strategies.inprocess import InProcessGrid, serverapp_identity

AME = {"optimizer": "adam", "lr": 0.05, "epochs": 2, "batch_size": 1}


def create_mock_reply(arrays: ArrayRecord, num_examples: float, **metrics: float) -> Message:
    """A mock reply Message with default keys, built as Flower's strategy_utils_test.py builds it."""
    message = Mock(spec=Message)
    message.content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples, **metrics})}
    )
    message.has_error.side_effect = lambda: False
    message.has_content.side_effect = lambda: True
    return message


def client_arrays(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)]


def mock_replies(n: int = 3, **metrics) -> list[Message]:
    return [
        create_mock_reply(ArrayRecord(client_arrays(i)), num_examples=i + 1, **{k: v[i] for k, v in metrics.items()})
        for i in range(n)
    ]


def test_default_fedsoup_aggregates_mock_replies_as_fedavg_does():
    replies = mock_replies(acc=[0.1, 0.5, 0.3])
    expected, expected_metrics = FedAvg().aggregate_train(1, replies)
    got, metrics = FedSoup().aggregate_train(1, replies)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=1e-6, atol=1e-7)
        assert got[key].numpy().dtype == np.float32
    assert metrics["acc"] == pytest.approx(expected_metrics["acc"])
    assert metrics[METRIC_CLIENTS_USED] == 3


def test_fedavgm_test_weights_with_fedsoup():
    """Flower's fedavgm_test.py data: the weighted mean of two mock replies."""
    weights0 = [np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32), np.array([7, 8, 9, 10], dtype=np.float32)]
    weights1 = [np.array([[29, 23, 19], [17, 13, 11]], dtype=np.float32), np.array([7, 5, 3, 2], dtype=np.float32)]
    replies = [
        create_mock_reply(ArrayRecord(weights0), num_examples=1),
        create_mock_reply(ArrayRecord(weights1), num_examples=2),
    ]
    expected = [(w0 * 1 + w1 * 2) / 3 for w0, w1 in zip(weights0, weights1)]
    actual, _ = FedSoup().aggregate_train(1, replies)
    for w_act, w_exp in zip(actual.to_numpy_ndarrays(), expected, strict=True):
        np.testing.assert_almost_equal(w_act, w_exp, decimal=5)


def test_ame_soup_visits_mock_replies_in_their_given_order():
    replies = mock_replies(4)
    got, _ = FedSoup(soup=AME).aggregate_train(1, replies)
    models = [{k: torch.from_numpy(a.numpy()) for k, a in r.content["arrays"].items()} for r in replies]
    # No model was sent (no configure_train): the "global" pivot falls back to the soup.
    expected = fedsoup.merge(models, weights=[1, 2, 3, 4], pivot="soup", **AME, seed=_round_seed(0, 1))
    for key in expected:
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())
    reversed_order, _ = FedSoup(soup=AME).aggregate_train(1, replies[::-1])
    assert not np.array_equal(reversed_order["0"].numpy(), got["0"].numpy())  # the order matters to AME


def test_ame_soup_orders_mock_replies_by_a_metric():
    replies = mock_replies(4, acc=[0.2, 0.9, 0.5, 0.9])
    got, metrics = FedSoup(soup=AME, order_by="acc").aggregate_train(1, replies)
    models = [{k: torch.from_numpy(a.numpy()) for k, a in r.content["arrays"].items()} for r in replies]
    # Best first (merge sorts by the scores, stably): the tie between replies 1 and 3
    # keeps their given order; swapping them changes the soup.
    expected = fedsoup.merge(models, weights=[1, 2, 3, 4], order_by=[0.2, 0.9, 0.5, 0.9], **AME, seed=_round_seed(0, 1))
    for key in expected:
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())
    swapped, _ = FedSoup(soup=AME, order_by="acc").aggregate_train(1, [replies[i] for i in (0, 3, 2, 1)])
    assert not np.array_equal(swapped["0"].numpy(), got["0"].numpy())
    assert metrics["acc"] == pytest.approx((0.2 * 1 + 0.9 * 2 + 0.5 * 3 + 0.9 * 4) / 10)


def test_bad_mock_reply_is_left_out_by_its_position(caplog):
    replies = mock_replies(3)
    replies[1].content["metrics"]["num-examples"] = -1
    with caplog.at_level("WARNING", logger="flwr"):
        _, metrics = FedSoup().aggregate_train(1, replies)
    assert metrics[METRIC_CLIENTS_USED] == 2
    assert "left out reply from reply 1: weight 'num-examples' = -1 is not positive" in caplog.text


def test_round_without_evaluate_replies_logs_no_line_as_fedavg(caplog):
    """fraction_evaluate=0: no "aggregate_evaluate: Received 0 results" every round (FedAvg logs none)."""
    with caplog.at_level("INFO", logger="flwr"):
        assert FedSoup().aggregate_evaluate(1, []) is None
        assert FedAvg().aggregate_evaluate(1, []) is None
    assert "Received" not in caplog.text
    with caplog.at_level("INFO", logger="flwr"):
        FedSoup().aggregate_evaluate(1, mock_replies(2))
    assert "aggregate_evaluate: Received 2 results and 0 failures" in caplog.text


def test_current_arrays_set_by_hand_as_in_fedavgm_test():
    """fedavgm_test.py's idiom: set current_arrays, aggregate twice without configure_train."""
    initial = [np.zeros((2, 3), dtype=np.float32), np.zeros(4, dtype=np.float32)]
    replies = mock_replies(2)
    expected = [(a * 1 + b * 2) / 3 for a, b in zip(client_arrays(0), client_arrays(1))]
    strategy = FedSoup(stew={"optimizer": "sgd", "lr": 1.0 + 1e-9, "momentum": 1e-9})
    strategy.current_arrays = ArrayRecord(initial)
    strategy.aggregate_train(1, replies)
    actual, _ = strategy.aggregate_train(2, replies)  # steps from round 1's output
    for w_act, w_exp in zip(actual.to_numpy_ndarrays(), expected, strict=True):
        np.testing.assert_almost_equal(w_act, w_exp, decimal=5)
    # FedOpt's current_arrays is a dict of NumPy arrays: accepted too.
    strategy = FedSoup(stew={"optimizer": "fedadam", "lr": 0.1})
    strategy.current_arrays = {str(i): a for i, a in enumerate(initial)}
    actual, _ = strategy.aggregate_train(1, replies)
    assert actual.keys() == {"0", "1"} and not np.allclose(actual["0"].numpy(), 0)


def test_scalar_arrays_as_in_fedavgm_test():
    strategy = FedSoup(stew={"optimizer": "sgd", "lr": 1.0 + 1e-9})
    strategy.current_arrays = ArrayRecord([np.array(0.0)])
    replies = [
        create_mock_reply(ArrayRecord([np.array(1.0)]), num_examples=1),
        create_mock_reply(ArrayRecord([np.array(3.0)]), num_examples=2),
    ]
    actual, _ = strategy.aggregate_train(1, replies)
    scalar = actual.to_numpy_ndarrays()[0]
    assert scalar.shape == ()
    np.testing.assert_allclose(scalar, np.array(7.0 / 3.0), rtol=1e-6)


def test_stateful_stew_without_a_global_model_raises_as_fedavgm_does():
    with pytest.raises(AggregationError, match="configure_train"):
        FedSoup(stew={"optimizer": "sgd", "lr": 0.5, "momentum": 0.9}).aggregate_train(1, mock_replies(2))


def test_positional_arguments_are_fedavgs():
    args = (0.5, 0.25, 3, 4, 5, "weight", "params", "cfg")
    ours, theirs = FedSoup(*args), FedAvg(*args)
    for name in ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
                 "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key"):
        assert getattr(ours, name) == getattr(theirs, name), name
    with serverapp_identity():
        sent = list(FedSoup(0.5, 0.5).configure_train(1, ArrayRecord(client_arrays(0)), ConfigRecord(), InProcessGrid(range(1, 9))))
    assert len(sent) == 4  # half of the 8 nodes, as FedAvg(0.5, 0.5)
    with pytest.raises(TypeError):
        FedSoup(fraction_trian=0.5)  # FedAvg's own check of its keyword arguments
    fedavg_params = list(inspect.signature(FedAvg).parameters)
    assert list(inspect.signature(FedSoup).parameters)[: len(fedavg_params)] == fedavg_params  # help() shows them


def _round_seed(seed: int, server_round: int) -> int:
    from strategies.client_soup import round_seed

    return round_seed(seed, server_round)
