"""Only registered SuperNodes get in: FedSoup on a TLS + SuperNode-authenticated deployment.

Real processes on loopback (free ports), keys from ``scripts/make-node-keys.sh``,
registration through Flower's own CLI (``flwr supernode register/unregister/list``):

* ``deploy-local.sh --tls --auth``: the registered SuperNodes run a FedSoup round;
  a SuperNode with the CA certificate but an unknown key is refused and never sampled;
  a registered node sending Cauchy noise is damped by the AME ClientSoup (Adam moves
  every coordinate by at most about its learning rate per step);
* a killed server side restarted on its state database admits the registered nodes
  again (no new registration), refuses an unknown one and a SuperExec with the wrong
  secret, and FedSoup resumes at round 2; a registered node sending NaN is left out;
* a node removed with ``flwr supernode unregister`` is shut out and cannot reconnect
  (nor be registered again with the same key).

Every process started here is stopped, whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simulations import local_federation as lf

from deploy_helpers import stop_federation, stop_script, wait_for
from simulations.attacks import malicious_partitions

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
NUM_SUPERNODES = 3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("ssh-keygen") is None or shutil.which("openssl") is None,
                       reason="needs ssh-keygen (node keys) and openssl (certificates)"),
]

# Small and quick: digits, iid shards, one local epoch; one of the three nodes attacks.
RUN_CONFIG = {"dataset": "digits", "partitioning": "iid", "local-epochs": 1, "seed": 0,
              "attack-fraction": 0.34}
ATTACKER = min(malicious_partitions(NUM_SUPERNODES, RUN_CONFIG["attack-fraction"], RUN_CONFIG["seed"])) + 1
# Adam-AME with a constant lr from the global model: each of the EPOCHS * 3 steps moves a
# coordinate by at most about SOUP_LR (beta1 = 0.8, beta2 = 0.9: 1 - beta1 < sqrt(1 - beta2)).
SOUP = {"soup-optimizer": "adam", "soup-lr": 0.01, "soup-schedule": "constant", "soup-epochs": 2,
        "soup-batch-size": 1, "soup-beta1": 0.8, "soup-beta2": 0.9, "soup-eps": 1e-5,
        "soup-pivot": "global"}
SOUP_STEPS = SOUP["soup-epochs"] * NUM_SUPERNODES


def read_rounds(output_dir: Path) -> dict[int, dict]:
    return {row["round"]: row for row in json.loads((output_dir / "rounds.json").read_text())["rounds"]}


def make_keys(directory: Path, count: int) -> Path:
    made = subprocess.run([str(SCRIPTS / "make-node-keys.sh"), str(directory), str(count)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return directory


def start_outsider(workdir: Path, name: str, address: str, ca_cert: Path, private_key: Path) -> subprocess.Popen:
    """A SuperNode that trusts the CA and signs with `private_key`; gives up after 15 s."""
    argv = [str(Path(sys.executable).parent / "flower-supernode"), "--root-certificates", str(ca_cert),
            "--superlink", address, "--auth-supernode-private-key", str(private_key),
            "--isolation", "process", "--host", "127.0.0.1", "--port", str(lf.free_ports(1)[0]),
            "--max-wait-time", "15", "--node-config", "partition-id=0 num-partitions=3"]
    with open(workdir / f"{name}.log", "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, **lf.FLOWER_ENV))


def assert_refused(proc: subprocess.Popen, log: Path) -> str:
    """The SuperNode exits without ever getting a node id: the SuperLink does not know its key."""
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert code != 0, text[-2000:]
    assert "Failed to initialize the connection to the SuperLink" in text, text[-2000:]
    assert "Failed to activate SuperNode" in text, text[-2000:]
    assert "SuperNode ID:" not in text, text[-2000:]
    return text




def flwr_json(workdir: Path, *args: str) -> dict:
    """`flwr ... --format json` against the deploy-local.sh federation in `workdir`."""
    result = subprocess.run([str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **lf.FLOWER_ENV, FLWR_HOME=str(workdir / "flwr-home")))
    return json.loads(result.stdout[result.stdout.index("{"):])


# --------------------------------------------------------------------------- via deploy-local.sh
def test_auth_script_registered_nodes_run_fedsoup_outsider_refused_cauchy_damped(tmp_path):
    """`scripts/deploy-local.sh --tls --auth --keep`: keys made and registered, 1 FedSoup round
    (Adam-AME soup) with a Cauchy-noise node; an outsider with the CA but an unknown key is refused."""
    workdir = tmp_path / "auth"
    script_log = tmp_path / "deploy-local.log"
    extra = lf.run_config_arg(RUN_CONFIG | SOUP | {"attack": "cauchy-noise", "attack-scale": 10.0})
    start = time.perf_counter()
    with open(script_log, "wb") as out:
        script = subprocess.Popen(
            [str(SCRIPTS / "deploy-local.sh"), "--tls", "--auth", "--keep", "--rounds", "1",
             "--workdir", str(workdir), "--run-config", extra],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, PYTHON=sys.executable),
        )
    started: list[int] = []
    try:
        wait_for(lambda: (workdir / "READY").exists(), 180, "a running federation", script, script_log)
        address = (workdir / "READY").read_text().strip()
        started = [script.pid, *lf.descendants(script.pid)]
        registered = lf.RegisteredNodes(workdir / "state" / "registered-supernodes.json").load()
        assert sorted(registered) == [f"supernode-{i}" for i in range(1, NUM_SUPERNODES + 1)]
        superlink_argv = (workdir / "logs" / "superlink.log").read_text().splitlines()[0]
        assert "--enable-supernode-auth" in superlink_argv and "--superexec-auth-secret-file" in superlink_argv
        secret = (workdir / "keys" / "superlink.secret").read_text()
        assert secret not in superlink_argv  # the secret travels as a file, never on a command line

        # Before the run samples its nodes: a SuperNode with a valid CA but an unknown key.
        outsider_key = make_keys(tmp_path / "outsider-keys", 1) / "supernode-1.key"
        outsider = start_outsider(tmp_path, "outsider", address, workdir / "certificates" / "ca.crt", outsider_key)
        outsider_text = assert_refused(outsider, tmp_path / "outsider.log")

        wait_for(lambda: re.search(r"deploy-local: run \d+ finished", script_log.read_text()),
                 400, "finished run", script, script_log)
        text = script_log.read_text()
        assert "finished:completed" in text, text[-3000:]
        assert f"Sampled {NUM_SUPERNODES} nodes (out of {NUM_SUPERNODES})" in text, text[-3000:]
        assert f"FedSoup merged {NUM_SUPERNODES} replies" in text, text[-3000:]
        nodes = {int(n["node-id"]): n["status"] for n in flwr_json(workdir, "supernode", "list")["nodes"]}
        assert nodes == {node_id: "online" for node_id in registered.values()}, nodes  # no outsider

        # Damped: the Cauchy node's reply holds outliers ~1e2..1e4 times its update; the
        # Adam-AME soup moved no coordinate by more than its steps allow.
        from simulations.models import make_model

        initial = make_model("digits", seed=RUN_CONFIG["seed"]).state_dict()
        final = load_file(workdir / "outputs" / "final_model.safetensors")
        moved = max((final[k] - initial[k]).abs().max().item() for k in final if final[k].is_floating_point())
        assert all(torch.isfinite(t).all() for t in final.values())
        assert moved <= 2 * SOUP_STEPS * SOUP["soup-lr"], moved
        rounds = read_rounds(workdir / "outputs")
        assert rounds[1]["test-accuracy"] > rounds[0]["test-accuracy"] + 0.2, rounds  # learned all the same
        print(f"\n[deploy auth] Cauchy node {ATTACKER} in the soup: max |x1 - x0| = {moved:.4f} "
              f"(bound {SOUP_STEPS} x lr = {SOUP_STEPS * SOUP['soup-lr']:.2f}); test accuracy "
              f"{rounds[0]['test-accuracy']:.3f} -> {rounds[1]['test-accuracy']:.3f}")
        print(f"[deploy auth] outsider's last words: {outsider_text.strip().splitlines()[-8]!r}")
        print(f"[deploy auth] deploy-local.sh --tls --auth: keys + registration + 1-round run + outsider: "
              f"{time.perf_counter() - start:.1f}s wall")
    finally:
        stop_script(script, started)  # deploy-local.sh tears everything down
    assert script.returncode == 0, script_log.read_text()[-3000:]


# --------------------------------------------------------------------------- via the Python API
@pytest.fixture
def federation(tmp_path):
    certs = tmp_path / "certificates"
    made = subprocess.run([str(SCRIPTS / "make-certs.sh"), str(certs)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    keys = make_keys(tmp_path / "keys", NUM_SUPERNODES)
    fed = lf.LocalFederation(tmp_path / "fed", NUM_SUPERNODES, tls_dir=certs, auth_dir=keys)
    try:
        fed.start()
        yield fed
    finally:
        stop_federation(fed)


def test_auth_restarted_superlink_admits_registered_refuses_others_and_fedsoup_resumes(federation, tmp_path):
    fed = federation
    node_ids = fed.registered.load()
    checkpoint_dir = fed.workdir / "resumable"
    config = RUN_CONFIG | {"strategy": "fedsoup", "num-server-rounds": 2, "num-partitions": NUM_SUPERNODES,
                           "attack": "nan", "checkpoint-dir": str(checkpoint_dir)}
    start = time.perf_counter()

    # Run 1: the server side is SIGKILLed as soon as round 1 is checkpointed.
    fed.submit(ROOT, config | {"output-dir": str(fed.workdir / "outputs-killed")})
    deadline = time.monotonic() + 300
    while lf.checkpoint_round(checkpoint_dir) != 1:
        assert time.monotonic() < deadline, "round 1 was never checkpointed"
        fed.check_alive()
        time.sleep(0.1)
    fed.stop_server_side(signal.SIGKILL)
    assert lf.checkpoint_round(checkpoint_dir) == 1

    # The same state database: the keys are known (registering again changes nothing),
    # the registered nodes come back online, an unknown key and a wrong secret do not get in.
    fed.start_server_side()
    assert fed.register_supernodes() == node_ids
    fed.wait_online(list(node_ids.values()))
    outsider = start_outsider(tmp_path, "outsider", fed.address, fed.ca_cert,
                              make_keys(tmp_path / "outsider-keys", 1) / "supernode-1.key")
    assert_refused(outsider, tmp_path / "outsider.log")
    wrong_secret = tmp_path / "wrong.secret"
    wrong_secret.write_text("0" * 64)
    rogue = fed.spawn("rogue-superexec", [fed.command("flower-superexec"), "--root-certificates", str(fed.ca_cert),
                                          "--runtime-api-address", fed.address,
                                          "--superexec-auth-secret-file", str(wrong_secret)])
    deadline = time.monotonic() + 60
    while "SuperExec authentication failed" not in fed.processes["superlink"].log():
        assert time.monotonic() < deadline, "the SuperLink never refused the SuperExec with the wrong secret"
        time.sleep(0.5)
    fed.processes.pop(rogue.name).stop()

    # Run 2: FedSoup resumes at round 2; the NaN node is left out of every round.
    run_id, status = fed.run(ROOT, config | {"output-dir": str(fed.workdir / "outputs")}, timeout=400)
    log = fed.run_log(run_id)
    assert status == lf.FINISHED_OK, log[-3000:]
    assert "Resuming at round 2/2" in log and "[ROUND 1/2]" not in log, log[-3000:]
    attacker_id = node_ids[lf.supernode_name(ATTACKER)]
    assert f"left out reply from node {attacker_id}" in log, log[-3000:]
    assert f"FedSoup merged {NUM_SUPERNODES - 1} replies (1 left out)" in log, log[-3000:]
    rounds = read_rounds(fed.workdir / "outputs")
    assert rounds[2]["clients-fedsoup-clients-used"] == NUM_SUPERNODES - 1
    assert rounds[2]["test-accuracy"] > 0.4, rounds  # 10 classes: chance is 0.1, the initial model 0.09
    print(f"\n[deploy auth] kill after round 1 + restart on the state DB + resume (NaN node left out): "
          f"{time.perf_counter() - start:.1f}s wall; test accuracy after round 2: {rounds[2]['test-accuracy']:.3f}")

    # Removing a node: `flwr supernode unregister` shuts its running SuperNode down...
    removed = 1
    removed_id = fed.unregister_supernode(removed)
    node = fed.processes[lf.supernode_name(removed)]
    deadline = time.monotonic() + 60
    while node.alive():
        assert time.monotonic() < deadline, "the unregistered SuperNode kept running"
        time.sleep(0.2)
    assert fed.supernodes()[removed_id] == "unregistered"
    fed.stop_supernode(removed)
    # ... it cannot reconnect, and its key cannot be registered again.
    again = fed.spawn("supernode-1-again", fed.supernode_argv(removed) + ["--max-wait-time", "15"])
    again.popen.wait(timeout=60)
    fed.processes.pop(again.name)
    assert again.popen.returncode != 0 and "Failed to activate SuperNode" in again.log(), again.log()[-2000:]
    with pytest.raises(lf.RegistrationRefused, match="already in use") as refused:
        fed.register_key(fed.auth.public_key(removed), "supernode-1-again")
    assert refused.value.already_known and refused.value.public_key == fed.auth.public_key(removed)
    assert {i: s for i, s in fed.supernodes().items() if s == "online"} == {
        node_ids[lf.supernode_name(i)]: "online" for i in range(2, NUM_SUPERNODES + 1)}
