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


def _npy(value: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def _alone_without_a_sent_model(arrays: dict) -> tuple:
    """The reply alone, to ``aggregate_train`` without ``configure_train``: the majority
    structure (this reply's) is the reference (docs/design.md §3)."""
    strategy = FedSoup()
    grid = InProcessGrid([*HONEST, HOSTILE])
    model = initial_model()
    instructions = FedSoup().configure_train(1, ArrayRecord({k: Array(v) for k, v in model.items()}), ConfigRecord(), grid)
    instruction = next(m for m in instructions if m.metadata.dst_node_id == HOSTILE)
    return strategy.aggregate_train(1, [reply(instruction, content(arrays, 60, -1))])


def test_a_big_endian_array_without_a_sent_model_is_read_not_a_crash():
    """Before: ``ValueError`` (torch's byte order) out of ``aggregate_train``."""
    arrays = honest_arrays(HOSTILE, 1, initial_model())
    arrays["fc.bias"] = arrays["fc.bias"].astype(">f4")
    out, metrics = _alone_without_a_sent_model(arrays)
    assert metrics["fedsoup-clients-used"] == 1
    np.testing.assert_array_equal(as_numpy(out)["fc.bias"], arrays["fc.bias"].astype(np.float32))


@pytest.mark.parametrize("dtype", ["V2", [("x", "<f4")]])
def test_an_array_of_a_kind_torch_cannot_hold_is_left_out_without_a_sent_model(dtype):
    """A void or structured array (e.g. bfloat16 bytes as ``V2``). Before: ``TypeError`` from
    ``torch.from_numpy`` (``V2``) out of ``aggregate_train``."""
    arrays = honest_arrays(HOSTILE, 1, initial_model())
    value = np.zeros(arrays["fc.bias"].shape, dtype=np.dtype(dtype))
    arrays["fc.bias"] = Array(dtype=str(value.dtype), shape=value.shape, stype="numpy.ndarray", data=_npy(value))
    out, metrics = _alone_without_a_sent_model(arrays)
    assert out is None and metrics["fedsoup-clients-used"] == 0


def test_a_first_step_size_beyond_float32_is_a_diverged_merge_without_a_numpy_warning(recwarn):
    """The symptom ``fused.py: RuntimeWarning: overflow encountered in cast`` of the hostile
    case ``num-examples 1e308 x2`` with AME-Adam: the honest replies' share is ~1e-307, so
    when a batch of them is visited first the harmonic ``η_1 = η_0 / V_1`` (~1e305) is
    beyond float32. The merge's result is NaN and ``fedsoup.merge`` says it diverged (the
    strategy then falls back to the plain soup: not a wrong result, but the cast must not
    print a NumPy warning on the server)."""
    import torch

    import fedsoup
    from fedsoup.errors import OptionError

    generator = torch.Generator().manual_seed(0)
    models = [{"w": torch.randn(6, 4, generator=generator)} for _ in range(3)]
    with pytest.raises(OptionError, match="diverged"):
        fedsoup.merge(models, optimizer="adam", lr=0.05, batch_size=1, weights=[1e-307, 1.0, 1.0], pivot=models[1])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
