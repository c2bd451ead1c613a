"""FedSoup on a real Flower deployment, as processes on loopback (docker-compose.yml without Docker).

One SuperLink, three SuperNodes (``--node-config 'partition-id=i num-partitions=3'``)
and their SuperExecs, ``flwr run .`` of this repository's App with
``strategy="fedsoup"``:

* a 2-round run finishes, the global model's test accuracy rose, the checkpoint exists;
* kill-and-resume: the server side (SuperLink, its SuperExec and the ServerApp) is
  SIGKILLed after round 1; restarted on the same state database and resubmitted with
  the same checkpoint directory, the run continues at round 2 and ends with exactly
  the model of the uninterrupted run;
* TLS (through ``scripts/deploy-local.sh --tls``): the run passes over HTTPS with
  certificates from ``scripts/make-certs.sh``; a SuperNode without the CA certificate
  (or one that speaks plain HTTP) is refused.

Every process started here is stopped, whatever happens (fixtures + process groups).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _load_local_federation():
    spec = importlib.util.spec_from_file_location("local_federation", SCRIPTS / "local_federation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_federation"] = module
    spec.loader.exec_module(module)
    return module


lf = _load_local_federation()

NUM_SUPERNODES = 3
# Small and quick (scikit-learn digits, one local epoch). The ServerStew keeps a
# momentum buffer, so resuming must restore optimizer state, not only the model.
RUN_CONFIG = {
    "strategy": "fedsoup",
    "num-server-rounds": 2,
    "num-partitions": NUM_SUPERNODES,
    "dataset": "digits",
    "partitioning": "iid",
    "local-epochs": 1,
    "stew-optimizer": "sgd",
    "stew-lr": 1.0,
    "stew-momentum": 0.5,
}


def read_rounds(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "rounds.json").read_text())["rounds"]


def checkpoint_round(checkpoint_dir: Path) -> int | None:
    from fedsoup.state import has_checkpoint, load_checkpoint

    if not has_checkpoint(checkpoint_dir):
        return None
    return int(load_checkpoint(checkpoint_dir)["round"])


def assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"tensor '{key}' differs: max |diff| {(a[key] - b[key]).abs().max()}"


def assert_all_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 15
    alive = [p for p in pids if lf._pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if lf._pid_alive(p)]
    assert not alive, f"processes still running after teardown: {alive}"


# --------------------------------------------------------------------------- plain HTTP federation
@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = lf.LocalFederation(tmp_path_factory.mktemp("deploy"), NUM_SUPERNODES)
    started: list[int] = []
    try:
        fed.start()
        yield fed
    finally:
        started = [p.pid for p in fed.processes.values()]
        started += [c for p in fed.processes.values() for c in lf.descendants(p.pid)]
        fed.stop()
        assert_all_gone(started)


@pytest.fixture(scope="module")
def uninterrupted(federation):
    """The reference: 2 FedSoup rounds without interruption."""
    out = federation.workdir / "uninterrupted"
    config = RUN_CONFIG | {"checkpoint-dir": str(out / "checkpoints"), "output-dir": str(out / "outputs")}
    start = time.perf_counter()
    run_id, status = federation.run(ROOT, config, timeout=400)
    seconds = time.perf_counter() - start
    print(f"\n[deploy e2e] 2-round FedSoup run on 3 SuperNodes: {seconds:.1f}s wall")
    return {"run_id": run_id, "status": status, "dir": out, "seconds": seconds}


def test_fedsoup_two_rounds_on_a_local_deployment(federation, uninterrupted):
    log = federation.run_log(uninterrupted["run_id"])
    assert uninterrupted["status"] == lf.FINISHED_OK, log[-3000:]
    assert "[ROUND 2/2]" in log and "FedSoup merged 3 replies" in log, log[-3000:]

    rounds = {row["round"]: row for row in read_rounds(uninterrupted["dir"] / "outputs")}
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[2]["test-accuracy"] > rounds[0]["test-accuracy"] + 0.2, rounds
    assert rounds[2]["clients-fedsoup-clients-used"] == NUM_SUPERNODES

    checkpoint_dir = uninterrupted["dir"] / "checkpoints"
    assert checkpoint_round(checkpoint_dir) == 2
    from fedsoup.state import load_checkpoint

    state = load_checkpoint(checkpoint_dir)
    final = load_file(uninterrupted["dir"] / "outputs" / "final_model.safetensors")
    assert_same_model({k: torch.as_tensor(v) for k, v in state["global"].items()}, final)
    assert state["stew"] is not None and state["stew"]["state"]["state"], "no momentum buffer checkpointed"


def test_killed_server_resumes_at_round_2_with_the_uninterrupted_model(federation, uninterrupted):
    assert uninterrupted["status"] == lf.FINISHED_OK
    out = federation.workdir / "resumed"
    checkpoint_dir = out / "checkpoints"
    config = RUN_CONFIG | {"checkpoint-dir": str(checkpoint_dir)}
    start = time.perf_counter()

    # Run 1: killed (SIGKILL, no clean shutdown) as soon as round 1 is checkpointed.
    first = federation.submit(ROOT, config | {"output-dir": str(out / "outputs-killed")})
    deadline = time.monotonic() + 300
    while checkpoint_round(checkpoint_dir) != 1:
        assert time.monotonic() < deadline, "round 1 was never checkpointed"
        federation.check_alive()
        time.sleep(0.1)
    server_side = [federation.processes[n].pid for n in ("superlink", "superexec-serverapp")]
    server_app = [c for pid in server_side for c in lf.descendants(pid)]
    assert server_app, "no ServerApp process found under the SuperExec"
    federation.stop_server_side(signal.SIGKILL)
    assert_all_gone(server_side + server_app)
    assert checkpoint_round(checkpoint_dir) == 1, "the kill came too late: round 2 was already checkpointed"
    assert not (out / "outputs-killed" / "final_model.safetensors").exists()

    # Run 2: a new server side on the same state database, the same checkpoint directory.
    federation.start_server_side()
    second, status = federation.run(ROOT, config | {"output-dir": str(out / "outputs")}, timeout=400)
    seconds = time.perf_counter() - start
    print(f"\n[deploy e2e] kill after round 1 + resume to round 2: {seconds:.1f}s wall")
    log = federation.run_log(second)
    assert second != first
    assert status == lf.FINISHED_OK, log[-3000:]
    assert "Resuming at round 2/2" in log, log[-3000:]
    assert "[ROUND 1/2]" not in log and "[ROUND 2/2]" in log, log[-3000:]
    assert checkpoint_round(checkpoint_dir) == 2

    resumed = load_file(out / "outputs" / "final_model.safetensors")
    reference = load_file(uninterrupted["dir"] / "outputs" / "final_model.safetensors")
    assert_same_model(resumed, reference)
    resumed_rounds = {row["round"]: row for row in read_rounds(out / "outputs")}
    reference_rounds = {row["round"]: row for row in read_rounds(uninterrupted["dir"] / "outputs")}
    assert resumed_rounds[2]["test-accuracy"] == reference_rounds[2]["test-accuracy"]


# --------------------------------------------------------------------------- TLS, via the script
def flwr_cli(workdir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, **lf.FLOWER_ENV, FLWR_HOME=str(workdir / "flwr-home"))
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=workdir)


def start_supernode(workdir: Path, address: str, name: str, security: list[str]) -> subprocess.Popen:
    """A SuperNode that gives up after 15 s without a connection (instead of retrying forever)."""
    port = lf.free_ports(1)[0]
    argv = [str(Path(sys.executable).parent / "flower-supernode"), *security, "--superlink", address,
            "--isolation", "process", "--host", "127.0.0.1", "--port", str(port), "--max-wait-time", "15",
            "--node-config", "partition-id=0 num-partitions=3"]
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed by the caller via proc.log
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, **lf.FLOWER_ENV))
    proc.log = log
    return proc


def test_tls_run_passes_and_a_supernode_without_the_ca_is_refused(tmp_path):
    workdir = tmp_path / "tls"
    script_log = tmp_path / "deploy-local.log"
    with open(script_log, "wb") as out:
        script = subprocess.Popen(
            [str(SCRIPTS / "deploy-local.sh"), "--tls", "--no-run", "--workdir", str(workdir)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, PYTHON=sys.executable),
        )
    started: list[int] = []
    refused: list[subprocess.Popen] = []
    start = time.perf_counter()
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "READY").exists():
            assert script.poll() is None, script_log.read_text()
            assert time.monotonic() < deadline, "deploy-local.sh --tls did not come up"
            time.sleep(0.2)
        address = (workdir / "READY").read_text().strip()
        started = [script.pid, *lf.descendants(script.pid)]
        certs = workdir / "certificates"
        assert {p.name for p in certs.iterdir()} >= {"ca.crt", "server.pem", "server.key"}
        config_toml = (workdir / "flwr-home" / "config.toml").read_text()
        assert "root-certificates" in config_toml and "insecure" not in config_toml

        # Plain HTTP is not served at all: the SuperLink speaks TLS only.
        import urllib.request

        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{address}/health", timeout=5)

        refused = [
            start_supernode(tmp_path, address, "supernode-without-ca", []),  # system CAs only
            start_supernode(tmp_path, address, "supernode-insecure", ["--insecure"]),
        ]
        config = RUN_CONFIG | {"num-server-rounds": 1, "checkpoint-dir": str(workdir / "checkpoints"),
                               "output-dir": str(workdir / "outputs")}
        submitted = flwr_cli(workdir, "run", str(ROOT), lf.CONNECTION, "--format", "json",
                             "--run-config", lf.run_config_arg(config))
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = json.loads(submitted.stdout[submitted.stdout.index("{"):])["run-id"]
        streamed = flwr_cli(workdir, "log", str(run_id), lf.CONNECTION, "--stream", timeout=400)
        status = ""
        for _ in range(20):
            listed = flwr_cli(workdir, "ls", lf.CONNECTION, "--run-id", str(run_id), "--format", "json")
            status = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"][0]["status"]
            if status.startswith("finished"):
                break
            time.sleep(0.5)
        assert status == lf.FINISHED_OK, streamed.stdout[-3000:]
        rounds = {row["round"]: row for row in read_rounds(workdir / "outputs")}
        assert rounds[1]["test-accuracy"] > rounds[0]["test-accuracy"], rounds
        assert rounds[1]["clients-fedsoup-clients-used"] == NUM_SUPERNODES  # the refused ones never joined

        for proc in refused:
            code = proc.wait(timeout=60)
            proc.log.close()
            text = Path(proc.log.name).read_text(errors="replace")
            assert code != 0 and "Failed to initialize the connection to the SuperLink" in text, text[-2000:]
        assert "CERTIFICATE_VERIFY_FAILED" in Path(refused[0].log.name).read_text(errors="replace")
        print(f"\n[deploy e2e] TLS: start + 1-round run + refused SuperNodes: {time.perf_counter() - start:.1f}s wall")
    finally:
        for proc in refused:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        started = started or [script.pid, *lf.descendants(script.pid)]
        if script.poll() is None:
            script.send_signal(signal.SIGTERM)  # deploy-local.sh tears everything down
            try:
                script.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in started:
                    lf._signal_group(pid, signal.SIGKILL)
                script.wait()
        assert_all_gone(started)
    assert not (workdir / "READY").exists()
