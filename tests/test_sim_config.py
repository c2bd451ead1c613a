"""Run config: pyproject defaults, validation, strategy construction."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.serverapp import strategy as fs

from simulations.config import DEFAULTS, SimConfig
from simulations.strategy_factory import build_strategy, soup_settings, stew_settings

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_equals_defaults():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]
    assert flwr["app"]["config"] == DEFAULTS
    assert flwr["app"]["components"] == {
        "serverapp": "simulations.server_app:app",
        "clientapp": "simulations.client_app:app",
    }


def test_overrides_are_merged_and_converted():
    cfg = SimConfig.from_run_config({"num-server-rounds": 3, "lr": "0.1"}, {"soup-shuffle": "true", "seed": 7})
    assert (cfg.num_server_rounds, cfg.lr, cfg.soup_shuffle, cfg.seed) == (3, 0.1, True, 7)
    assert SimConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize("config, message", [
    ({"num-rounds": 3}, "unknown run config key 'num-rounds'"),
    ({"strategy": "fedprox"}, "'strategy' = 'fedprox' is not one of"),
    ({"partitioning": "shards"}, "'partitioning' = 'shards'"),
    ({"local-epochs": 1.5}, "'local-epochs' = 1.5 is not a valid int"),
    ({"soup-shuffle": "maybe"}, "'soup-shuffle' = 'maybe' is not a valid bool"),
    ({"attack-fraction": 2.0}, "'attack-fraction' must be in"),
    ({"num-server-rounds": 0}, "'num-server-rounds' must be >= 1"),
    ({"max-weight-share": 1.5}, r"'max-weight-share' must be in \[0, 1\]"),
    ({"max-weight-share": -0.2}, r"'max-weight-share' must be in \[0, 1\]"),
    ({"max-weight-share": "nan"}, r"'max-weight-share' must be in \[0, 1\]"),
    ({"max-weight-share": "a fifth"}, "'max-weight-share' = 'a fifth' is not a valid float"),
])
def test_bad_run_config_names_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        SimConfig.from_run_config(config)


@pytest.mark.parametrize("name, cls", [
    ("fedavg", fs.FedAvg), ("fedavgm", fs.FedAvgM), ("fedadam", fs.FedAdam), ("fedyogi", fs.FedYogi),
    ("fedmedian", fs.FedMedian), ("fedtrimmedavg", fs.FedTrimmedAvg), ("krum", fs.Krum),
])
def test_every_flower_strategy_is_built(name, cls):
    strategy = build_strategy(SimConfig(strategy=name), 10)
    assert type(strategy) is cls
    assert strategy.min_available_nodes == 10


def test_server_lr_zero_keeps_flower_defaults_and_krum_counts_attackers():
    assert build_strategy(SimConfig(strategy="fedadam"), 10).eta == pytest.approx(0.1)
    assert build_strategy(SimConfig(strategy="fedadam", server_lr=0.02), 10).eta == pytest.approx(0.02)
    krum = build_strategy(SimConfig(strategy="krum", attack="sign-flip", attack_fraction=0.3), 10)
    assert krum.num_malicious_nodes == 3


def test_soup_and_stew_settings():
    assert soup_settings(SimConfig()) is None  # plain soup = FedAvg
    soup = soup_settings(SimConfig(soup_optimizer="adamw", soup_lr=0.01, soup_epochs=3,
                                   soup_weight_decay=0.1, soup_beta1=0.8, soup_beta2=0.9))
    assert soup == {"optimizer": "adamw", "lr": 0.01, "schedule": "harmonic", "epochs": 3, "batch_size": 1,
                    "shuffle": False, "betas": (0.8, 0.9), "eps": 1e-8, "weight_decay": 0.1}
    assert stew_settings(SimConfig()) == {"optimizer": "sgd", "lr": 1.0}
    assert stew_settings(SimConfig(stew_optimizer="fedadam", stew_lr=0.1)) == {
        "optimizer": "fedadam", "lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-3}


def test_fedsoup_strategy_is_built():
    from strategies import FedSoup

    strategy = build_strategy(SimConfig(strategy="fedsoup", soup_optimizer="adam", order_by="val-acc"), 5)
    assert isinstance(strategy, FedSoup)


def test_max_weight_share_reaches_fedsoup():
    from strategies import FedSoup

    capped = build_strategy(SimConfig.from_run_config({"strategy": "fedsoup", "max-weight-share": "0.25"}), 5)
    assert isinstance(capped, FedSoup) and capped.client_soup.max_weight_share == 0.25
    assert build_strategy(SimConfig(strategy="fedsoup"), 5).client_soup.max_weight_share is None  # 0: no cap
    assert build_strategy(SimConfig(strategy="fedsoup", max_weight_share=1.0), 5).client_soup.max_weight_share == 1.0
