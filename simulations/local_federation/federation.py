"""LocalFederation: the processes of docker-compose.yml (+ TLS and auth overlays) on loopback.

Topology: one ``flower-superlink`` (``--isolation process``, a state database), the
``flower-superexec`` that runs the ServerApp, N ``flower-supernode`` with
``--node-config 'partition-id=i-1 num-partitions=N'`` and one ClientApp
``flower-superexec`` each, all on free 127.0.0.1 ports, with the flags of the
compose services. Runs are submitted and followed through the ``flwr`` CLI, and
with SuperNode authentication the nodes are registered through it too
(``flwr supernode register``), as an operator would.

This module is the processes' lifecycle (start, stop, health, waiting for runs); the
services' argv are :mod:`~simulations.local_federation.commands`, the ``flwr`` CLI calls
:mod:`~simulations.local_federation.flwr_client`.
"""

from __future__ import annotations

import json
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulations.local_federation.auth import NodeAuthFiles, RegisteredNodes, supernode_name
from simulations.local_federation.commands import TLS_FILES, FederationError, ServiceCommands
from simulations.local_federation.flwr_client import CONNECTION, FlwrClient
from simulations.local_federation.processes import Process, free_ports, tail


def checkpoint_round(checkpoint_dir: Path) -> int | None:
    """The last round FedSoup checkpointed in `checkpoint_dir` (its state.json), if any."""
    try:
        return int(json.loads((checkpoint_dir / "state.json").read_text())["state"]["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class LocalFederation(ServiceCommands, FlwrClient):
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

    def spawn(self, name: str, argv: list[str]) -> Process:
        """Start `argv` in its own session, output to logs/<name>.log."""
        proc = Process.start(name, argv, self.log_dir / f"{name}.log", self.env(), self.workdir)
        self.processes[name] = proc
        return proc

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

    def follow(self, run_id: int, name: str | None = None) -> Process:
        """`flwr log <run_id> --stream` in the background: it returns when the run ends."""
        return self.spawn(name or f"run-{run_id}", [self.command("flwr"), "log", str(run_id), CONNECTION, "--stream"])

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
