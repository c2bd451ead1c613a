"""Started commands and their process trees: free ports, start with a log, stop everything.

Flower's commands start children of their own (``flower-superexec`` starts
``flwr-serverapp``/``flwr-clientapp``, sometimes in a new session), so stopping a
command signals its process group *and* walks its descendants through /proc.
Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


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


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by `pid`, if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def pid_alive(pid: int) -> bool:
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


@dataclass
class Process:
    """One started command: its own session (process group id == pid) and log file."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen = field(repr=False)

    @classmethod
    def start(cls, name: str, argv: list[str], log_path: Path, env: Mapping[str, str], cwd: Path) -> Process:
        """Start `argv` in a session of its own; stdout and stderr are appended to `log_path`."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(  # noqa: S603 - argv is built by the caller, never from a shell
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env), cwd=cwd, start_new_session=True,
            )
        return cls(name, argv, log_path, popen)

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
            signal_group(pid, sig)
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        for pid in pids:
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                signal_group(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.alive():
            self.popen.kill()
        self.popen.wait()


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])
