"""Attacks on the strategy found in review (after issues 21 and 27), each failing before its fix.

Driven through ``strategies.inprocess`` as tests/test_strategy_hostile.py does, with its
honest nodes and model.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from strategies import METRIC_FALLBACK, FedSoup
from strategies.inprocess import InProcessGrid, reply, serverapp_identity
from strategies.rounds import FALLBACK_SOUP
from test_strategy_hostile import HONEST, HOSTILE, as_numpy, content, honest_arrays, honest_content, initial_model


@pytest.fixture(autouse=True)
def _serverapp():
    with serverapp_identity():
        yield


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)
                             for k in a if np.issubdtype(a[k].dtype, np.floating))))


@pytest.mark.parametrize("claimed_examples", [1.0, 1e-3])
def test_a_tiny_weight_visited_first_cannot_throw_the_merge_out_of_the_ball(claimed_examples):
    """An AME-Adam ClientSoup with an explicit ``lr`` and the harmonic schedule takes a first
    step of ``η_0 / V_1``: a client that claims a tiny ``num-examples`` and reports
    ``partition-id`` −1 makes ``V_1`` tiny, and Adam's step does not shrink with the
    gradient. Before the fix the round's model ended 4.7e4 from the soup (2.3e4x the
    farthest reply, fallback 0). Now a merge that ends outside Proposition 2's ball is a
    diverged merge: the round falls back to the plain soup, where the tiny weight is tiny.
    """
    strategy = FedSoup(soup={"optimizer": "adam", "lr": 0.05, "epochs": 1, "batch_size": 1})
    model = initial_model()
    grid = InProcessGrid([*HONEST, HOSTILE])
    instructions = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in model.items()}), ConfigRecord(), grid))
    by_node = {m.metadata.dst_node_id: m for m in instructions}
    replies = [reply(by_node[n], honest_content(n, 1, model)) for n in HONEST]
    replies.append(reply(by_node[HOSTILE], content(honest_arrays(HOSTILE, 1, model), claimed_examples, -1)))
    out, metrics = strategy.aggregate_train(1, replies)

    sent = [honest_arrays(n, 1, model) for n in HONEST] + [honest_arrays(HOSTILE, 1, model)]
    weights = np.array([10.0 * n for n in HONEST] + [claimed_examples])
    weights /= weights.sum()
    soup = {k: sum(w * s[k].astype(np.float64) for w, s in zip(weights, sent)) for k in model}
    radius = max(_distance(s, soup) for s in sent)
    assert _distance(as_numpy(out), soup) <= radius * 1.001
    assert metrics[METRIC_FALLBACK] == FALLBACK_SOUP
