#!/usr/bin/env bash
# The topology of docker-compose.yml as local processes on 127.0.0.1 (no Docker):
# a SuperLink, N SuperNodes with their node-config, and the SuperExecs, then
# `flwr run` of this project's App with FedSoup, then everything is stopped.
#
#   scripts/deploy-local.sh                         # 3 SuperNodes, FedSoup, 2 rounds
#   scripts/deploy-local.sh --supernodes 5 --rounds 3 --run-config 'local-epochs=1'
#   scripts/deploy-local.sh --tls                   # certificates from scripts/make-certs.sh
#   scripts/deploy-local.sh --tls --auth            # + only registered SuperNodes (scripts/make-node-keys.sh)
#   scripts/deploy-local.sh --no-run                # just the federation, until Ctrl-C
#   scripts/deploy-local.sh --help                  # every option
#
# A thin entry point: the launcher is the Python module simulations.local_federation
# (its LocalFederation class is the same as an API). Runs with the project's
# virtualenv (override with PYTHON=...); the Flower commands are taken from the
# same environment. See docs/deployment.md.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"
# This checkout's code, also where the project is installed elsewhere.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m simulations.local_federation "$@"
