"""FedSoup state: resuming from state_dict() or checkpoint_dir ends with the same model
as an uninterrupted run; and FedSoup works inside Flower's differential-privacy wrappers."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
)

from fedsoup.state import STATE_JSON, load_checkpoint, save_checkpoint
from strategies import METRIC_CLIENTS_USED, FedSoup
from strategies.inprocess import InProcessGrid, serverapp_identity, train_content, reply
from tests.strategy_helpers import as_numpy, assert_same_model

NODES = [2, 5, 9]
SOUP = {"optimizer": "adam", "lr": 0.05, "epochs": 3, "batch_size": 2, "shuffle": True}
STEW = {"optimizer": "fedadam", "lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-3}


@pytest.fixture(autouse=True)
def _serverapp():
    with serverapp_identity():
        yield


def initial_arrays(with_buffer: bool = True) -> ArrayRecord:
    rng = np.random.default_rng(7)
    arrays = {
        "w": rng.normal(size=(6, 4)).astype(np.float32),
        "b": rng.normal(size=(6,)).astype(np.float32),
    }
    if with_buffer:
        arrays["steps"] = np.array(0, dtype=np.int64)
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


class Clients:
    """Deterministic fake ClientApps: the reply depends on (node, round, received model)."""

    def __init__(self, crash_in_round: int | None = None) -> None:
        self.crash_in_round = crash_in_round
        self.rounds_seen: list[int] = []

    def __call__(self, msg: Message) -> Message:
        server_round = int(msg.content["config"]["server-round"])
        self.rounds_seen.append(server_round)
        node = msg.metadata.dst_node_id
        if server_round == self.crash_in_round:
            self.crash_in_round = None
            raise KeyboardInterrupt("server killed")
        if msg.metadata.message_type == MessageType.EVALUATE:
            return reply(msg, RecordDict({"metrics": MetricRecord({"num-examples": node, "loss": 1.0 / node})}))
        rng = np.random.default_rng([node, server_round])
        arrays = {}
        for key, array in msg.content["arrays"].items():
            value = array.numpy()
            if np.issubdtype(value.dtype, np.floating):
                arrays[key] = (value + rng.normal(scale=0.2, size=value.shape) - 0.05 * value).astype(value.dtype)
            else:
                arrays[key] = np.asarray(value + 1)
        return reply(msg, train_content(arrays, num_examples=10 * node, acc=0.1 * node))


def start(strategy, num_rounds: int, clients: Clients | None = None, arrays: ArrayRecord | None = None):
    grid = InProcessGrid(NODES, clients or Clients())
    return strategy.start(grid, arrays or initial_arrays(), num_rounds=num_rounds)


def test_state_dict_resume_equals_uninterrupted_run(tmp_path):
    reference = start(FedSoup(soup=SOUP, stew=STEW, seed=5), num_rounds=4)

    first = FedSoup(soup=SOUP, stew=STEW, seed=5)
    start(first, num_rounds=2)
    # Through files and back: the state must survive serialisation, not just live in memory.
    save_checkpoint(tmp_path, first.state_dict(), tag="manual")
    resumed = FedSoup(soup=SOUP, stew=STEW, seed=5)
    resumed.load_state_dict(load_checkpoint(tmp_path))
    result = start(resumed, num_rounds=4)

    assert sorted(result.train_metrics_clientapp) == [3, 4]  # continued at round 3
    assert_same_model(result.arrays, reference.arrays)


def test_state_holds_round_global_stew_and_seed():
    strategy = FedSoup(soup=SOUP, stew=STEW, seed=11)
    start(strategy, num_rounds=2)
    state = strategy.state_dict()
    assert state["round"] == 2
    assert state["rng"] == {"seed": 11}
    assert set(state["global"]) == {"w", "b", "steps"}
    assert state["stew"]["keys"] == ["w", "b"]  # integer buffers are never optimised
    assert state["stew"]["optimizer"] == "fedadam"
    assert set(state["stew"]["state"]["state"][0]) >= {"step", "exp_avg", "exp_avg_sq"}
    assert float(state["stew"]["state"]["state"][0]["step"]) == 2.0


def test_checkpoint_dir_restart_after_kill_equals_uninterrupted_run(tmp_path):
    reference = start(FedSoup(soup=SOUP, stew=STEW), num_rounds=5)

    with pytest.raises(KeyboardInterrupt):
        start(FedSoup(soup=SOUP, stew=STEW, checkpoint_dir=tmp_path), num_rounds=5, clients=Clients(crash_in_round=4))
    assert load_checkpoint(tmp_path)["round"] == 3  # rounds 1-3 were committed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-round-00003.safetensors", STATE_JSON]

    restarted = FedSoup(soup=SOUP, stew=STEW, checkpoint_dir=tmp_path)
    # A restarted ServerApp passes its fresh initial model again: the checkpoint wins.
    clients = Clients()
    result = start(restarted, num_rounds=5, clients=clients, arrays=initial_arrays())
    assert sorted(result.train_metrics_clientapp) == [4, 5]
    assert sorted(set(clients.rounds_seen)) == [4, 5]  # the clients are told the run's round numbers
    assert_same_model(result.arrays, reference.arrays)
    assert load_checkpoint(tmp_path)["round"] == 5
    document = json.loads((tmp_path / STATE_JSON).read_text())
    assert document["tensors"] == "state-round-00005.safetensors"


def test_checkpoint_of_a_finished_run_runs_no_more_rounds(tmp_path, caplog):
    done = start(FedSoup(soup=SOUP, stew=STEW, checkpoint_dir=tmp_path), num_rounds=2)
    clients = Clients()
    caplog.clear()
    with caplog.at_level("INFO", logger="flwr"):
        again = start(FedSoup(soup=SOUP, stew=STEW, checkpoint_dir=tmp_path), num_rounds=2, clients=clients)
    assert ("run already complete at round 2/2; pass a larger num_rounds to continue, "
            "or a new checkpoint_dir") in caplog.text
    assert "Resuming" not in caplog.text and "[ROUND" not in caplog.text
    assert clients.rounds_seen == [] and again.train_metrics_clientapp == {}
    assert_same_model(again.arrays, done.arrays)


def test_state_claiming_a_huge_round_is_reported_complete(caplog):
    first = FedSoup(soup=SOUP, stew=STEW)
    start(first, num_rounds=1)
    state = first.state_dict()
    state["round"] = 10**6
    claimed = FedSoup(soup=SOUP, stew=STEW)
    claimed.load_state_dict(state)
    clients = Clients()
    with caplog.at_level("INFO", logger="flwr"):
        result = start(claimed, num_rounds=20, clients=clients)
    assert "run already complete at round 1000000/20" in caplog.text and "1000001" not in caplog.text
    assert clients.rounds_seen == [] and result.train_metrics_clientapp == {}


def test_a_finished_run_continues_to_more_rounds(tmp_path):
    reference = start(FedSoup(soup=SOUP, stew=STEW), num_rounds=4)
    start(FedSoup(soup=SOUP, stew=STEW, checkpoint_dir=tmp_path), num_rounds=2)
    start(FedSoup(soup=SOUP, stew=STEW, checkpoint_dir=tmp_path), num_rounds=2)  # complete: nothing runs
    more = start(FedSoup(soup=SOUP, stew=STEW, checkpoint_dir=tmp_path), num_rounds=4)
    assert sorted(more.train_metrics_clientapp) == [3, 4]
    assert_same_model(more.arrays, reference.arrays)
    assert load_checkpoint(tmp_path)["round"] == 4


def test_restoring_into_a_different_stew_is_refused(tmp_path):
    start(FedSoup(stew=STEW, checkpoint_dir=tmp_path), num_rounds=1)
    with pytest.raises(ValueError, match="ServerStew optimizer is 'fedadam'"):
        FedSoup(stew={"optimizer": "sgd", "lr": 0.5, "momentum": 0.9}, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="not a FedSoup state"):
        FedSoup().load_state_dict({"round": 1})


def test_summary_mentions_resume(tmp_path, caplog):
    start(FedSoup(checkpoint_dir=tmp_path), num_rounds=1)
    FedSoup(checkpoint_dir=tmp_path).summary()
    assert "resuming after round 1" in caplog.text


# ----------------------------------------------------------------------
# Differential privacy wrappers
# ----------------------------------------------------------------------


def dp_run(inner, noise_multiplier: float, num_rounds: int = 3, client_side: bool = False):
    wrapper = DifferentialPrivacyClientSideFixedClipping if client_side else DifferentialPrivacyServerSideFixedClipping
    strategy = wrapper(inner, noise_multiplier=noise_multiplier, clipping_norm=0.5, num_sampled_clients=len(NODES))
    return start(strategy, num_rounds=num_rounds, arrays=initial_arrays(with_buffer=False))


def test_dp_wrapper_without_noise_matches_fedavg():
    expected = dp_run(FedAvg(), noise_multiplier=0.0)
    got = dp_run(FedSoup(), noise_multiplier=0.0)
    for key, value in as_numpy(expected.arrays).items():
        np.testing.assert_allclose(as_numpy(got.arrays)[key], value, rtol=1e-5, atol=1e-6)
    assert all(m[METRIC_CLIENTS_USED] == len(NODES) for m in got.train_metrics_clientapp.values())


def test_dp_wrapper_without_noise_matches_fedadam():
    expected = dp_run(FedAdam(eta=0.1), noise_multiplier=0.0)
    got = dp_run(FedSoup(stew={"optimizer": "fedadam", "lr": 0.1}), noise_multiplier=0.0)
    for key, value in as_numpy(expected.arrays).items():
        np.testing.assert_allclose(as_numpy(got.arrays)[key], value, rtol=1e-5, atol=1e-6)


def test_dp_wrapper_with_noise_steps_from_the_noised_model():
    inner = FedSoup(soup=SOUP, stew=STEW)
    sent, stepped_from = [], []
    configure, step = inner.configure_train, inner.server_stew.step

    def spy_configure(server_round, arrays, config, grid):
        sent.append(as_numpy(arrays))
        return configure(server_round, arrays, config, grid)

    def spy_step(current, merged):
        stepped_from.append({k: t.numpy().copy() for k, t in current.items()})
        return step(current, merged)

    inner.configure_train, inner.server_stew.step = spy_configure, spy_step
    result = dp_run(inner, noise_multiplier=1.0, num_rounds=3)
    final = as_numpy(result.arrays)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in final.values())
    # FedSoup's x_{t-1} each round is what the wrapper sent (noise included), as in FedOpt.
    assert len(sent) == len(stepped_from) == 3
    for sent_model, x_prev in zip(sent, stepped_from):
        for key in sent_model:
            np.testing.assert_array_equal(x_prev[key], sent_model[key])


def test_client_side_dp_wrapper_runs():
    result = dp_run(FedSoup(stew={"optimizer": "sgd", "lr": 1.0, "momentum": 0.5}), noise_multiplier=0.1, client_side=True)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert all(np.isfinite(v).all() for v in as_numpy(result.arrays).values())


def test_start_without_checkpoint_evaluates_like_flower():
    calls = []

    def evaluate_fn(server_round, arrays):
        calls.append(server_round)
        return MetricRecord({"score": float(server_round)})

    result = FedSoup().start(InProcessGrid(NODES, Clients()), initial_arrays(), num_rounds=2, evaluate_fn=evaluate_fn)
    assert calls == [0, 1, 2]
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    expected = FedAvg().start(InProcessGrid(NODES, Clients()), initial_arrays(with_buffer=False), num_rounds=2)
    got = FedSoup().start(InProcessGrid(NODES, Clients()), initial_arrays(with_buffer=False), num_rounds=2)
    for key, value in as_numpy(expected.arrays).items():
        np.testing.assert_allclose(as_numpy(got.arrays)[key], value, rtol=1e-5, atol=1e-6)


def test_server_side_adaptive_clipping_wrapper_runs():
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FedSoup(soup=SOUP, stew=STEW), noise_multiplier=0.0, num_sampled_clients=len(NODES), initial_clipping_norm=0.5
    )
    result = start(strategy, num_rounds=2, arrays=initial_arrays(with_buffer=False))
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in as_numpy(result.arrays).values())


def test_resume_delegates_to_flowers_own_start(tmp_path, monkeypatch, caplog):
    """No copy of Strategy.start: Flower's loop runs the remaining rounds, FedSoup renumbers them."""
    from flwr.serverapp.strategy import Strategy

    start(FedSoup(stew=STEW, checkpoint_dir=tmp_path), num_rounds=2)
    calls = []
    flower_start = Strategy.start

    @functools.wraps(flower_start)
    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("num_rounds", args[2] if len(args) > 2 else None))
        return flower_start(self, *args, **kwargs)

    monkeypatch.setattr(Strategy, "start", spy)
    evaluated = []

    def evaluate_fn(server_round, arrays):
        evaluated.append(server_round)
        return MetricRecord({"round": float(server_round)})

    caplog.clear()
    restarted = FedSoup(stew=STEW, checkpoint_dir=tmp_path)
    result = restarted.start(InProcessGrid(NODES, Clients()), initial_arrays(), num_rounds=5, evaluate_fn=evaluate_fn)
    assert calls == [3]  # Flower's own start, for the 3 remaining rounds
    assert evaluated == [2, 3, 4, 5]  # the restored model is evaluated again as round 2
    assert sorted(result.evaluate_metrics_serverapp) == [2, 3, 4, 5]
    assert sorted(result.train_metrics_clientapp) == sorted(result.evaluate_metrics_clientapp) == [3, 4, 5]
    assert "Resuming at round 3/5 from the FedSoup checkpoint" in caplog.text
    assert "[ROUND 3/5]" in caplog.text and "[ROUND 5/5]" in caplog.text and "[ROUND 1/" not in caplog.text
    # After the run the strategy is a plain FedAvg-like strategy again (no offset left over).
    assert restarted._round_offset == 0 and restarted.state_dict()["round"] == 5
