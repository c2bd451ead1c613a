#!/usr/bin/env python3
"""A Flower deployment on loopback, as plain processes: docker-compose.yml without Docker.

    scripts/deploy-local.sh                        # 3 SuperNodes, FedSoup, 2 rounds
    scripts/deploy-local.sh --tls --rounds 3       # the same over TLS (scripts/make-certs.sh)
    scripts/deploy-local.sh --keep                 # leave it running after the run (Ctrl-C stops)

It starts the processes of docker-compose.yml with the same flags: one
``flower-superlink`` (``--isolation process``, a state database), the
``flower-superexec`` that runs the ServerApp, N ``flower-supernode`` with
``--node-config 'partition-id=i num-partitions=N'`` and one ClientApp
``flower-superexec`` each, all on free 127.0.0.1 ports. It then submits the App
with ``flwr run <app> local-deployment``, follows its log until the run ends,
and stops every process it started (also on Ctrl-C or an error).

Everything lives in ``--workdir`` (default ``.flwr/deploy-local`` in the
repository: ``.flwr/`` is git-ignored and left out of the App bundle that
``flwr run .`` builds, so run artefacts never travel with the App): ``flwr-home/``
(the ``flwr`` CLI's connection), ``state/state.db`` (SuperLink state),
``checkpoints/`` (FedSoup's ``checkpoint_dir``: run again with the same workdir
and FedSoup resumes), ``outputs/`` (``rounds.json``, ``final_model.safetensors``)
and ``logs/`` (one log per process).

:class:`LocalFederation` is the same thing as a Python API (the end-to-end tests
use it to kill and restart the server side). Standard library only; the Flower
commands are taken from the running interpreter's environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONNECTION = "local-deployment"
REPO_ROOT = Path(__file__).resolve().parent.parent
FINISHED_OK = "finished:completed"

# Every process gets these: nothing is installed or looked up on the network at run time.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}


class FederationError(RuntimeError):
    """A process of the federation failed to start, or a run could not be submitted."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free a moment ago (held open together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


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


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, whichever of its threads started them (Linux /proc; empty elsewhere)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(p) for p in (task / "children").read_text(encoding="ascii").split()]
        except OSError:
            continue
    return children


def descendants(pid: int) -> list[int]:
    """Every process below `pid`. A process group does not always hold them all (with
    `--isolation subprocess` Flower starts its SuperExec in a new session), so stopping
    walks the tree as well."""
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class Process:
    """One started command: its own session (process group id == pid) and log file."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        """Signal the process, its group and every descendant; SIGKILL what outlives `grace`."""
        pids = [self.pid, *descendants(self.pid)]
        for pid in pids:
            _signal_group(pid, sig)
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        for pid in pids:
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                _signal_group(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.alive():
            self.popen.kill()
        self.popen.wait()


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, i.e. exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


class LocalFederation:
    """SuperLink + ServerApp SuperExec + N (SuperNode + ClientApp SuperExec) on loopback.

    Use as a context manager: every process is stopped on exit, whatever happened.

    Parameters
    ----------
    workdir : directory for state, logs, checkpoints, outputs and the CLI's FLWR_HOME.
    num_supernodes : SuperNodes to start, with partition-id 0..N-1 and num-partitions N.
    tls_dir : a directory made by ``scripts/make-certs.sh`` (ca.crt, server.pem,
        server.key): the SuperLink then serves HTTPS and everyone verifies it with ca.crt.
    port : the SuperLink's HTTP API port (Fleet + Control + Runtime); free one if None.
    bin_dir : where the Flower commands are; default: next to this Python interpreter.
    """

    def __init__(
        self,
        workdir: str | Path,
        num_supernodes: int = 3,
        *,
        tls_dir: str | Path | None = None,
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
            missing = [n for n in ("ca.crt", "server.pem", "server.key") if not (self.tls_dir / n).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"TLS directory '{self.tls_dir}' lacks {', '.join(missing)}: "
                    "make them with scripts/make-certs.sh"
                )
        ports = free_ports(1 + num_supernodes)
        self.port = port if port is not None else ports[0]
        self.supernode_ports = ports[1:]
        self.bin_dir = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
        self.startup_timeout = startup_timeout
        self.flwr_home = self.workdir / "flwr-home"
        self.state_db = self.workdir / "state" / "state.db"
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

    def _client_security(self) -> list[str]:
        """How a client of the SuperLink (SuperNode, SuperExec) trusts it."""
        return ["--root-certificates", str(self.ca_cert)] if self.tls_dir else ["--insecure"]

    def spawn(self, name: str, argv: list[str]) -> Process:
        """Start `argv` in its own session, output to logs/<name>.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(  # noqa: S603 - argv is built here, never from a shell
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env(), cwd=self.workdir, start_new_session=True,
            )
        proc = Process(name, argv, log_path, popen)
        self.processes[name] = proc
        return proc

    def write_cli_config(self) -> Path:
        """$FLWR_HOME/config.toml with the `local-deployment` connection for `flwr run/ls/log`."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        lines.append(f"root-certificates = {json.dumps(str(self.ca_cert))}" if self.tls_dir else "insecure = true")
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    # ------------------------------------------------------------ commands
    def superlink_argv(self) -> list[str]:
        if self.tls_dir is not None:
            security = ["--ssl-ca-certfile", str(self.tls_dir / "ca.crt"),
                        "--ssl-certfile", str(self.tls_dir / "server.pem"),
                        "--ssl-keyfile", str(self.tls_dir / "server.key")]
        else:
            security = ["--insecure"]
        return [self.command("flower-superlink"), *security, "--isolation", "process",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.state_db), "--disable-runtime-dependency-installation"]

    def serverapp_superexec_argv(self) -> list[str]:
        return [self.command("flower-superexec"), *self._client_security(),
                "--runtime-api-address", self.address]

    def supernode_argv(self, partition_id: int) -> list[str]:
        return [self.command("flower-supernode"), *self._client_security(),
                "--superlink", self.address, "--isolation", "process",
                "--host", "127.0.0.1", "--port", str(self.supernode_ports[partition_id]),
                "--node-config", f"partition-id={partition_id} num-partitions={self.num_supernodes}"]

    def clientapp_superexec_argv(self, partition_id: int) -> list[str]:
        # SuperNode <-> SuperExec stays on one host: plain HTTP on loopback, as in compose.
        return [self.command("flower-superexec"), "--insecure",
                "--runtime-api-address", f"127.0.0.1:{self.supernode_ports[partition_id]}"]

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
        for i in range(self.num_supernodes):
            self.spawn(f"supernode-{i}", self.supernode_argv(i))
            self.spawn(f"superexec-clientapp-{i}", self.clientapp_superexec_argv(i))
        time.sleep(0.5)
        self.check_alive()
        return self

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
                    f"({proc.log_path}) ends with:\n{_tail(proc.log())}"
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

    # ------------------------------------------------------------ runs
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

    def submit(self, app_dir: str | Path, run_config: Mapping[str, Any] | None = None) -> int:
        """`flwr run <app_dir> local-deployment --run-config ...`; returns the run id."""
        args = ["run", str(Path(app_dir).resolve()), CONNECTION, "--format", "json"]
        if run_config:
            args += ["--run-config", run_config_arg(run_config)]
        result = self.flwr(*args)
        try:
            payload = json.loads(result.stdout[result.stdout.index("{"):])
            return int(payload["run-id"])
        except (ValueError, KeyError, TypeError):
            raise FederationError(f"`flwr run` gave no run id:\n{result.stdout}\n{result.stderr}") from None

    def follow(self, run_id: int, name: str | None = None) -> Process:
        """`flwr log <run_id> --stream` in the background: it returns when the run ends."""
        return self.spawn(name or f"run-{run_id}", [self.command("flwr"), "log", str(run_id), CONNECTION, "--stream"])

    def status(self, run_id: int) -> str:
        """The run's status as `flwr ls` shows it, e.g. 'running' or 'finished:completed'."""
        result = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        payload = json.loads(result.stdout[result.stdout.index("{"):])
        return str(payload["runs"][0]["status"])

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
        # The log stream ends a moment before the status is final.
        for _ in range(20):
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(0.5)
        return status

    def run(self, app_dir: str | Path, run_config: Mapping[str, Any] | None = None,
            timeout: float = 300.0) -> tuple[int, str]:
        run_id = self.submit(app_dir, run_config)
        return run_id, self.wait(run_id, timeout)

    def run_log(self, run_id: int) -> str:
        return self.log_dir.joinpath(f"run-{run_id}.log").read_text(errors="replace")


def checkpoint_round(checkpoint_dir: Path) -> int | None:
    """The last round FedSoup checkpointed in `checkpoint_dir` (its state.json), if any."""
    try:
        return int(json.loads((checkpoint_dir / "state.json").read_text())["state"]["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def _forward_signals_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM (e.g. from `kill` or a test) tears down like Ctrl-C does."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deploy-local.sh",
        description="Run this project's Flower App on a local deployment: a SuperLink, N SuperNodes "
                    "and their SuperExecs as processes on 127.0.0.1, the topology of docker-compose.yml.",
    )
    parser.add_argument("--supernodes", type=int, default=3, metavar="N", help="SuperNodes to start (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="num-server-rounds (default 2)")
    parser.add_argument("--strategy", default="fedsoup", help="run config 'strategy' (default fedsoup)")
    parser.add_argument("--run-config", default="",
                        help="more run config, as for `flwr run --run-config`, e.g. \"local-epochs=1\"")
    parser.add_argument("--workdir", default=str(REPO_ROOT / ".flwr" / "deploy-local"),
                        help="state, logs, checkpoints, outputs (default: .flwr/deploy-local)")
    parser.add_argument("--app", default=str(REPO_ROOT), help="the Flower App directory (default: this repository)")
    parser.add_argument("--port", type=int, default=None, help="SuperLink port (default: a free port)")
    parser.add_argument("--tls", action="store_true",
                        help="serve the SuperLink over TLS with certificates from scripts/make-certs.sh "
                             "(made in WORKDIR/certificates unless --certs is given)")
    parser.add_argument("--certs", default=None, help="directory with ca.crt, server.pem, server.key")
    parser.add_argument("--fresh", action="store_true",
                        help="delete WORKDIR/checkpoints and WORKDIR/outputs first (otherwise FedSoup "
                             "resumes from the checkpoint a previous run left there)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--keep", action="store_true", help="after the run, keep the federation up until Ctrl-C")
    mode.add_argument("--no-run", action="store_true",
                      help="only start the federation (until Ctrl-C); submit with `FLWR_HOME=WORKDIR/flwr-home "
                           f"flwr run . {CONNECTION}`")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    tls_dir = None
    if args.tls or args.certs:
        tls_dir = Path(args.certs).resolve() if args.certs else workdir / "certificates"
        if not (tls_dir / "server.pem").exists():
            subprocess.run([str(REPO_ROOT / "scripts" / "make-certs.sh"), str(tls_dir)], check=True)

    fed = LocalFederation(workdir, args.supernodes, tls_dir=tls_dir, port=args.port)
    if args.fresh:
        for stale in (fed.checkpoint_dir, fed.output_dir):
            shutil.rmtree(stale, ignore_errors=True)
    resumed_round = checkpoint_round(fed.checkpoint_dir)
    if resumed_round is not None and not args.no_run:
        print(f"deploy-local: {fed.checkpoint_dir} holds round {resumed_round}: FedSoup resumes after it "
              f"(--fresh starts over)", flush=True)
    print(f"deploy-local: SuperLink on {'https' if tls_dir else 'http'}://{fed.address}, "
          f"{args.supernodes} SuperNodes; logs in {fed.log_dir}", flush=True)
    code = 0
    with _forward_signals_as_keyboard_interrupt():
        try:
            with fed:
                (workdir / "READY").write_text(f"{fed.address}\n", encoding="utf-8")
                if not args.no_run:
                    run_config = {"strategy": args.strategy, "num-server-rounds": args.rounds,
                                  "num-partitions": args.supernodes,
                                  "checkpoint-dir": str(fed.checkpoint_dir), "output-dir": str(fed.output_dir)}
                    run_id = fed.submit(args.app, run_config | _parse_extra(args.run_config))
                    print(f"deploy-local: run {run_id} submitted; following its log", flush=True)
                    follower = fed.follow(run_id)
                    status = _follow_to_console(fed, follower, run_id)
                    print(f"deploy-local: run {run_id} {status}; checkpoints in {fed.checkpoint_dir}, "
                          f"outputs in {fed.output_dir}", flush=True)
                    code = 0 if status == FINISHED_OK else 1
                if args.keep or args.no_run:
                    print(f"deploy-local: running; `FLWR_HOME={fed.flwr_home} flwr run . {CONNECTION}` "
                          "submits a run. Ctrl-C stops everything.", flush=True)
                    while True:
                        fed.check_alive()
                        time.sleep(1.0)
        except KeyboardInterrupt:
            print("deploy-local: stopping", flush=True)
        except FederationError as err:
            print(f"deploy-local: {err}", file=sys.stderr, flush=True)
            code = 1
        finally:
            (workdir / "READY").unlink(missing_ok=True)
    return code


def _parse_extra(text: str) -> dict[str, TomlText]:
    """`k=v k2=v2` pairs, passed to `flwr run` verbatim (already TOML values)."""
    extra = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"deploy-local: --run-config entry '{pair}' is not key=value")
        extra[key] = TomlText(value)
    return extra


def _follow_to_console(fed: LocalFederation, follower: Process, run_id: int) -> str:
    """Echo the run's log as it grows, until the run ends; return its final status."""
    offset = 0
    while True:
        alive = follower.alive()
        text = follower.log()
        sys.stdout.write(text[offset:])
        sys.stdout.flush()
        offset = len(text)
        if not alive:
            break
        fed.check_alive()
        time.sleep(0.5)
    fed.processes.pop(follower.name, None)
    for _ in range(20):
        status = fed.status(run_id)
        if status.startswith("finished"):
            break
        time.sleep(0.5)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
