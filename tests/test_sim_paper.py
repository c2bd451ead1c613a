"""Paper reproductions on small settings: the code paths and the headline effects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fedsoup
from simulations import paper_cauchy, paper_table1


def test_cauchy_adam_ame_beats_the_soup_on_heavy_tails(tmp_path):
    rc = paper_cauchy.main(["--trials", "40", "--ingredients", "100", "--population", "5000",
                            "--epochs", "200", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    cauchy = res["cauchy"]["estimators"]
    assert cauchy["Adam-AME (lr 0.1)"]["median distance"] < cauchy["Soup (mean)"]["median distance"]
    assert cauchy["Adam-AME (lr 0.1)"]["closer than soup"] > 0.6
    gauss = res["gaussian"]["estimators"]
    # no heavy tails: constant-lr GD-AME lands where the soup does
    assert gauss["GD-AME (lr 0.1)"]["median distance"] == pytest.approx(gauss["Soup (mean)"]["median distance"], rel=0.2)
    assert (tmp_path / "cauchy.png").exists() and "| cauchy | Soup (mean) |" in (tmp_path / "cauchy.md").read_text()


def test_batched_trials_equal_separate_merges():
    """One merge over (trials, 2) tensors is exactly one merge per trial (element-wise Adam)."""
    rng = np.random.default_rng(0)
    samples = rng.standard_cauchy((3, 30, 2))
    hp = {"optimizer": "adam", "lr": 0.1, "betas": (0.2, 0.2), "eps": 1e-8, "schedule": "constant",
          "epochs": 3, "batch_size": 5, "shuffle": True, "seed": 0}
    batched = fedsoup.merge([{"w": torch.from_numpy(samples[:, i].copy())} for i in range(30)],
                            pivot={"w": torch.full((3, 2), 10.0, dtype=torch.float64)}, **hp)["w"]
    for t in range(3):
        single = fedsoup.merge([{"w": torch.from_numpy(samples[t, i].copy())} for i in range(30)],
                               pivot={"w": torch.full((2,), 10.0, dtype=torch.float64)}, **hp)["w"]
        torch.testing.assert_close(batched[t], single)


def test_greedy_soup_keeps_only_strict_improvements():
    experts = [{"w": torch.tensor([float(v)])} for v in (0.0, 10.0, 2.0, 4.0)]
    # score: closeness of the soup to 2.0
    merged, kept = paper_table1.greedy_soup(experts, [0, 1, 2, 3], lambda s: -abs(float(s["w"]) - 2.0))
    assert kept == [0, 2, 3]  # 10 makes it worse; 2 -> mean 1; 4 -> mean 2
    assert float(merged["w"]) == pytest.approx(2.0)


def test_table1_protocol_quick(tmp_path, capsys):
    rc = paper_table1.main(["--ood", "0.5", "--experts-per-loader", "1", "--epochs", "3", "--quick",
                            "--out", str(tmp_path)])
    assert rc == 0
    level = json.loads((tmp_path / "results.json").read_text())["levels"][0]
    for method in paper_table1.METHODS:
        assert 0.0 <= level[method]["test"] <= 1.0
    # an expert that never saw half the classes cannot get more than ~half of the test set right
    assert level["Best ingredient"]["test"] < 0.6
    assert level["Soup"]["test"] > level["Best ingredient"]["test"]
    assert "| 50% |" in (tmp_path / "table1.md").read_text()
    assert (tmp_path / "table1.png").exists()


def test_table1_protocol_runs_on_cifar10_binary_files(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "cifar"
    data.mkdir()
    for name, n in (("data_batch_1.bin", 100), ("test_batch.bin", 20)):
        records = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        records[:, 0] = np.arange(n) % 10
        records.tofile(data / name)
    rc = paper_table1.main(["--dataset", "cifar10", "--data-dir", str(data), "--ood", "0.9",
                            "--experts-per-loader", "1", "--epochs", "1", "--quick", "--out", str(tmp_path / "out")])
    assert rc == 0
    level = json.loads((tmp_path / "out" / "results.json").read_text())["levels"][0]
    # an expert trained on a single class predicts that class: 10% of a balanced test set
    assert level["Best ingredient"]["test"] == pytest.approx(0.1)


def test_table1_reports_missing_data_dir(tmp_path, capsys):
    assert paper_table1.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
