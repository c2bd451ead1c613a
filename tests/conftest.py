"""Shared test setup: Flower never touches ~/.flwr and never installs anything at run time."""

from __future__ import annotations

import os
import tempfile

# Set before any test imports Flower; a project-local FLWR_HOME from the Makefile is kept.
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedsoup-test-flwr-"))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
