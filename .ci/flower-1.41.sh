#!/usr/bin/env bash
# The strategy tests on Flower 1.41, the oldest release pyproject.toml admits, in a venv of
# their own (`make test` runs everything on what pip resolves, Flower 1.42 today).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-flwr1.41}
PY=$VENV/bin/python
if [ ! -f "$VENV/.installed" ]; then
    "$PYTHON" -m venv "$VENV"
    # torch first and pinned, as in the Makefile: 2.13.0 is the local CPU build.
    "$PY" -m pip install -q torch==2.13.0
    # only what the strategy tests import: fedsoup, Flower (with Ray, as users install it), pytest
    "$PY" -m pip install -q -e . "flwr[simulation]==1.41.*" "pytest>=8" "pytest-timeout>=2.2"
    touch "$VENV/.installed"
fi
"$PY" -c 'import flwr; print(f"strategy tests on Flower {flwr.__version__}")'
export FLWR_HOME=$PWD/.flwr FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
"$PY" -m pytest -q -p no:cacheprovider tests/test_strategy_*.py
