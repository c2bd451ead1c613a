"""Shared by the deployment tests: waiting on deploy-local.sh, checking its teardown, loading scripts."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

from simulations import local_federation as lf

NUM_SUPERNODES = 3
# The FedSoup run of the deployment tests (loopback and Docker): small and quick (digits,
# one local epoch). The ServerStew keeps a momentum buffer, so resuming must restore
# optimizer state, not only the model.
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


def assert_all_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 15
    alive = [p for p in pids if lf.pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if lf.pid_alive(p)]
    assert not alive, f"processes still running after teardown: {alive}"


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"deploy-local.sh exited ({process.returncode}) before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def stop_federation(fed: lf.LocalFederation) -> None:
    """Stop a LocalFederation and check that none of its processes (or their children) is left."""
    started = [p.pid for p in fed.processes.values()]
    started += [c for p in fed.processes.values() for c in lf.descendants(p.pid)]
    fed.stop()
    assert_all_gone(started)


def stop_script(script: subprocess.Popen, started: list[int]) -> None:
    """SIGTERM deploy-local.sh (it tears its federation down), SIGKILL what is left after 60 s,
    then check that every process it started is gone."""
    started = started or [script.pid, *lf.descendants(script.pid)]
    if script.poll() is None:
        script.send_signal(signal.SIGTERM)
        try:
            script.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for pid in started:
                lf.signal_group(pid, signal.SIGKILL)
            script.wait()
    assert_all_gone(started)


def load_module(name: str, path: Path):
    """Import a script that is not in a package (the deployment scripts, the stand-in builder)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
