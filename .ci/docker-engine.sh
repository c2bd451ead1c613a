#!/usr/bin/env bash
# Best effort: a running Docker engine (+ docker-compose, debootstrap) for
# tests/test_deploy_docker.py, which builds and runs docker-compose.yml for real.
# Never fails: without an engine that test skips and says why.
#
#   .ci/docker-engine.sh start   # installs (apt) and starts dockerd if none answers;
#                                # prints the pid of a dockerd it started (stdout)
#   .ci/docker-engine.sh stop PID
set -uo pipefail

log() { echo "ci docker: $*" >&2; }

engine_answers() { command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; }

start() {
  if engine_answers; then
    log "an engine answers already"
  else
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
      log "not root or no apt-get: no engine"; return 0
    fi
    if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
      local t0=$SECONDS
      if ! { timeout 600 apt-get update -q && DEBIAN_FRONTEND=noninteractive timeout 900 \
               apt-get install -y -q docker.io docker-compose debootstrap; } >/tmp/ci-docker-apt.log 2>&1; then
        log "apt-get failed (see /tmp/ci-docker-apt.log): no engine"; return 0
      fi
      log "installed docker.io docker-compose debootstrap in $((SECONDS - t0))s"
    fi
    # Its output goes to a file: it must not hold the caller's $(...) pipe open.
    dockerd </dev/null >/tmp/ci-dockerd.log 2>&1 &
    local pid=$!
    for _ in $(seq 60); do
      engine_answers && break
      kill -0 "$pid" 2>/dev/null || { log "dockerd exited (see /tmp/ci-dockerd.log): no engine"; return 0; }
      sleep 1
    done
    if ! engine_answers; then
      log "dockerd does not answer after 60s: stopping it"; kill "$pid"; return 0
    fi
    log "dockerd started (pid $pid)"
    echo "$pid"
  fi
}

stop() {
  local pid=${1:-}
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
  log "dockerd $pid still running after 30s"
}

case "${1:-}" in
  start) start ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: $0 start|stop PID" >&2; exit 2 ;;
esac
exit 0
