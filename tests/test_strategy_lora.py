"""Federated LoRA in FedSoup (issue 27): adapter replies merged as factors or as products.

Replies are PEFT adapter state dicts (``base_model.model.<module>.lora_{A,B}.weight``) driven
through ``strategies.inprocess``; every merge is checked against a hand computation in
plain torch (``Σ_i ω_i s_i B_i A_i`` and its SVD, FedAdam written out on ``ΔW``), the
``factors`` mode against Flower's own FedAvg/FedAdam on the same replies.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedsoup.errors import OptionError, StateError
from fedsoup.lora import LoraPair
from fedsoup.lora.linalg import factored_truncated_svd
from fedsoup.lora.measure import factor_product_error
from strategies import FedSoup
from strategies.inprocess import InProcessGrid, reply, serverapp_identity, train_content
from strategies.products import METRIC_SVD_ENERGY_MEAN, METRIC_SVD_ENERGY_MIN
from strategies.rounds import (
    FALLBACK_MERGE,
    METRIC_BYTES_RECEIVED,
    METRIC_BYTES_SENT,
    METRIC_CLIENTS_LEFT_OUT,
    METRIC_CLIENTS_USED,
    METRIC_FALLBACK,
    METRIC_LORA_ERROR_MAX,
    METRIC_LORA_ERROR_MEAN,
)

PREFIX = "base_model.model.layers.0.self_attn."
MODULES = {"q_proj": (10, 12), "v_proj": (6, 12)}  # module -> (d_out, d_in)
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
NODES = [31, 4, 17, 9]


@pytest.fixture(autouse=True)
def _serverapp():
    with serverapp_identity():
        yield


def adapter(rank: int = 4, dtype=np.float32, seed: int = 0, zero_b: bool = True,
            modules=MODULES) -> dict[str, np.ndarray]:
    """A global adapter as PEFT initialises one (random A, B = 0), or random B too."""
    rng = np.random.default_rng(seed)
    model = {}
    for name, (d_out, d_in) in modules.items():
        model[PREFIX + name + ".lora_A.weight"] = rng.normal(size=(rank, d_in)).astype(dtype)
        model[PREFIX + name + ".lora_B.weight"] = (np.zeros((d_out, rank)) if zero_b
                                                   else rng.normal(size=(d_out, rank))).astype(dtype)
    return model


def record(model: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in model.items()})


def client_adapter(node: int, server_round: int, arrays: ArrayRecord, rank: int | None = None) -> dict:
    """A fake local fine-tuning: the global factors moved by a node- and round-specific step,
    at ``rank`` (the first ``rank`` slots of the global adapter, padded with random ones)."""
    rng = np.random.default_rng([node, server_round])
    out = {}
    for key, array in arrays.items():
        value = array.numpy()
        if rank is not None:
            if key.endswith("lora_A.weight"):
                value = np.concatenate([value, rng.normal(size=(max(0, rank - value.shape[0]), value.shape[1]))])[:rank]
            else:
                value = np.concatenate([value, np.zeros((value.shape[0], max(0, rank - value.shape[1])))], 1)[:, :rank]
        out[key] = (value + rng.normal(scale=0.3, size=value.shape)).astype(array.numpy().dtype)
    return out


def run_rounds(strategy, arrays: ArrayRecord, rounds: int = 3, nodes=NODES, ranks=None):
    """The train half of ``Strategy.start``: the final arrays, per-round metrics and replies."""
    grid = InProcessGrid(nodes)
    history, sent = [], []
    for server_round in range(1, rounds + 1):
        instructions = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        contents = {
            msg.metadata.dst_node_id: client_adapter(msg.metadata.dst_node_id, server_round, arrays,
                                                     (ranks or {}).get(msg.metadata.dst_node_id))
            for msg in instructions
        }
        replies = [reply(msg, train_content(contents[msg.metadata.dst_node_id],
                                            num_examples=10 + msg.metadata.dst_node_id)) for msg in instructions]
        sent.append((arrays, contents))
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        history.append(metrics)
        if new_arrays is not None:
            arrays = new_arrays
    return {k: a.numpy() for k, a in arrays.items()}, history, sent


def hand_products(contents: dict[int, dict], alpha: float = 8.0, rslora=False, modules=MODULES):
    """``{module: Σ_i ω_i s_i B_i A_i}`` in float64 with ``ω_i ∝ 10 + node`` and the server's scale."""
    total = sum(10 + n for n in contents)
    rank_of = lambda a: a.shape[0]  # noqa: E731 - each reply at its own rank
    products = {}
    for name in modules:
        path = PREFIX + name
        products[path] = sum(
            (10 + n) / total * (alpha / (math.sqrt(rank_of(c[path + ".lora_A.weight"])) if rslora
                                         else rank_of(c[path + ".lora_A.weight"])))
            * (torch.from_numpy(c[path + ".lora_B.weight"]).double() @ torch.from_numpy(c[path + ".lora_A.weight"]).double())
            for n, c in contents.items()
        )
    return products


def hand_errors(contents: dict[int, dict]) -> list[float]:
    """Per module ``‖s·soup(B)·soup(A) − Σ ω_i s B_i A_i‖ / ‖Σ ω_i s B_i A_i‖`` in float64
    (``s`` = 2, ``ω_i ∝ 10 + node``)."""
    total = sum(10 + n for n in contents)
    errors = []
    for name in MODULES:
        path = PREFIX + name
        b = sum((10 + n) / total * torch.from_numpy(c[path + ".lora_B.weight"]).double() for n, c in contents.items())
        a = sum((10 + n) / total * torch.from_numpy(c[path + ".lora_A.weight"]).double() for n, c in contents.items())
        target = hand_products(contents)[path]
        errors.append(float(torch.linalg.matrix_norm(2.0 * b @ a - target) / torch.linalg.matrix_norm(target)))
    return errors


def product_of(model: dict[str, np.ndarray], path: str, scale: float) -> torch.Tensor:
    return scale * (torch.from_numpy(model[path + ".lora_B.weight"]).double()
                    @ torch.from_numpy(model[path + ".lora_A.weight"]).double())


# --- the factors mode: Flower's reductions on adapter replies ---------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ours, flower", [
    pytest.param({}, FedAvg, id="FedAvg"),
    pytest.param({"soup": {"lora": "factors"}}, FedAvg, id="FedAvg-explicit-factors"),
    pytest.param({"stew": {"optimizer": "fedadam", "lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-2}},
                 lambda: FedAdam(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2), id="FedAdam-on-factors"),
])
def test_factors_mode_is_flowers_strategy_on_adapter_replies(ours, flower, dtype):
    initial = record(adapter(dtype=dtype))
    expected, _, _ = run_rounds(flower(), initial)
    got, history, _ = run_rounds(FedSoup(adapter_config=CONFIG, **ours), initial)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-11}
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], err_msg=key, **tol)
        assert got[key].dtype == dtype
    assert np.abs(got[PREFIX + "q_proj.lora_B.weight"]).max() > 0.1  # the rounds moved the adapter
    for metrics in history:
        assert metrics[METRIC_CLIENTS_USED] == len(NODES)
        assert 0.0 < metrics[METRIC_LORA_ERROR_MEAN] <= metrics[METRIC_LORA_ERROR_MAX]


def test_factors_mode_reports_the_exact_factor_product_error():
    initial = record(adapter(zero_b=False))
    _, history, sent = run_rounds(FedSoup(adapter_config=CONFIG), initial, rounds=1)
    errors = hand_errors(sent[0][1])
    assert history[0][METRIC_LORA_ERROR_MAX] == pytest.approx(max(errors), rel=1e-6)  # float32 soups
    assert history[0][METRIC_LORA_ERROR_MEAN] == pytest.approx(sum(errors) / len(errors), rel=1e-6)


def test_products_mode_measures_the_factor_product_error_on_the_soups_stacks(monkeypatch):
    """The same figure as the factors mode (the replies' e_m), measured on the stack each module's
    soup of products is merged from: one stack a module, not a second one for the error."""
    import fedsoup.lora.measure as measure
    import strategies.products as products

    calls = []
    for module in (measure, products):
        monkeypatch.setattr(module, "stacked",
                            lambda *args, original=module.stacked: calls.append(1) or original(*args))
    _, history, sent = run_rounds(FedSoup(adapter_config=CONFIG, soup={"lora": "products"}),
                                  record(adapter(zero_b=False)), rounds=1)
    assert len(calls) == len(MODULES)
    errors = hand_errors(sent[0][1])
    assert history[0][METRIC_LORA_ERROR_MAX] == pytest.approx(max(errors), rel=1e-6)
    assert history[0][METRIC_LORA_ERROR_MEAN] == pytest.approx(sum(errors) / len(errors), rel=1e-6)


def test_bytes_sent_and_received_are_every_rounds_array_bytes():
    initial = record(adapter())
    _, history, sent = run_rounds(FedSoup(adapter_config=CONFIG), initial, rounds=2)
    for metrics, (arrays, contents) in zip(history, sent):
        assert metrics[METRIC_BYTES_SENT] == len(NODES) * arrays.count_bytes()
        assert metrics[METRIC_BYTES_RECEIVED] == sum(record(c).count_bytes() for c in contents.values())
    _, plain, _ = run_rounds(FedSoup(), initial, rounds=1)  # every run counts its bytes
    assert plain[0][METRIC_BYTES_SENT] > 0 and plain[0][METRIC_BYTES_RECEIVED] > 0


# --- the products mode: hand computations --------------------------------------------------

def test_products_soup_is_the_truncated_svd_of_the_soup_of_products():
    """Σ r_i = 16 > r = 4: the rank-4 adapter is the Eckart–Young truncation of the exact soup."""
    initial = record(adapter(zero_b=False))
    got, history, sent = run_rounds(FedSoup(adapter_config=CONFIG, soup={"lora": "products"}), initial, rounds=1)
    _, contents = sent[0]
    energies = []
    for path, target in hand_products(contents).items():
        u, s, vh = torch.linalg.svd(target)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        torch.testing.assert_close(product_of(got, path, 2.0), best, rtol=1e-5, atol=1e-5)
        a = torch.from_numpy(got[path + ".lora_A.weight"]).double()
        torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-6)  # A = V_rᵀ
        energies.append(float((s[:4] ** 2).sum() / (s ** 2).sum()))
    assert history[0][METRIC_SVD_ENERGY_MIN] == pytest.approx(min(energies), rel=1e-6)
    assert history[0][METRIC_SVD_ENERGY_MEAN] == pytest.approx(sum(energies) / 2, rel=1e-6)


def test_products_at_full_rank_are_exact_with_heterogeneous_ranks():
    """Ranks 1 + 1 + 1 + 1 = 4 = r: the SVD keeps everything; each reply scaled at its own rank."""
    initial = record(adapter(zero_b=False))
    ranks = {n: 1 for n in NODES}
    strategy = FedSoup(adapter_config=CONFIG, soup={"lora": "products"})
    got, history, sent = run_rounds(strategy, initial, rounds=1, ranks=ranks)
    _, contents = sent[0]
    for path, target in hand_products(contents).items():  # s_i = α/r_i = 8
        torch.testing.assert_close(product_of(got, path, 2.0), target, rtol=1e-5, atol=1e-5)
    assert history[0][METRIC_SVD_ENERGY_MIN] == pytest.approx(1.0, abs=1e-9)
    assert METRIC_LORA_ERROR_MAX in history[0]  # equal ranks among the replies: defined


def test_products_scale_rslora_replies_by_the_servers_config():
    config = {**CONFIG, "use_rslora": True, "lora_alpha": 3}
    initial = record(adapter(zero_b=False))
    ranks = {31: 1, 4: 2, 17: 1}  # Σ r_i = 4 = r: exact
    got, history, sent = run_rounds(FedSoup(adapter_config=config, soup={"lora": "products"}), initial,
                                    rounds=1, nodes=[31, 4, 17], ranks=ranks)
    _, contents = sent[0]
    for path, target in hand_products(contents, alpha=3.0, rslora=True).items():
        torch.testing.assert_close(product_of(got, path, 3.0 / 2.0), target, rtol=1e-5, atol=1e-5)
    assert METRIC_LORA_ERROR_MAX not in history[0]  # ranks differ: no soup of factors exists


def test_factored_truncated_svd_randomized_path_is_near_eckart_young_and_seeded():
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(60, 80, generator=generator, dtype=torch.float64)
    a = torch.randn(80, 50, generator=generator, dtype=torch.float64)
    c = torch.rand(80, generator=generator, dtype=torch.float64)
    dense = (b * c) @ a
    s = torch.linalg.svdvals(dense)
    first = factored_truncated_svd(b, a, 4, scale=c, seed=7, tolerance=1e-6)
    assert not first.exact and first.iterations >= 1
    best = float((s[:4] ** 2).sum() / (s ** 2).sum())
    captured = float((first.S ** 2).sum() / (s ** 2).sum())
    assert captured == pytest.approx(best, rel=1e-4)
    assert first.energy == pytest.approx(best, rel=0.05)  # the residual is estimated
    approx = (first.U * first.S) @ first.Vh
    assert float(torch.linalg.matrix_norm(dense - approx)) == pytest.approx(float((s[4:] ** 2).sum().sqrt()), rel=1e-3)
    again = factored_truncated_svd(b, a, 4, scale=c, seed=7, tolerance=1e-6)
    assert torch.equal(first.U, again.U) and torch.equal(first.Vh, again.Vh)
    loose = factored_truncated_svd(b, a, 4, scale=c, seed=7, tolerance=0.5)
    assert loose.iterations < first.iterations  # the tolerance decides when to stop


def test_factor_product_error_estimate_is_close_to_the_exact_error():
    """The round's error (fedsoup.lora.measure, as the offline merges): estimated from 16 probes
    above a stacked rank of 32, exact at or below 2·probes and without probes."""
    generator = torch.Generator().manual_seed(1)
    pairs = [LoraPair(torch.randn(8, 30, generator=generator), torch.randn(40, 8, generator=generator), 0.5 + i / 8)
             for i in range(8)]
    omega = [(i + 1) / 36 for i in range(8)]
    p_b, p_a = torch.randn(40, 8, generator=generator), torch.randn(8, 30, generator=generator)  # any P = P_B P_A
    q = sum(w * p.scale * p.B.double() @ p.A.double() for p, w in zip(pairs, omega))
    exact = float(torch.linalg.matrix_norm(p_b.double() @ p_a.double() - q) / torch.linalg.matrix_norm(q))
    assert factor_product_error(pairs, omega, soup=(p_b, p_a), probes=16, seed=0) == pytest.approx(exact, rel=0.25)
    assert factor_product_error(pairs, omega, soup=(p_b, p_a), probes=36, seed=0) == pytest.approx(exact, rel=1e-6)
    assert factor_product_error(pairs, omega, soup=(p_b, p_a)) == pytest.approx(exact, rel=1e-6)
    b_soup = sum(w * p.scale * p.B.double() for p, w in zip(pairs, omega))
    a_soup = sum(w * p.A.double() for p, w in zip(pairs, omega))
    averaged = float(torch.linalg.matrix_norm(b_soup @ a_soup - q) / torch.linalg.matrix_norm(q))
    assert factor_product_error(pairs, omega) == pytest.approx(averaged, rel=1e-9)  # the soups of the factors
    assert factor_product_error(pairs, omega, probes=16, seed=0) == pytest.approx(averaged, rel=0.25)


def test_stew_in_product_space_is_fedadam_on_delta_w():
    """r = min(d_out, d_in) so the truncation is exact: the adapter's s·B·A must be FedAdam's ΔW."""
    config = {**CONFIG, "r": 6, "target_modules": ["v_proj"]}
    modules = {"v_proj": (6, 12)}
    initial = record(adapter(rank=6, dtype=np.float64, zero_b=False, modules=modules))
    eta, b1, b2, tau = 0.05, 0.8, 0.95, 1e-2
    strategy = FedSoup(adapter_config=config, soup={"lora": "products"},
                       stew={"optimizer": "fedadam", "lr": eta, "betas": (b1, b2), "eps": tau})
    got, history, sent = run_rounds(strategy, initial, rounds=3)
    path = PREFIX + "v_proj"
    s = 8.0 / 6
    m = torch.zeros(6, 12, dtype=torch.float64)
    v = torch.zeros(6, 12, dtype=torch.float64)
    for t, (arrays, contents) in enumerate(sent, start=1):  # Flower's FedAdam, written out on ΔW
        x = product_of({k: a.numpy() for k, a in arrays.items()}, path, s)  # ΔW_{t−1} as sent
        delta = hand_products(contents, modules=modules)[path] - x  # Δ = mean − x
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta ** 2
        eta_t = eta * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))  # Flower's bias correction
        x = x + eta_t * m / (v.sqrt() + tau)
    torch.testing.assert_close(product_of(got, path, s), x, rtol=1e-9, atol=1e-9)
    assert strategy.server_stew.state_dict()["shapes"] == [[6, 12]]  # dense state: d_out × d_in
    assert all(h[METRIC_SVD_ENERGY_MIN] == pytest.approx(1.0) for h in history)


@pytest.mark.parametrize("stew", [None, {"optimizer": "fedadam", "lr": 0.05}])
def test_ame_soup_over_products_runs_and_reports_its_distance(stew):
    soup = {"lora": "products", "optimizer": "adam", "lr": 0.05, "epochs": 2}
    strategy = FedSoup(adapter_config=CONFIG, soup=soup, stew=stew)
    got, history, _ = run_rounds(strategy, record(adapter(zero_b=False)), rounds=2)
    assert all(h["fedsoup-ame-soup-distance"] > 0 and h["fedsoup-fallback"] == 0 for h in history)
    assert got[PREFIX + "q_proj.lora_A.weight"].shape == (4, 12)  # back at the configured rank


# --- bad adapter replies ---------------------------------------------------------------------

def _bad(kind: str, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    q = PREFIX + "q_proj"
    bad = dict(model)
    if kind == "other-rank":
        bad[q + ".lora_A.weight"] = np.ones((2, 12), np.float32)
        bad[q + ".lora_B.weight"] = np.ones((10, 2), np.float32)
    elif kind == "other-module":
        bad[PREFIX + "k_proj.lora_A.weight"] = np.ones((4, 12), np.float32)
        bad[PREFIX + "k_proj.lora_B.weight"] = np.ones((10, 4), np.float32)
    elif kind == "a-without-b":
        del bad[q + ".lora_B.weight"]
    elif kind == "missing-module":
        del bad[q + ".lora_A.weight"], bad[q + ".lora_B.weight"]
    elif kind == "ranks-disagree":
        bad[q + ".lora_A.weight"] = np.ones((3, 12), np.float32)
    elif kind == "other-shape":
        bad[q + ".lora_A.weight"] = np.ones((4, 11), np.float32)
    elif kind == "huge-rank":
        bad[q + ".lora_A.weight"] = np.ones((11, 12), np.float32)
        bad[q + ".lora_B.weight"] = np.ones((10, 11), np.float32)
    return bad


BAD = {  # kind -> (modes it is bad in, words of the logged reason)
    "other-rank": (("factors",), "has rank 2, the global adapter's is 4"),
    "other-module": (("factors", "products"), "adapts module 'layers.0.self_attn.k_proj'"),
    "a-without-b": (("factors", "products"), "lora_A without its lora_B"),
    "missing-module": (("factors", "products"), "no LoRA pair for module 'layers.0.self_attn.q_proj'"),
    "ranks-disagree": (("factors", "products"), "not the factors of one rank"),
    "other-shape": (("factors", "products"), "the global adapter's is (10, 12)"),
    "huge-rank": (("factors", "products"), "has rank 11"),  # products: "outside 1..min(d_out, d_in) = 10"
}


@pytest.mark.parametrize("mode", ["factors", "products"])
@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_adapter_replies_are_left_out_naming_the_node(kind, mode, caplog):
    modes, words = BAD[kind]
    initial = record(adapter(zero_b=False))
    grid = InProcessGrid([3, 5, 6, 8])

    def round_with(bad_node: bool):
        strategy = FedSoup(adapter_config=CONFIG, soup={"lora": mode})
        instructions = list(strategy.configure_train(1, initial, ConfigRecord(), grid))
        replies = []
        for msg in instructions:
            node = msg.metadata.dst_node_id
            content = client_adapter(node, 1, initial)
            if node == 6:
                if not bad_node:
                    continue
                content = _bad(kind, content)
            replies.append(reply(msg, train_content(content, num_examples=10 + node)))
        return strategy.aggregate_train(1, replies)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        got, metrics = round_with(bad_node=True)
    if mode not in modes:  # other ranks are merged by their products
        assert metrics[METRIC_CLIENTS_USED] == 4 and "left out" not in caplog.text
        return
    assert f"left out reply from node 6: array '{PREFIX}" in caplog.text
    assert words in caplog.text
    assert metrics[METRIC_CLIENTS_LEFT_OUT] == 1
    expected, _ = round_with(bad_node=False)
    for key in expected:
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())


# --- configuration --------------------------------------------------------------------------

def test_a_mode_that_cannot_apply_is_refused_at_start():
    plain = record({"fc.weight": np.ones((3, 2), np.float32)})
    strategy = FedSoup(adapter_config=CONFIG, soup={"lora": "products"})
    with pytest.raises(OptionError) as error:
        strategy.start(grid=InProcessGrid(NODES), initial_arrays=plain, num_rounds=1)
    assert error.value.option == "lora" and error.value.value == "products"
    with pytest.raises(OptionError) as error:  # the global adapter's rank is not the configuration's
        FedSoup(adapter_config={**CONFIG, "r": 8}).start(grid=InProcessGrid(NODES), initial_arrays=record(adapter()),
                                                         num_rounds=1)
    assert error.value.option == "adapter_config" and "rank 4 in the tensors, 8 in adapter_config.json" in str(error.value)


@pytest.mark.parametrize("kwargs, option", [
    ({"soup": {"lora": "products"}}, "lora"),  # LoRA options without the server's configuration
    ({"soup": {"lora": "product"}, "adapter_config": CONFIG}, "lora"),
    ({"soup": {"lora": "products", "lora_tolerance": -1}, "adapter_config": CONFIG}, "lora_tolerance"),
    ({"soup": {"lora_tolerance": 1e-3}, "adapter_config": CONFIG}, "lora_tolerance"),  # factors takes no SVD
    ({"adapter_config": {**CONFIG, "use_dora": True}}, "adapter_config"),
    ({"adapter_config": "/nonexistent/adapter"}, "adapter_config"),
])
def test_lora_options_are_checked_when_the_strategy_is_built(kwargs, option):
    with pytest.raises(OptionError) as error:
        FedSoup(**kwargs)
    assert error.value.option == option


def test_adapter_config_from_a_directory_and_from_peft(tmp_path):
    peft = pytest.importorskip("peft")
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, '
                                                  '"target_modules": ["q_proj", "v_proj"]}')
    from_dir = FedSoup(adapter_config=tmp_path).lora.settings
    from_peft = FedSoup(adapter_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).lora
    assert (from_dir.r, from_dir.lora_alpha) == (from_peft.settings.r, from_peft.settings.lora_alpha) == (4, 8.0)
    assert from_peft.settings.target_set == frozenset({"q_proj", "v_proj"}) and from_peft.mode == "factors"


@pytest.mark.parametrize("kwargs, mean", [
    ({"adapter_config": CONFIG}, True),
    ({"adapter_config": CONFIG, "soup": {"lora": "factors"}}, True),
    ({"adapter_config": CONFIG, "soup": {"lora": "products"}}, False),
    ({"adapter_config": CONFIG, "soup": {"lora": "factors"}, "stew": {"optimizer": "fedadam", "lr": 0.1}}, False),
])
def test_mean_aggregate_per_lora_mode(kwargs, mean):
    assert FedSoup(**kwargs).mean_aggregate is mean


# --- a run of PEFT clients ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["factors", "products"])
def test_three_round_start_result_loads_into_a_peft_model(mode):
    """Clients fine-tune a tiny Llama's PEFT adapter for real; the run's result is a PEFT adapter state."""
    peft = pytest.importorskip("peft")
    from tests.lora_helpers import llama_base
    from strategies.inprocess import InProcessGrid as Grid

    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    def peft_model():
        return peft.get_peft_model(llama_base(), lora_config)

    models = {}  # one PEFT model per node, as a ClientApp's process keeps its model

    def client(message):
        node, server_round = message.metadata.dst_node_id, message.content["config"]["server-round"]
        model = models.setdefault(node, peft_model())
        state = {k: torch.from_numpy(a.numpy()) for k, a in message.content["arrays"].items()}
        peft.set_peft_model_state_dict(model, state)
        torch.manual_seed(node * 100 + server_round)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            tokens = torch.randint(0, 64, (2, 8))
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        arrays = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
        return reply(message, train_content(arrays, num_examples=8 + node))

    initial = peft.get_peft_model_state_dict(peft_model())
    strategy = FedSoup(adapter_config=lora_config, soup={"lora": mode}, fraction_evaluate=0.0)
    result = strategy.start(grid=Grid([1, 2, 3], client), initial_arrays=ArrayRecord(
        {k: Array(v.numpy()) for k, v in initial.items()}), num_rounds=3)

    state = {k: torch.from_numpy(a.numpy()) for k, a in result.arrays.items()}
    assert state.keys() == initial.keys()
    model = peft_model()
    loaded = peft.set_peft_model_state_dict(model, state)
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lora_" in k]
    for key, tensor in peft.get_peft_model_state_dict(model).items():
        torch.testing.assert_close(tensor, state[key], rtol=0, atol=0)
    assert any(float(state[k].abs().max()) > 0 for k in state if "lora_B" in k)  # the rounds trained B
    tokens = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        tuned, base = model(input_ids=tokens).logits, llama_base()(input_ids=tokens).logits
    assert torch.isfinite(tuned).all() and not torch.allclose(tuned, base)
    for server_round in (1, 2, 3):
        metrics = result.train_metrics_clientapp[server_round]
        assert metrics[METRIC_CLIENTS_USED] == 3 and metrics[METRIC_BYTES_RECEIVED] > 0
        assert (METRIC_SVD_ENERGY_MIN in metrics) == (mode == "products")


def test_products_stew_state_survives_a_restart(tmp_path):
    """The dense ΔW stew state is checkpointed under module paths and restored: 2 + 1 rounds = 3 rounds."""
    kwargs = dict(adapter_config=CONFIG, soup={"lora": "products"}, stew={"optimizer": "fedadam", "lr": 0.05})
    initial = record(adapter(zero_b=False))
    expected, _, _ = run_rounds(FedSoup(**kwargs), initial, rounds=3)
    first = FedSoup(checkpoint_dir=tmp_path, **kwargs)
    run_rounds(first, initial, rounds=2)
    restarted = FedSoup(checkpoint_dir=tmp_path, **kwargs)
    assert restarted.server_stew.state_dict()["keys"] == [PREFIX + "q_proj", PREFIX + "v_proj"]
    grid = InProcessGrid(NODES)
    arrays = restarted.current_arrays
    instructions = list(restarted.configure_train(3, arrays, ConfigRecord(), grid))
    replies = [reply(msg, train_content(client_adapter(msg.metadata.dst_node_id, 3, arrays),
                                        num_examples=10 + msg.metadata.dst_node_id)) for msg in instructions]
    got, _ = restarted.aggregate_train(3, replies)
    for key in expected:
        np.testing.assert_array_equal(got[key].numpy(), expected[key])



def lora_kwargs(mode: str | None, stew) -> dict:
    """FedSoup's arguments for a LoRA ``mode`` (``None``: no adapter_config, adapters as plain arrays)."""
    return {"stew": stew} if mode is None else {"stew": stew, "adapter_config": CONFIG, "soup": {"lora": mode}}


@pytest.mark.parametrize("stew", [None, {"optimizer": "fedadam", "lr": 0.05}], ids=["no-stew", "fedadam"])
@pytest.mark.parametrize("saved, resumed", [
    ("products", "factors"), ("factors", "products"), ("products", None), ("factors", None),
    (None, "products"), (None, "factors"),
])
def test_a_state_written_under_another_lora_mode_is_refused_at_startup(tmp_path, saved, resumed, stew):
    """Before: restored, then every round fell back (to the previous model, with a stew in
    another space) or ran in a mode the state was not written for. Now refused at once,
    naming the entry (``lora``) and the checkpoint file, before any round."""
    first = FedSoup(checkpoint_dir=tmp_path, **lora_kwargs(saved, stew))
    run_rounds(first, record(adapter(zero_b=False)), rounds=2)
    with pytest.raises(StateError) as info:
        FedSoup(checkpoint_dir=tmp_path, **lora_kwargs(resumed, stew))
    assert (info.value.key, info.value.path) == ("lora", str(tmp_path / "state.json"))
    assert repr(saved) in info.value.reason and repr(resumed) in info.value.reason
    fresh = FedSoup(**lora_kwargs(resumed, stew))
    with pytest.raises(StateError) as info:
        fresh.load_state_dict(first.state_dict())
    assert (info.value.key, info.value.path) == ("lora", None)
    assert fresh.state_dict()["round"] == 0 and fresh.server_stew.optimizer is None  # nothing restored


@pytest.mark.parametrize("mode", ["factors", "products"])
def test_a_state_written_under_the_same_lora_mode_resumes(tmp_path, mode):
    kwargs = lora_kwargs(mode, {"optimizer": "fedadam", "lr": 0.05})
    run_rounds(FedSoup(checkpoint_dir=tmp_path, **kwargs), record(adapter(zero_b=False)), rounds=2)
    restarted = FedSoup(checkpoint_dir=tmp_path, **kwargs)
    _, history, _ = run_rounds(restarted, restarted.current_arrays, rounds=1)
    assert history[0][METRIC_FALLBACK] == FALLBACK_MERGE


@pytest.mark.parametrize("mode", ["factors", "products"])
def test_a_state_whose_adapter_does_not_match_adapter_config_is_refused_at_startup(tmp_path, mode):
    """Before: restored, and only the resumed run's first configure_train raised (OptionError)."""
    run_rounds(FedSoup(checkpoint_dir=tmp_path, **lora_kwargs(mode, None)), record(adapter(zero_b=False)), rounds=1)
    other_rank = {**lora_kwargs(mode, None), "adapter_config": {**CONFIG, "r": 8}}
    with pytest.raises(StateError, match="does not match the server's adapter_config") as info:
        FedSoup(checkpoint_dir=tmp_path, **other_rank)
    assert (info.value.key, info.value.path) == ("global", str(tmp_path / "state.json"))


@pytest.mark.parametrize("mode", ["factors", "products"])
def test_a_state_from_before_lora_mode_was_recorded_is_checked_by_its_description(mode):
    first = FedSoup(**lora_kwargs(mode, None))
    run_rounds(first, record(adapter(zero_b=False)), rounds=1)
    state = first.state_dict()
    del state["settings"]["lora_mode"]  # as written last session: only the description
    assert state["settings"]["lora"].startswith(f"LoRA {mode} (")
    FedSoup(**lora_kwargs(mode, None)).load_state_dict(state)
    other = "products" if mode == "factors" else "factors"
    with pytest.raises(StateError, match=f"written under LoRA mode {mode!r}, this FedSoup's is {other!r}"):
        FedSoup(**lora_kwargs(other, None)).load_state_dict(state)
    state["settings"]["lora"] = None
    with pytest.raises(StateError, match="written under LoRA mode None"):
        FedSoup(**lora_kwargs(mode, None)).load_state_dict(state)
    state["settings"]["lora"] = "garbled"
    with pytest.raises(StateError, match="written under LoRA mode 'garbled'"):
        FedSoup(**lora_kwargs(mode, None)).load_state_dict(state)


def test_the_soup_of_products_never_forms_a_dense_update(monkeypatch):
    """Plain soup + identity stew: every product goes through the factors (no ΔW_i, no dense M)."""
    import strategies.products as products

    def refuse(*args, **kwargs):
        raise AssertionError("a dense ΔW was formed")

    monkeypatch.setattr(products, "dense_products", refuse)
    monkeypatch.setattr(products, "randomized_svd", refuse)
    config = {**CONFIG, "target_modules": ["q_proj"]}
    initial = record(adapter(modules={"q_proj": (40, 48)}))  # 8 replies of r 4 on 40 x 48: the randomized path
    _, history, _ = run_rounds(FedSoup(adapter_config=config, soup={"lora": "products"}), initial,
                               rounds=2, nodes=list(range(1, 9)))
    assert all(h["fedsoup-fallback"] == 0 and h["fedsoup-lora-svd-iterations"] >= 1 for h in history)


def test_a_products_round_forms_the_global_adapters_dense_update_once(monkeypatch):
    """AME over products + a stateful stew: ``ΔW_{t−1} = s B_g A_g`` is formed once a round and
    shared by the ClientSoup (its ``current``) and the stew (the point it steps from)."""
    import strategies.products as products

    formed = []
    dense_products = products.dense_products
    monkeypatch.setattr(products, "dense_products",
                        lambda model, adapter: formed.append(id(model)) or dense_products(model, adapter))
    strategy = FedSoup(adapter_config=CONFIG, soup={"lora": "products", "optimizer": "adam", "lr": 0.01},
                       stew={"optimizer": "fedadam", "lr": 0.05})
    _, history, _ = run_rounds(strategy, record(adapter(zero_b=False)), rounds=2)
    assert [h["fedsoup-fallback"] for h in history] == [0, 0]
    assert len(formed) == 2 * (len(NODES) + 1)  # per round: each reply once, the global adapter once


def test_a_reply_whose_products_overflow_cannot_end_the_run(caplog):
    """Finite factors of 1e30 make s·B·A overflow float32: the round falls back, nothing raises."""
    initial = record(adapter(zero_b=False))
    grid = InProcessGrid([3, 5, 6])
    strategy = FedSoup(adapter_config=CONFIG, soup={"lora": "products"})
    instructions = list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    replies = []
    for msg in instructions:
        content = client_adapter(msg.metadata.dst_node_id, 1, initial)
        if msg.metadata.dst_node_id == 6:
            content = {k: np.full_like(v, 1e30) for k, v in content.items()}
        replies.append(reply(msg, train_content(content, num_examples=10)))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["fedsoup-fallback"] == 2 and arrays is None  # the previous adapter is kept
    assert "using the previous model" in caplog.text


@pytest.mark.parametrize("mode", ["factors", "products"])
def test_modules_to_save_tensors_are_averaged_as_tensors(mode):
    config = {**CONFIG, "modules_to_save": ["score"]}
    model = adapter(zero_b=False)
    model["base_model.model.score.weight"] = np.ones((3, 12), np.float32)
    got, history, sent = run_rounds(FedSoup(adapter_config=config, soup={"lora": mode}), record(model), rounds=1)
    _, contents = sent[0]
    total = sum(10 + n for n in contents)
    expected = sum((10 + n) / total * c["base_model.model.score.weight"].astype(np.float64) for n, c in contents.items())
    np.testing.assert_allclose(got["base_model.model.score.weight"], expected, rtol=1e-6, atol=1e-6)
    assert history[0][METRIC_CLIENTS_USED] == len(NODES)


def test_products_send_back_each_modules_configured_rank():
    """rank_pattern: q_proj at r 4, v_proj at r 2 (s = 8/2): each module's best approximation at its rank."""
    config = {**CONFIG, "rank_pattern": {"v_proj": 2}}
    model = adapter(zero_b=False)
    v = PREFIX + "v_proj"
    model[v + ".lora_A.weight"], model[v + ".lora_B.weight"] = model[v + ".lora_A.weight"][:2], model[v + ".lora_B.weight"][:, :2]
    got, _, sent = run_rounds(FedSoup(adapter_config=config, soup={"lora": "products"}), record(model), rounds=1)
    assert got[v + ".lora_A.weight"].shape == (2, 12) and got[PREFIX + "q_proj.lora_A.weight"].shape == (4, 12)
    _, contents = sent[0]
    total = sum(10 + n for n in contents)
    target = sum((10 + n) / total * 4.0 * (torch.from_numpy(c[v + ".lora_B.weight"]).double()
                                           @ torch.from_numpy(c[v + ".lora_A.weight"]).double()) for n, c in contents.items())
    u, s, vh = torch.linalg.svd(target)
    torch.testing.assert_close(product_of(got, v, 4.0), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-5, atol=1e-5)
