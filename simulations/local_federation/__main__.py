"""`scripts/deploy-local.sh` (= ``python -m simulations.local_federation``): the command line.

    scripts/deploy-local.sh                        # 3 SuperNodes, FedSoup, 2 rounds
    scripts/deploy-local.sh --tls --rounds 3       # the same over TLS (scripts/make-certs.sh)
    scripts/deploy-local.sh --tls --auth           # + only registered SuperNodes (scripts/make-node-keys.sh)
    scripts/deploy-local.sh --keep                 # leave it running after the run (Ctrl-C stops)

Starts a :class:`LocalFederation`, submits the App with ``flwr run <app>
local-deployment``, echoes its log until the run ends, and stops every process
it started (also on Ctrl-C, SIGTERM or an error).

Everything lives in ``--workdir`` (default ``.flwr/deploy-local`` in the
repository: ``.flwr/`` is git-ignored and left out of the App bundle that
``flwr run .`` builds, so run artefacts never travel with the App): ``flwr-home/``
(the ``flwr`` CLI's connection), ``state/`` (SuperLink database and the registered
node ids), ``checkpoints/`` (FedSoup's ``checkpoint_dir``: run again with the same
workdir and FedSoup resumes), ``outputs/`` (``rounds.json``,
``final_model.safetensors``), ``logs/`` (one log per process), and with ``--tls`` /
``--auth`` the generated ``certificates/`` and ``keys/`` unless given elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from simulations.local_federation.auth import KEYS_SCRIPT, NodeAuthFiles
from simulations.local_federation.commands import CONNECTION, FederationError
from simulations.local_federation.federation import LocalFederation, checkpoint_round
from simulations.local_federation.flwr_client import FINISHED_OK, TomlText
from simulations.local_federation.processes import Process

REPO_ROOT = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--auth", action="store_true",
                        help="SuperNode authentication (implies --tls): the SuperLink admits only the SuperNodes "
                             "registered with `flwr supernode register`, SuperExecs authenticate with a shared "
                             f"secret file; keys and secrets from {KEYS_SCRIPT} (made in WORKDIR/keys unless "
                             "--keys is given)")
    parser.add_argument("--keys", default=None,
                        help="directory with supernode-<i>.key/.pub/.secret and superlink.secret (implies --auth)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete WORKDIR/checkpoints and WORKDIR/outputs first (otherwise FedSoup "
                             "resumes from the checkpoint a previous run left there)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--keep", action="store_true", help="after the run, keep the federation up until Ctrl-C")
    mode.add_argument("--no-run", action="store_true",
                      help="only start the federation (until Ctrl-C); submit with `FLWR_HOME=WORKDIR/flwr-home "
                           f"flwr run . {CONNECTION}`")
    return parser


def security_dirs(args: argparse.Namespace, workdir: Path) -> tuple[Path | None, Path | None]:
    """The TLS and auth directories the options ask for, made by the scripts if absent."""
    auth = args.auth or args.keys is not None
    tls_dir = auth_dir = None
    if args.tls or args.certs or auth:
        tls_dir = Path(args.certs).resolve() if args.certs else workdir / "certificates"
        if not (tls_dir / "server.pem").exists():
            subprocess.run([str(REPO_ROOT / "scripts" / "make-certs.sh"), str(tls_dir)], check=True)
    if auth:
        auth_dir = Path(args.keys).resolve() if args.keys else workdir / "keys"
        if NodeAuthFiles(auth_dir, args.supernodes).missing():  # the script keeps what exists
            subprocess.run([str(REPO_ROOT / KEYS_SCRIPT), str(auth_dir), str(args.supernodes)], check=True)
    return tls_dir, auth_dir


@contextlib.contextmanager
def forward_signals_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM (e.g. from `kill` or a test) tears down like Ctrl-C does."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Path(args.workdir).resolve()
    tls_dir, auth_dir = security_dirs(args, workdir)
    fed = LocalFederation(workdir, args.supernodes, tls_dir=tls_dir, auth_dir=auth_dir, port=args.port)
    if args.fresh:
        for stale in (fed.checkpoint_dir, fed.output_dir):
            shutil.rmtree(stale, ignore_errors=True)
    resumed_round = checkpoint_round(fed.checkpoint_dir)
    if resumed_round is not None and not args.no_run:
        print(f"deploy-local: {fed.checkpoint_dir} holds round {resumed_round}: FedSoup resumes after it "
              f"(--fresh starts over)", flush=True)
    print(f"deploy-local: SuperLink on {'https' if tls_dir else 'http'}://{fed.address}, "
          f"{args.supernodes} SuperNodes{' (registered only)' if auth_dir else ''}; logs in {fed.log_dir}",
          flush=True)
    code = 0
    with forward_signals_as_keyboard_interrupt():
        try:
            with fed:
                if auth_dir is not None:
                    print(f"deploy-local: registered SuperNodes (name: node id): {fed.registered.load()}", flush=True)
                (workdir / "READY").write_text(f"{fed.address}\n", encoding="utf-8")
                if not args.no_run:
                    code = run_once(fed, args)
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


def run_once(fed: LocalFederation, args: argparse.Namespace) -> int:
    """Submit the App, echo its log until it ends; 0 if it completed."""
    run_config = {"strategy": args.strategy, "num-server-rounds": args.rounds,
                  "num-partitions": args.supernodes,
                  "checkpoint-dir": str(fed.checkpoint_dir), "output-dir": str(fed.output_dir)}
    run_id = fed.submit(args.app, run_config | parse_extra(args.run_config))
    print(f"deploy-local: run {run_id} submitted; following its log", flush=True)
    status = follow_to_console(fed, fed.follow(run_id), run_id)
    print(f"deploy-local: run {run_id} {status}; checkpoints in {fed.checkpoint_dir}, "
          f"outputs in {fed.output_dir}", flush=True)
    return 0 if status == FINISHED_OK else 1


def parse_extra(text: str) -> dict[str, TomlText]:
    """`k=v k2=v2` pairs, passed to `flwr run` verbatim (already TOML values)."""
    extra = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"deploy-local: --run-config entry '{pair}' is not key=value")
        extra[key] = TomlText(value)
    return extra


def follow_to_console(fed: LocalFederation, follower: Process, run_id: int) -> str:
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
    return fed.final_status(run_id)


if __name__ == "__main__":
    raise SystemExit(main())
