"""`simulations.compare --preset ood-sweep` and `--sweep`: one comparison per swept value, over seeds."""

from __future__ import annotations

import json

from simulations.compare import PRESETS, main as compare_main


def test_ood_sweep_preset_is_the_issue_setting():
    preset = PRESETS["ood-sweep"]
    assert preset["sweep"] == ("ood-fraction", (0.5, 0.6, 0.7, 0.8, 0.9))
    assert preset["base"]["dataset"] == "digits" and preset["base"]["num-partitions"] == 10
    assert preset["base"]["partitioning"] == "class-exclusion" and preset["backend"] == "inprocess"
    assert len(preset["seeds"]) >= 3
    labels = [s["label"] for s in preset["strategies"]]
    assert labels == ["FedAvg", "FedAdam", "FedSoup (AME ClientSoup)", "FedSoup (AME ClientSoup + Adam ServerStew)"]
    assert all(a in labels and b in labels for a, b in preset["pairs"])


def test_ood_sweep_tiny_writes_tables_json_and_plot(tmp_path, capsys):
    args = ["--preset", "ood-sweep", "--sweep", "ood-fraction=0.5,0.8", "--seeds", "0", "1",
            "--set", "num-partitions=4", "--set", "num-server-rounds=1", "--set", "local-epochs=1",
            "--out", str(tmp_path)]
    assert compare_main(args) == 0
    assert "strategy × seed × round" not in capsys.readouterr().err  # no bar in captured output
    run = tmp_path / "latest"
    res = json.loads((run / "sweep.json").read_text())
    assert res["key"] == "ood-fraction" and [p["value"] for p in res["points"]] == [0.5, 0.8]
    preset_labels = [s["label"] for s in PRESETS["ood-sweep"]["strategies"]]
    for point in res["points"]:
        assert list(point["final-test-accuracy"]) == preset_labels
        assert all(len(s["values"]) == 2 for s in point["final-test-accuracy"].values())
        assert [(d["strategy"], d["reference"]) for d in point["differences"]] == \
            [tuple(p) for p in PRESETS["ood-sweep"]["pairs"]]
        for d in point["differences"]:
            assert d["low"] <= d["mean"] <= d["high"] and d["verdict"] in ("gain", "tie", "loss")
    md = (run / "sweep.md").read_text()
    assert md.count("| FedSoup (AME ClientSoup) |") == 1 and "| 0.8 |" in md and "95% t-interval" in md
    assert (run / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for value in ("0.5", "0.8"):
        assert (run / f"ood-fraction-{value}" / "table.md").exists()
        assert (run / f"ood-fraction-{value}" / "seed-1" / "results.json").exists()


def test_sweep_rejects_bad_specs(capsys):
    assert compare_main(["--sweep", "ood-fraction"]) == 2
    assert compare_main(["--sweep", "partitioning=iid,dirichlet"]) == 2
    assert compare_main(["--strategy", "fedsoup soup-lr=0.1", "--sweep", "soup-lr=0.1,0.2"]) == 2
    err = capsys.readouterr().err
    assert "KEY=V1,V2" in err and "must be numbers" in err and "sweep a shared key" in err
