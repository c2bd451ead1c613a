"""LocalFederation: the processes of docker-compose.yml (+ TLS and auth overlays) on loopback.

Topology: one ``flower-superlink`` (``--isolation process``, a state database), the
``flower-superexec`` that runs the ServerApp, N ``flower-supernode`` with
``--node-config 'partition-id=i-1 num-partitions=N'`` and one ClientApp
``flower-superexec`` each, all on free 127.0.0.1 ports, with the flags of the
compose services. Runs are submitted and followed through the ``flwr`` CLI, and
with SuperNode authentication the nodes are registered through it too
(``flwr supernode register``), as an operator would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulations.local_federation.auth import NodeAuthFiles, RegisteredNodes, supernode_name
from simulations.local_federation.processes import Process, free_ports, tail

CONNECTION = "local-deployment"
FINISHED_OK = "finished:completed"
TLS_FILES = ("ca.crt", "server.pem", "server.key")
# `flwr supernode register` answers this (with exit code 0) for a key the SuperLink
# already knows: registered before (state database kept), or unregistered since.
KEY_ALREADY_REGISTERED = "Public key already in use"

# Every process gets these: nothing is installed or looked up on the network at run time.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}


class FederationError(RuntimeError):
    """A process of the federation failed to start, or a `flwr` command failed."""


class RegistrationRefused(FederationError):
    """`flwr supernode register` refused `public_key`; `reason` is the SuperLink's answer."""

    def __init__(self, public_key: Path, reason: str) -> None:
        super().__init__(f"`flwr supernode register {public_key}` refused: {reason}")
        self.public_key = public_key
        self.reason = reason

    @property
    def already_known(self) -> bool:
        return KEY_ALREADY_REGISTERED in self.reason


class TomlText(str):
    """A run-config value that is already TOML text (as typed after `--run-config`)."""


def toml_value(value: Any) -> str:
    """One `--run-config` value as TOML (strings quoted, booleans lower-case)."""
    if isinstance(value, TomlText):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string for any path or name


def run_config_arg(run_config: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())


def json_output(result: subprocess.CompletedProcess) -> dict[str, Any]:
    """The JSON object a `flwr ... --format json` command printed (after any banner)."""
    try:
        payload = json.loads(result.stdout[result.stdout.index("{"):])
    except ValueError:
        raise FederationError(f"`flwr` printed no JSON:\n{result.stdout}\n{result.stderr}") from None
    if not isinstance(payload, dict):
        raise FederationError(f"`flwr` printed {payload!r}, not a JSON object")
    return payload


def checkpoint_round(checkpoint_dir: Path) -> int | None:
    """The last round FedSoup checkpointed in `checkpoint_dir` (its state.json), if any."""
    try:
        return int(json.loads((checkpoint_dir / "state.json").read_text())["state"]["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class LocalFederation:
    """SuperLink + ServerApp SuperExec + N (SuperNode + ClientApp SuperExec) on loopback.

    Use as a context manager: every process is stopped on exit, whatever happened.

    Parameters
    ----------
    workdir : directory for state, logs, checkpoints, outputs and the CLI's FLWR_HOME.
    num_supernodes : SuperNodes to start, ``supernode-1..N`` with partition-id 0..N-1
        and num-partitions N.
    tls_dir : a directory made by ``scripts/make-certs.sh`` (ca.crt, server.pem,
        server.key): the SuperLink then serves HTTPS and everyone verifies it with ca.crt.
    auth_dir : a directory made by ``scripts/make-node-keys.sh`` (needs ``tls_dir``):
        the SuperLink admits only registered SuperNodes (``--enable-supernode-auth``),
        ``start()`` registers ``supernode-1..N`` with ``flwr supernode register``, each
        SuperNode signs with its private key, and every SuperExec authenticates to its
        SuperLink/SuperNode with a shared secret read from a file.
    port : the SuperLink's HTTP API port (Fleet + Control + Runtime); free one if None.
    bin_dir : where the Flower commands are; default: next to this Python interpreter.
    """

    def __init__(
        self,
        workdir: str | Path,
        num_supernodes: int = 3,
        *,
        tls_dir: str | Path | None = None,
        auth_dir: str | Path | None = None,
        port: int | None = None,
        bin_dir: str | Path | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
        self.workdir = Path(workdir).resolve()
        self.num_supernodes = num_supernodes
        self.tls_dir = Path(tls_dir).resolve() if tls_dir is not None else None
        if self.tls_dir is not None:
            missing = [n for n in TLS_FILES if not (self.tls_dir / n).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"TLS directory '{self.tls_dir}' lacks {', '.join(missing)}: "
                    "make them with scripts/make-certs.sh"
                )
        self.auth: NodeAuthFiles | None = None
        if auth_dir is not None:
            if self.tls_dir is None:
                raise ValueError("SuperNode authentication needs TLS: pass tls_dir too "
                                 "(Flower refuses --enable-supernode-auth without it)")
            self.auth = NodeAuthFiles(Path(auth_dir).resolve(), num_supernodes)
            self.auth.check()
        ports = free_ports(1 + num_supernodes)
        self.port = port if port is not None else ports[0]
        self.supernode_ports = ports[1:]
        self.bin_dir = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
        self.startup_timeout = startup_timeout
        self.flwr_home = self.workdir / "flwr-home"
        self.state_db = self.workdir / "state" / "state.db"
        self.registered = RegisteredNodes(self.workdir / "state" / "registered-supernodes.json")
        self.checkpoint_dir = self.workdir / "checkpoints"
        self.output_dir = self.workdir / "outputs"
        self.log_dir = self.workdir / "logs"
        self.processes: dict[str, Process] = {}

    # ----------------------------------------------------------------- plumbing
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path | None:
        return self.tls_dir / "ca.crt" if self.tls_dir is not None else None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLOWER_ENV)
        env["FLWR_HOME"] = str(self.flwr_home)
        # The venv's commands first: flower-superexec starts flwr-serverapp/flwr-clientapp by name.
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def command(self, name: str) -> str:
        path = self.bin_dir / name
        if path.exists():
            return str(path)
        found = shutil.which(name)
        if found is None:
            raise FederationError(f"'{name}' not found in {self.bin_dir} nor on PATH (is flwr installed?)")
        return found

    def spawn(self, name: str, argv: list[str]) -> Process:
        """Start `argv` in its own session, output to logs/<name>.log."""
        proc = Process.start(name, argv, self.log_dir / f"{name}.log", self.env(), self.workdir)
        self.processes[name] = proc
        return proc

    def write_cli_config(self) -> Path:
        """$FLWR_HOME/config.toml with the `local-deployment` connection for the `flwr` CLI."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        lines.append(f"root-certificates = {json.dumps(str(self.ca_cert))}" if self.tls_dir else "insecure = true")
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    # ------------------------------------------------------------ commands
    def _client_security(self) -> list[str]:
        """How a client of the SuperLink (SuperNode, SuperExec) trusts it."""
        return ["--root-certificates", str(self.ca_cert)] if self.tls_dir else ["--insecure"]

    def superlink_argv(self) -> list[str]:
        if self.tls_dir is not None:
            security = ["--ssl-ca-certfile", str(self.tls_dir / "ca.crt"),
                        "--ssl-certfile", str(self.tls_dir / "server.pem"),
                        "--ssl-keyfile", str(self.tls_dir / "server.key")]
        else:
            security = ["--insecure"]
        if self.auth is not None:
            security += ["--enable-supernode-auth",
                         "--superexec-auth-secret-file", str(self.auth.superlink_secret)]
        return [self.command("flower-superlink"), *security, "--isolation", "process",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.state_db), "--disable-runtime-dependency-installation"]

    def serverapp_superexec_argv(self) -> list[str]:
        secret = ["--superexec-auth-secret-file", str(self.auth.superlink_secret)] if self.auth else []
        return [self.command("flower-superexec"), *self._client_security(),
                "--runtime-api-address", self.address, *secret]

    def supernode_argv(self, index: int) -> list[str]:
        """SuperNode `index` (1-based), partition-id index-1."""
        auth = []
        if self.auth is not None:
            auth = ["--auth-supernode-private-key", str(self.auth.private_key(index)),
                    "--superexec-auth-secret-file", str(self.auth.supernode_secret(index))]
        return [self.command("flower-supernode"), *self._client_security(),
                "--superlink", self.address, "--isolation", "process",
                "--host", "127.0.0.1", "--port", str(self.supernode_ports[index - 1]),
                "--node-config", f"partition-id={index - 1} num-partitions={self.num_supernodes}", *auth]

    def clientapp_superexec_argv(self, index: int) -> list[str]:
        # SuperNode <-> SuperExec stays on one host: plain HTTP on loopback, as in compose.
        secret = ["--superexec-auth-secret-file", str(self.auth.supernode_secret(index))] if self.auth else []
        return [self.command("flower-superexec"), "--insecure",
                "--runtime-api-address", f"127.0.0.1:{self.supernode_ports[index - 1]}", *secret]

    # ------------------------------------------------------------ lifecycle
    def start(self) -> LocalFederation:
        for d in (self.state_db.parent, self.checkpoint_dir, self.output_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Run artefacts, never source: keep them out of git wherever the workdir is.
        ignore = self.workdir / ".gitignore"
        if not ignore.exists():
            ignore.write_text("*\n", encoding="utf-8")
        self.write_cli_config()
        self.start_server_side()
        node_ids = self.register_supernodes() if self.auth is not None else {}
        for i in range(1, self.num_supernodes + 1):
            self.start_supernode(i)
        if node_ids:
            self.wait_online(list(node_ids.values()))
        time.sleep(0.5)
        self.check_alive()
        return self

    def start_supernode(self, index: int) -> None:
        """SuperNode `index` (1-based) and its ClientApp SuperExec."""
        self.spawn(supernode_name(index), self.supernode_argv(index))
        self.spawn(f"superexec-clientapp-{index}", self.clientapp_superexec_argv(index))

    def stop_supernode(self, index: int) -> None:
        for name in (f"superexec-clientapp-{index}", supernode_name(index)):
            proc = self.processes.pop(name, None)
            if proc is not None:
                proc.stop()

    def start_server_side(self) -> None:
        """SuperLink (on the persistent state database) and the ServerApp's SuperExec."""
        self.spawn("superlink", self.superlink_argv())
        self.wait_healthy()
        self.spawn("superexec-serverapp", self.serverapp_superexec_argv())

    def stop_server_side(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server side (SuperLink, its SuperExec, the running ServerApp), as a crash would."""
        for name in ("superexec-serverapp", "superlink"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                proc.stop(sig=sig, grace=5.0)

    def stop(self) -> None:
        """Stop every process started here: SuperNodes first, then the server side."""
        order = sorted(self.processes, key=lambda n: n in ("superlink", "superexec-serverapp"))
        for name in order:
            self.processes.pop(name).stop()

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check_alive(self) -> None:
        for proc in self.processes.values():
            if not proc.alive():
                raise FederationError(
                    f"{proc.name} exited with code {proc.popen.returncode}; its log "
                    f"({proc.log_path}) ends with:\n{tail(proc.log())}"
                )

    def _ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca_cert)) if self.tls_dir else None

    def healthy(self) -> bool:
        scheme = "https" if self.tls_dir else "http"
        try:
            with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=1.0,
                                        context=self._ssl_context()) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            superlink = self.processes.get("superlink")
            if superlink is not None and not superlink.alive():
                break
            time.sleep(0.2)
        self.check_alive()
        raise FederationError(f"the SuperLink did not answer on {self.address} within {self.startup_timeout:.0f}s")

    # ------------------------------------------------------------ the flwr CLI
    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        """The `flwr` CLI against this federation (FLWR_HOME holds its connection)."""
        result = subprocess.run(  # noqa: S603
            [self.command("flwr"), *args], capture_output=True, text=True, env=self.env(),
            timeout=timeout, cwd=self.workdir,
        )
        if check and result.returncode != 0:
            raise FederationError(
                f"`flwr {' '.join(args)}` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    # ------------------------------------------------------------ SuperNode registration
    def register_key(self, public_key: Path, name: str) -> int:
        """`flwr supernode register <public_key>`; returns the new node id.

        Raises RegistrationRefused if the SuperLink says no, e.g. for a key it already
        knows (registered before, or unregistered since: such a key never comes back)."""
        payload = json_output(self.flwr("supernode", "register", str(public_key), CONNECTION,
                                        "--name", name, "--format", "json"))
        if not payload.get("success"):
            raise RegistrationRefused(Path(public_key), str(payload.get("error-message")))
        node_id = int(payload["node-id"])
        self.registered.save(name, node_id)
        return node_id

    def register_supernodes(self) -> dict[str, int]:
        """Register every SuperNode's public key; name -> node id.

        A key the SuperLink already knows (its database was kept) keeps the node id
        recorded in ``state/registered-supernodes.json``."""
        if self.auth is None:
            raise FederationError("this federation runs without SuperNode authentication (no auth_dir)")
        known = self.registered.load()
        ids = {}
        for i in range(1, self.num_supernodes + 1):
            name = supernode_name(i)
            try:
                ids[name] = self.register_key(self.auth.public_key(i), name)
            except RegistrationRefused as err:
                if not (err.already_known and name in known):
                    raise
                ids[name] = known[name]
        return ids

    def unregister_supernode(self, index: int) -> int:
        """`flwr supernode unregister <node id>` for SuperNode `index`: it is shut out for good
        (its key cannot be registered again); returns the node id."""
        node_id = self.registered.load()[supernode_name(index)]
        payload = json_output(self.flwr("supernode", "unregister", str(node_id), CONNECTION, "--format", "json"))
        if not payload.get("success"):
            raise FederationError(f"`flwr supernode unregister {node_id}` failed: {payload.get('error-message')}")
        return node_id

    def supernodes(self) -> dict[int, str]:
        """Node id -> status ('registered', 'online', 'offline', 'unregistered') per `flwr supernode list`."""
        payload = json_output(self.flwr("supernode", "list", CONNECTION, "--format", "json"))
        return {int(node["node-id"]): str(node["status"]) for node in payload.get("nodes", [])}

    def wait_online(self, node_ids: list[int], timeout: float | None = None) -> None:
        """Until every node in `node_ids` is online (as `flwr supernode list` says)."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            self.check_alive()
            status = self.supernodes()
            if all(status.get(node_id) == "online" for node_id in node_ids):
                return
            if time.monotonic() > deadline:
                raise FederationError(f"SuperNodes not online after {timeout or self.startup_timeout:.0f}s: {status}")
            time.sleep(1.0)

    # ------------------------------------------------------------ runs
    def submit(self, app_dir: str | Path, run_config: Mapping[str, Any] | None = None) -> int:
        """`flwr run <app_dir> local-deployment --run-config ...`; returns the run id."""
        args = ["run", str(Path(app_dir).resolve()), CONNECTION, "--format", "json"]
        if run_config:
            args += ["--run-config", run_config_arg(run_config)]
        result = self.flwr(*args)
        try:
            return int(json_output(result)["run-id"])
        except (FederationError, KeyError, TypeError, ValueError):
            raise FederationError(f"`flwr run` gave no run id:\n{result.stdout}\n{result.stderr}") from None

    def follow(self, run_id: int, name: str | None = None) -> Process:
        """`flwr log <run_id> --stream` in the background: it returns when the run ends."""
        return self.spawn(name or f"run-{run_id}", [self.command("flwr"), "log", str(run_id), CONNECTION, "--stream"])

    def status(self, run_id: int) -> str:
        """The run's status as `flwr ls` shows it, e.g. 'running' or 'finished:completed'."""
        payload = json_output(self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"))
        return str(payload["runs"][0]["status"])

    def final_status(self, run_id: int) -> str:
        """The status once it is final: the log stream ends a moment before it is."""
        for _ in range(20):
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(0.5)
        return status

    def wait(self, run_id: int, timeout: float = 300.0) -> str:
        """Block until the run ends (following its log), then return its final status."""
        follower = self.follow(run_id)
        deadline = time.monotonic() + timeout
        try:
            while follower.alive():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run {run_id} still running after {timeout:.0f}s; see {self.log_dir}")
                self.check_alive()
                time.sleep(0.5)
        finally:
            self.processes.pop(follower.name, None)
            follower.stop()
        return self.final_status(run_id)

    def run(self, app_dir: str | Path, run_config: Mapping[str, Any] | None = None,
            timeout: float = 300.0) -> tuple[int, str]:
        run_id = self.submit(app_dir, run_config)
        return run_id, self.wait(run_id, timeout)

    def run_log(self, run_id: int) -> str:
        return self.log_dir.joinpath(f"run-{run_id}.log").read_text(errors="replace")
