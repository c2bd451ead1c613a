"""simulations.local_federation (scripts/deploy-local.sh) without Flower running: process teardown and argument errors (fast)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from simulations import local_federation as lf

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def test_stop_reaches_descendants_in_their_own_sessions(tmp_path):
    """A child in a session of its own (as Flower starts its SuperExec with
    `--isolation subprocess`) escapes a process-group kill: Process.stop finds it anyway."""
    fed = lf.LocalFederation(tmp_path, 1)
    parent = textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    proc = fed.spawn("parent", [sys.executable, "-c", parent])
    deadline = time.monotonic() + 30
    while not lf.descendants(proc.pid):
        assert time.monotonic() < deadline, proc.log()
        time.sleep(0.05)
    child = lf.descendants(proc.pid)[0]
    assert lf.pid_alive(child)
    proc.stop(grace=2.0)
    assert not proc.alive()
    deadline = time.monotonic() + 10
    while lf.pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lf.pid_alive(child), "the grandchild in its own session survived"


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    fed = lf.LocalFederation(tmp_path, 1)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"
    proc = fed.spawn("stubborn", [sys.executable, "-c", stubborn])
    deadline = time.monotonic() + 30
    while "ready" not in proc.log():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    start = time.monotonic()
    proc.stop(grace=1.0)
    assert not proc.alive() and time.monotonic() - start < 10


def test_federation_reports_which_process_died_with_its_log(tmp_path):
    fed = lf.LocalFederation(tmp_path, 1)
    fed.spawn("superlink", [sys.executable, "-c", "import sys; print('port already in use'); sys.exit(3)"])
    fed.processes["superlink"].popen.wait()
    with pytest.raises(lf.FederationError, match=r"superlink exited with code 3(.|\n)*port already in use"):
        fed.check_alive()
    fed.stop()


def test_tls_dir_without_certificates_is_refused_naming_the_files(tmp_path):
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"server\.pem, server\.key.*make-certs\.sh"):
        lf.LocalFederation(tmp_path / "w", 3, tls_dir=tmp_path)
    with pytest.raises(ValueError, match="num_supernodes"):
        lf.LocalFederation(tmp_path / "w", 0)


def test_auth_needs_tls_and_every_key_file_named(tmp_path):
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    certs.mkdir()
    keys.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("x")
    with pytest.raises(ValueError, match="needs TLS"):
        lf.LocalFederation(tmp_path / "w", 2, auth_dir=keys)
    (keys / "supernode-1.key").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"lacks superlink\.secret, supernode-1\.pub, supernode-1\.secret, "
                                                r"supernode-2\.key.*make-node-keys\.sh .*keys 2"):
        lf.LocalFederation(tmp_path / "w", 2, tls_dir=certs, auth_dir=keys)


def test_auth_registered_node_ids_survive_in_a_file_beside_the_state(tmp_path):
    registered = lf.RegisteredNodes(tmp_path / "state" / "registered-supernodes.json")
    assert registered.load() == {}
    registered.save("supernode-1", 2**63 + 5)  # node ids are unsigned 64-bit
    registered.save("supernode-2", 7)
    assert lf.RegisteredNodes(registered.path).load() == {"supernode-1": 2**63 + 5, "supernode-2": 7}
    registered.path.write_text("{broken")
    assert registered.load() == {}


def test_cli_config_names_the_connection_and_its_security(tmp_path):
    plain = lf.LocalFederation(tmp_path / "plain", 2, port=12345).write_cli_config().read_text()
    assert '[superlink.local-deployment]\naddress = "127.0.0.1:12345"\ninsecure = true' in plain
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("x")
    tls = lf.LocalFederation(tmp_path / "tls", 2, tls_dir=certs).write_cli_config().read_text()
    assert f'root-certificates = "{certs / "ca.crt"}"' in tls and "insecure" not in tls


def test_deploy_local_sh_help_runs_without_starting_anything():
    result = subprocess.run([str(SCRIPTS / "deploy-local.sh"), "--help"], capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    for option in ("--supernodes", "--tls", "--auth", "--keys", "--no-run", "--keep", "--workdir", "--run-config"):
        assert option in result.stdout


def _python_blocks(markdown: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in markdown.splitlines():
        if line.startswith("```"):
            if inside:
                blocks.append("\n".join(current))
            inside, current = (not inside and line.strip() == "```python"), []
        elif inside:
            current.append(line)
    return blocks


def test_the_documented_serverapp_matches_the_fedsoup_api():
    """docs/deployment.md's "FedSoup in your own ServerApp" example: valid Python whose
    FedSoup(...) call uses only keywords FedSoup accepts, with settings FedSoup validates."""
    import ast
    import inspect

    from strategies import FedSoup

    blocks = [b for b in _python_blocks((ROOT / "docs" / "deployment.md").read_text()) if "FedSoup(" in b]
    assert blocks, "no FedSoup example in docs/deployment.md"
    calls = [node for node in ast.walk(ast.parse(blocks[0]))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "FedSoup"]
    assert len(calls) == 1
    accepted = set(inspect.signature(FedSoup).parameters)
    used = {kw.arg for kw in calls[0].keywords}
    assert used <= accepted, f"the docs use {used - accepted}, which FedSoup does not take"
    literal = {kw.arg: ast.literal_eval(kw.value) for kw in calls[0].keywords
               if isinstance(kw.value, (ast.Constant, ast.Dict))}
    FedSoup(**literal)  # the documented soup/stew settings pass FedSoup's own checks


def test_checkpoint_round_reads_fedsoups_state_json(tmp_path):
    assert lf.checkpoint_round(tmp_path) is None
    (tmp_path / "state.json").write_text('{"format": "fedsoup-state", "state": {"round": 7}}')
    assert lf.checkpoint_round(tmp_path) == 7
    (tmp_path / "state.json").write_text("{not json")
    assert lf.checkpoint_round(tmp_path) is None


def _auth_federation(tmp_path, num_supernodes: int):
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    certs.mkdir()
    keys.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("x")
    for path in lf.NodeAuthFiles(keys, num_supernodes).required():
        path.write_text("x")
    return lf.LocalFederation(tmp_path / "w", num_supernodes, tls_dir=certs, auth_dir=keys)


def _flwr_answering(answers: dict[str, str]):
    """A stand-in for LocalFederation.flwr: `flwr supernode register <key> ...` prints answers[key name]."""
    def flwr(*args, **kwargs):
        key = Path(args[2]).name
        return subprocess.CompletedProcess(["flwr", *args], 0, stdout="Using SuperLink\n" + answers[key], stderr="")
    return flwr


def test_auth_registration_keeps_the_ids_of_keys_the_superlink_already_knows(tmp_path):
    fed = _auth_federation(tmp_path, 2)
    fed.registered.save("supernode-1", 11)  # registered before a restart on the same database
    known = '{"success": false, "error-message": "[code: 23] Public key already in use."}'
    fed.flwr = _flwr_answering({"supernode-1.pub": known, "supernode-2.pub": '{"success": true, "node-id": 22}'})
    assert fed.register_supernodes() == {"supernode-1": 11, "supernode-2": 22}
    assert fed.registered.load() == {"supernode-1": 11, "supernode-2": 22}


def test_auth_registration_refused_names_the_key_and_the_reason(tmp_path):
    fed = _auth_federation(tmp_path, 1)
    # A key the SuperLink knows but this workdir never registered (e.g. unregistered elsewhere).
    fed.flwr = _flwr_answering({"supernode-1.pub": '{"success": false, "error-message": "Public key already in use."}'})
    with pytest.raises(lf.RegistrationRefused) as refused:
        fed.register_supernodes()
    assert refused.value.public_key == fed.auth.public_key(1) and refused.value.already_known
    with pytest.raises(lf.FederationError, match="without SuperNode authentication"):
        lf.LocalFederation(tmp_path / "plain", 1).register_supernodes()
