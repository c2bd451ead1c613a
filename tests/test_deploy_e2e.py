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

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simulations import local_federation as lf

from deploy_helpers import NUM_SUPERNODES, RUN_CONFIG, assert_all_gone, stop_federation, stop_script, wait_for

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]



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



# --------------------------------------------------------------------------- plain HTTP federation
@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = lf.LocalFederation(tmp_path_factory.mktemp("deploy"), NUM_SUPERNODES)
    try:
        fed.start()
        yield fed
    finally:
        stop_federation(fed)


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
    assert lf.checkpoint_round(checkpoint_dir) == 2  # deploy-local.sh's resume notice reads the same
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
def start_supernode(workdir: Path, address: str, name: str, security: list[str]) -> subprocess.Popen:
    """A SuperNode that gives up after 15 s without a connection (instead of retrying forever)."""
    port = lf.free_ports(1)[0]
    argv = [str(Path(sys.executable).parent / "flower-supernode"), *security, "--superlink", address,
            "--isolation", "process", "--host", "127.0.0.1", "--port", str(port), "--max-wait-time", "15",
            "--node-config", "partition-id=0 num-partitions=3"]
    with open(workdir / f"{name}.log", "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, **lf.FLOWER_ENV))



def test_tls_run_passes_and_a_supernode_without_the_ca_is_refused(tmp_path):
    """`scripts/deploy-local.sh --tls --keep`: certificates from make-certs.sh, a 1-round
    FedSoup run over HTTPS, then the federation stays up until SIGTERM tears it down."""
    workdir = tmp_path / "tls"
    script_log = tmp_path / "deploy-local.log"
    extra = " ".join(f"{k}={lf.toml_value(v)}" for k, v in RUN_CONFIG.items()
                     if k not in ("strategy", "num-server-rounds", "num-partitions"))
    start = time.perf_counter()
    with open(script_log, "wb") as out:
        script = subprocess.Popen(
            [str(SCRIPTS / "deploy-local.sh"), "--tls", "--keep", "--rounds", "1", "--workdir", str(workdir),
             "--run-config", extra],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, PYTHON=sys.executable),
        )
    started: list[int] = []
    refused: list[tuple[subprocess.Popen, Path]] = []
    try:
        wait_for(lambda: (workdir / "READY").exists(), 120, "a running federation", script, script_log)
        address = (workdir / "READY").read_text().strip()
        started = [script.pid, *lf.descendants(script.pid)]
        assert {p.name for p in (workdir / "certificates").iterdir()} >= {"ca.crt", "server.pem", "server.key"}
        config_toml = (workdir / "flwr-home" / "config.toml").read_text()
        assert "root-certificates" in config_toml and "insecure" not in config_toml

        # While the run goes on: the SuperLink speaks TLS only, and SuperNodes that
        # cannot verify it (no CA certificate) or do not speak TLS are refused.
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{address}/health", timeout=5)
        for name, security in (("supernode-without-ca", []), ("supernode-insecure", ["--insecure"])):
            refused.append((start_supernode(tmp_path, address, name, security), tmp_path / f"{name}.log"))

        wait_for(lambda: re.search(r"deploy-local: run \d+ finished", script_log.read_text()),
                 400, "finished run", script, script_log)
        text = script_log.read_text()
        assert "finished:completed" in text, text[-3000:]
        assert "[ROUND 1/1]" in text and "FedSoup merged 3 replies" in text, text[-3000:]
        rounds = {row["round"]: row for row in read_rounds(workdir / "outputs")}
        assert rounds[1]["test-accuracy"] > rounds[0]["test-accuracy"], rounds
        assert rounds[1]["clients-fedsoup-clients-used"] == NUM_SUPERNODES  # the refused ones never joined
        assert checkpoint_round(workdir / "checkpoints") == 1

        for proc, log in refused:
            code = proc.wait(timeout=60)
            log_text = log.read_text(errors="replace")
            assert code != 0 and "Failed to initialize the connection to the SuperLink" in log_text, log_text[-2000:]
        assert "CERTIFICATE_VERIFY_FAILED" in refused[0][1].read_text(errors="replace")
        print(f"\n[deploy e2e] TLS via deploy-local.sh: start + 1-round run + refused SuperNodes: "
              f"{time.perf_counter() - start:.1f}s wall")
    finally:
        for proc, _ in refused:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stop_script(script, started)  # deploy-local.sh tears everything down
    assert script.returncode == 0, script_log.read_text()[-3000:]  # 0: the run completed
    assert "deploy-local: stopping" in script_log.read_text()
    assert not (workdir / "READY").exists()
