"""Shared test setup: Flower never touches ~/.flwr and never installs anything at run time;
``no_hang`` fails a test that blocks (a named pipe opened) instead of hanging the run."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile

import pytest

# Set before any test imports Flower; a project-local FLWR_HOME from the Makefile is kept.
if "FLWR_HOME" not in os.environ:
    os.environ["FLWR_HOME"] = tempfile.mkdtemp(prefix="fedsoup-test-flwr-")
    atexit.register(shutil.rmtree, os.environ["FLWR_HOME"], ignore_errors=True)
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture
def no_hang():
    """Fail a test that blocks (opening a named pipe waits for a writer) instead of hanging the run."""

    def timeout(*_):
        raise TimeoutError("blocked for 5 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(5)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
