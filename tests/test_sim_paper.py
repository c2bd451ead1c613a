"""Paper reproductions on small settings: the code paths and the headline effects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fedsoup
from simulations import paper_cauchy, paper_input_space, paper_table1
from simulations.stats import PairedDifference, Spread


def test_cauchy_adam_ame_beats_the_soup_on_heavy_tails(tmp_path):
    rc = paper_cauchy.main(["--trials", "40", "--ingredients", "100", "--population", "5000",
                            "--epochs", "200", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    cauchy = res["cauchy"]["estimators"]
    assert cauchy["Adam-AME (lr 0.1)"]["median distance"] < cauchy["Soup (mean)"]["median distance"]
    assert cauchy["Adam-AME (lr 0.1)"]["closer than soup"] > 0.6
    gauss = res["gaussian"]["estimators"]
    # no heavy tails: constant-lr GD-AME lands where the soup does
    assert gauss["GD-AME (lr 0.1)"]["median distance"] == pytest.approx(gauss["Soup (mean)"]["median distance"], rel=0.2)
    assert (tmp_path / "latest" / "cauchy.png").exists()
    assert "| cauchy | Soup (mean) |" in (tmp_path / "latest" / "cauchy.md").read_text()


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


def test_table1_protocol_quick_over_two_seeds(tmp_path, capsys):
    rc = paper_table1.main(["--ood", "0.5", "0.9", "--experts-per-loader", "1", "--epochs", "3", "--quick",
                            "--seeds", "0", "1", "--val-size", "150", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert res["seeds"] == [0, 1] and res["seconds"] > 0
    assert [run["seed"] for run in res["per_seed"]] == [0, 1]
    assert all(run["val_size"] == 150 for run in res["per_seed"])
    level = res["per_seed"][0]["levels"][0]
    # an expert that never saw half the classes cannot get more than ~half of the test set right
    assert level["Best ingredient"]["test"] < 0.6
    assert level["Soup"]["test"] > level["Best ingredient"]["test"]
    assert [e["ood"] for e in res["summary"]] == [0.5, 0.9]
    for entry in res["summary"]:
        for method in paper_table1.METHODS:
            test = entry[method]["test"]
            assert len(test["values"]) == 2 and test["mean"] == pytest.approx(np.mean(test["values"]))
        diff = entry["ame_minus_soup"]
        assert diff["low"] <= diff["mean"] <= diff["high"] and diff["confidence"] == 0.95
        assert diff["wins"] + diff["ties"] + diff["losses"] == 2
        assert diff["values"] == pytest.approx([a - s for a, s in zip(entry["AME-AdamW"]["test"]["values"],
                                                                     entry["Soup"]["test"]["values"])])
    table = (tmp_path / "latest" / "table1.md").read_text()
    assert "| 50% |" in table and "| 90% |" in table and " ± " in table and "AME-AdamW − soup" in table
    assert (tmp_path / "latest" / "table1.png").read_bytes()[:4] == b"\x89PNG"
    assert "wall time" in capsys.readouterr().out


def test_paired_difference_t_interval():
    d = PairedDifference.of([0.9, 0.8, 0.7], [0.8, 0.8, 0.5])
    diffs = np.array([0.1, 0.0, 0.2])
    half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    assert d.mean == pytest.approx(0.1) and d.high - d.mean == pytest.approx(half)
    assert (d.wins, d.ties, d.losses) == (2, 1, 0) and d.verdict() == "tie"
    assert PairedDifference.of([0.9, 0.91, 0.92], [0.5, 0.5, 0.52]).verdict() == "gain"
    one = PairedDifference.of([0.9], [0.8])
    assert one.as_dict()["low"] is None and one.text() == "+10.00 pt"
    assert Spread.of([0.5]).text() == "50.00%" and Spread.of([0.5, 0.7]).text(".2f") == "0.60 ± 0.14"
    with pytest.raises(ValueError, match="equal lengths"):
        PairedDifference.of([1.0], [1.0, 2.0])


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
    level = json.loads((tmp_path / "out" / "latest" / "results.json").read_text())["per_seed"][0]["levels"][0]
    # an expert trained on a single class predicts that class: 10% of a balanced test set
    assert level["Best ingredient"]["test"] == pytest.approx(0.1)


def test_table1_reports_missing_data_dir(tmp_path, capsys):
    assert paper_table1.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_input_space_batched_trials_equal_separate_merges():
    """One AdamW merge over (trials, 64) pivots is exactly one merge per trial (element-wise)."""
    rng = np.random.default_rng(0)
    images = rng.random((12, 64), dtype=np.float32)
    pivots = rng.random((3, 64), dtype=np.float32)
    hp = {**paper_input_space.PAPER_AME, **paper_input_space.UNSTATED_DEFAULTS, "epochs": 3}
    batched = paper_input_space.synthesise(images, pivots, seed=5, **hp)
    assert batched.shape == (3, 64)
    for t in range(3):
        single = paper_input_space.synthesise(images, pivots[t:t + 1], seed=5, **hp)
        np.testing.assert_allclose(batched[t], single[0], rtol=1e-6, atol=1e-7)


def test_input_space_quick(tmp_path, capsys):
    rc = paper_input_space.main(["--classes", "0", "7", "--trials", "6", "--orders", "2", "--epochs", "3",
                                 "--columns", "4", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert res["classifier_test_accuracy"] > 0.9
    assert [c["class"] for c in res["classes"]] == [0, 7]
    for c in res["classes"]:
        assert c["trials"] == 6 and c["orders"] == 2 and c["ingredients"] > 100
        assert 0.0 <= c["ame_accuracy"] <= 1.0 and isinstance(c["soup_correct"], bool)
        # AME moves the random pivots most of the way to the class's images
        assert c["rms_ame_to_mean"] < c["rms_pivot_to_mean"] / 2
    table = (tmp_path / "latest" / "input_space.md").read_text()
    assert "| 0 |" in table and "| 7 |" in table and "| all |" in table
    assert (tmp_path / "latest" / "input_space.png").read_bytes()[:4] == b"\x89PNG"
    assert paper_input_space.main(["--classes", "12", "--out", str(tmp_path)]) == 2
