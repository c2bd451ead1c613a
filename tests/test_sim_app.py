"""The Flower App end to end: ClientApp replies, in-process comparison, Ray simulation, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from simulations.client_app import make_client_app
from simulations.compare import StrategyRun, main as compare_main, parse_strategy, run_comparison_inprocess
from simulations.models import make_model
from strategies.inprocess import serverapp_identity

ROOT = Path(__file__).resolve().parents[1]
TINY = {"dataset": "digits", "num-partitions": 4, "num-server-rounds": 2, "local-epochs": 1,
        "partitioning": "class-exclusion", "ood-fraction": 0.3}


def train_message(state) -> Message:
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type="train")


def context(pid: int | None, n: int = 4) -> Context:
    node_config = {} if pid is None else {"partition-id": pid, "num-partitions": n}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_client_trains_its_shard_and_reports_metrics():
    init = make_model("digits", seed=0).state_dict()
    with serverapp_identity():
        msg = train_message(init)
    reply = make_client_app(TINY)(msg, context(pid=1))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and 0.0 <= metrics["val-acc"] <= 1.0
    new = reply.content["arrays"].to_torch_state_dict()
    assert set(new) == set(init) and not torch.equal(new["net.0.weight"], init["net.0.weight"])
    # a pure function of (global model, shard, seed)
    again = make_client_app(TINY)(msg, context(pid=1)).content["arrays"].to_torch_state_dict()
    assert all(torch.equal(new[k], again[k]) for k in new)


def test_attacking_client_sends_a_flipped_update():
    init = make_model("digits", seed=0).state_dict()
    with serverapp_identity():
        msg = train_message(init)
    honest = make_client_app(TINY)(msg, context(pid=0)).content["arrays"].to_torch_state_dict()
    evil_cfg = {**TINY, "attack": "sign-flip", "attack-fraction": 1.0, "attack-scale": 1.0}
    evil = make_client_app(evil_cfg)(msg, context(pid=0)).content["arrays"].to_torch_state_dict()
    for k in honest:
        torch.testing.assert_close(evil[k] - init[k], -(honest[k] - init[k]))


def test_client_without_partition_id_says_how_to_fix_it():
    with serverapp_identity():
        msg = train_message(make_model("digits", seed=0).state_dict())
    with pytest.raises(ValueError, match="--node-config 'partition-id=<i> num-partitions=<n>'"):
        make_client_app(TINY)(msg, context(pid=None))


def test_plain_fedsoup_equals_fedavg_in_process():
    runs = [StrategyRun("avg", {"strategy": "fedavg"}), StrategyRun("soup", {"strategy": "fedsoup"})]
    run_comparison_inprocess(TINY, runs)
    avg, soup = runs[0].rows, runs[1].rows
    assert [r["round"] for r in avg] == [0, 1, 2]
    assert avg[-1]["test-accuracy"] > avg[0]["test-accuracy"]  # it learns
    for a, s in zip(avg, soup):
        assert s["test-accuracy"] == pytest.approx(a["test-accuracy"], abs=1e-6)
        assert s["test-loss"] == pytest.approx(a["test-loss"], rel=1e-4)


def test_compare_rejects_client_side_overrides_and_bad_specs(capsys):
    assert parse_strategy("fedsoup soup-lr=0.1 label='AME x'") == ("AME x", {"strategy": "fedsoup", "soup-lr": "0.1"})
    assert compare_main(["--strategy", "fedavg lr=0.5"]) == 2
    assert "client-side key(s) ['lr']" in capsys.readouterr().err
    assert compare_main(["--strategy", "fedavg", "--strategy", "fedavg"]) == 2
    assert compare_main(["--set", "dataset=mnist"]) == 2


def test_compare_writes_table_csv_json_and_plot(tmp_path, capsys):
    args = ["--backend", "inprocess", "--out", str(tmp_path)]
    args += [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    args += ["--strategy", "fedavg label=FedAvg", "--strategy", "fedmedian label=FedMedian"]
    assert compare_main(args) == 0
    printed = capsys.readouterr().out
    run = tmp_path / "latest"
    table = (run / "table.md").read_text()
    assert "| FedAvg |" in table and "| FedMedian |" in table and "| FedAvg |" in printed
    assert "rounds (s)" in table and "Set-up before the first strategy" in table
    data = json.loads((run / "results.json").read_text())
    assert [s["label"] for s in data["strategies"]] == ["FedAvg", "FedMedian"]
    assert len(data["strategies"][0]["rounds"]) == 3
    assert data["setup-seconds"] >= 0 and all(s["seconds"] > 0 for s in data["strategies"])
    csv_lines = (run / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("strategy,round,") and len(csv_lines) == 1 + 2 * 3
    assert (run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


AME_SPEC = "fedsoup soup-optimizer=adam soup-lr=0.01 soup-epochs=2 soup-shuffle=true order-by=val-acc label=AME"


@pytest.mark.slow
def test_ray_simulation_end_to_end(tmp_path):
    """`python -m simulations.compare` on Flower's simulation engine (Ray), as `make demo` runs it."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "simulations.compare", "--out", str(tmp_path / "out"),
           "--strategy", "fedavg", "--strategy", AME_SPEC]
    cmd += [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| fedavg |" in proc.stdout and "| AME |" in proc.stdout
    # quiet logs: no deprecation of run_simulation, no Ray FutureWarning, no empty evaluate lines
    output = proc.stdout + proc.stderr
    assert "DEPRECATED" not in output and "FutureWarning" not in output, output[-3000:]
    assert "aggregate_evaluate: Received 0 results" not in output
    strategies = json.loads((tmp_path / "out" / "latest" / "results.json").read_text())["strategies"]
    # the Ray run gives the same numbers as the in-process run of the same clients, also for
    # an order-sensitive AME soup: clients are ordered by val-acc, ties broken by the partition id
    # they report (not by Ray's random node ids)
    ref = [StrategyRun("fedavg", {"strategy": "fedavg"}), StrategyRun(*parse_strategy(AME_SPEC))]
    run_comparison_inprocess(TINY, ref)
    for got, want in zip(strategies, ref):
        assert [r["test-accuracy"] for r in got["rounds"]] == pytest.approx([r["test-accuracy"] for r in want.rows])


def test_cifar_client_trains_the_cnn_on_local_binary_data(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1.bin", 40), ("test_batch.bin", 10)):
        records = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        records[:, 0] = np.arange(n) % 10
        records.tofile(tmp_path / name)
    cfg = {"dataset": "cifar10", "data-dir": str(tmp_path), "partitioning": "iid", "num-partitions": 2,
           "batch-size": 8, "local-epochs": 1}
    init = make_model("cifar10", seed=0).state_dict()
    with serverapp_identity():
        msg = train_message(init)
    reply = make_client_app(cfg)(msg, context(pid=0, n=2))
    assert reply.content["metrics"]["num-examples"] == 18  # 20 of 40, 10% held out for val-acc
    new = reply.content["arrays"].to_torch_state_dict()
    assert not torch.equal(new["head.3.weight"], init["head.3.weight"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_local_superlink(flwr_home: Path) -> None:
    """Stop the SuperLink that `flwr run` detached for this test (found by its unique FLWR_HOME)."""
    import signal

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"flower-superlink" in a for a in argv) and any(str(flwr_home).encode() in a for a in argv):
            os.kill(int(proc.name), signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to stop the detached SuperLink")
def test_flwr_run_from_the_repository_root(tmp_path):
    """`flwr run .` with the [tool.flwr.app] sections of pyproject.toml, on the simulation engine."""
    home, out = tmp_path / "flwr", tmp_path / "out"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           # private ports: never talk to another local SuperLink on this machine
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run_config = {"num-server-rounds": 2, "num-partitions": 4, "local-epochs": 1}
    overrides = " ".join(f"{k}={v}" for k, v in run_config.items()) + f" output-dir='{out}'"
    try:
        proc = subprocess.run(["flwr", "run", ".", "--stream", "--federation-config", "num-supernodes=4",
                               "-c", overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        _stop_local_superlink(home)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = json.loads((out / "rounds.json").read_text())["rounds"]
    assert (out / "final_model.safetensors").stat().st_size > 0
    ref = [StrategyRun("fedavg", {"strategy": "fedavg"})]
    run_comparison_inprocess(run_config, ref)
    assert [r["test-accuracy"] for r in rows] == pytest.approx([r["test-accuracy"] for r in ref[0].rows])


def test_federated_evaluation_metrics_are_recorded():
    runs = [StrategyRun("avg", {"strategy": "fedavg", "fraction-evaluate": 1.0})]
    run_comparison_inprocess(TINY, runs)
    last = runs[0].rows[-1]
    assert 0.0 <= last["clients-eval-acc"] <= 1.0 and last["clients-eval-loss"] > 0
