"""Shared test setup: Flower never touches ~/.flwr and never installs anything at run time."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Set before any test imports Flower; a project-local FLWR_HOME from the Makefile is kept.
if "FLWR_HOME" not in os.environ:
    os.environ["FLWR_HOME"] = tempfile.mkdtemp(prefix="fedsoup-test-flwr-")
    atexit.register(shutil.rmtree, os.environ["FLWR_HOME"], ignore_errors=True)
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
