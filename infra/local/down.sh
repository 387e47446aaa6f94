#!/usr/bin/env bash
# Stops what `up.sh` started (the broker, and Redis if it started one). A
# Postgres or Redis that was already running before `make up` is left alone.
source "$(dirname "$0")/common.sh"

stop_pidfile() {
  local name=$1 pidfile=$2
  if [[ -f "$pidfile" ]]; then
    local pid; pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      say "$name: stopping (pid $pid)"
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
  else
    say "$name: not started by make up; leaving it alone"
  fi
}

stop_pidfile broker "$STATE_DIR/tansu.pid"
stop_pidfile redis "$STATE_DIR/redis.pid"
say "down (state kept in $STATE_DIR; delete it to start from scratch)"
