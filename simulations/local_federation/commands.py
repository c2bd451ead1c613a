"""The commands of the federation: each compose service's argv, environment and trust flags.

What ``docker-compose.yml`` (+ the TLS and auth overlays) runs, as argv lists on loopback:
a pure function of the federation's configuration (ports, TLS directory, auth files),
so it can be read and tested without starting anything. :class:`ServiceCommands` is
mixed into :class:`~simulations.local_federation.federation.LocalFederation`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CONNECTION = "local-deployment"
TLS_FILES = ("ca.crt", "server.pem", "server.key")

# Every process gets these: nothing is installed or looked up on the network at run time.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}


class FederationError(RuntimeError):
    """A process of the federation failed to start, or a `flwr` command failed."""


class ServiceCommands:
    """The argv of every service, from the attributes :class:`LocalFederation` sets:
    ``port``, ``supernode_ports``, ``num_supernodes``, ``tls_dir``, ``auth``, ``bin_dir``,
    ``flwr_home``, ``state_db``."""

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

    def write_cli_config(self) -> Path:
        """$FLWR_HOME/config.toml with the `local-deployment` connection for the `flwr` CLI."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        lines.append(f"root-certificates = {json.dumps(str(self.ca_cert))}" if self.tls_dir else "insecure = true")
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

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
