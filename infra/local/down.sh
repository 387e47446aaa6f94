#!/usr/bin/env bash
# Stops what `up.sh` started: the broker (a controlled shutdown) and Redis if
# it started one. A Postgres, Redis or broker that was already running before
# `make up` is left alone. The 3-node cluster has its own `cluster.sh down`.
source "$(dirname "$0")/common.sh"

if kafka_running "$STATE_DIR/kafka"; then
  say "broker: controlled shutdown (pid $(cat "$STATE_DIR/kafka/kafka.pid"))"
  kafka_stop "$STATE_DIR/kafka" TERM
else
  say "broker: not started by make up; leaving it alone"
fi
if [[ -f "$STATE_DIR/redis.pid" ]]; then
  pid="$(cat "$STATE_DIR/redis.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    say "redis: stopping (pid $pid)"
    redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$STATE_DIR/redis.pid"
else
  say "redis: not started by make up; leaving it alone"
fi
say "down (state kept in $STATE_DIR; delete it to start from scratch)"
