"""Talking to the federation through the ``flwr`` CLI, as an operator would.

``flwr run`` / ``ls`` / ``log`` for runs, ``flwr supernode register`` / ``unregister`` /
``list`` for SuperNode authentication; answers are read from ``--format json``.
:class:`FlwrClient` is mixed into :class:`~simulations.local_federation.federation.LocalFederation`.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulations.local_federation.auth import supernode_name
from simulations.local_federation.commands import CONNECTION, FederationError

FINISHED_OK = "finished:completed"
# `flwr supernode register` answers this (with exit code 0) for a key the SuperLink
# already knows: registered before (state database kept), or unregistered since.
KEY_ALREADY_REGISTERED = "Public key already in use"


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


class FlwrClient:
    """The ``flwr`` CLI against this federation (``env()`` holds its ``FLWR_HOME`` connection),
    from the attributes :class:`LocalFederation` sets: ``workdir``, ``auth``,
    ``num_supernodes``, ``registered``."""

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
