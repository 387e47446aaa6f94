#!/usr/bin/env bash
# restart.sh broker|postgres|redis: stops one service hard and starts it
# again, as an outage would. restart.sh freeze broker|postgres|redis SECONDS:
# stops its processes (SIGSTOP) for that long and lets them go on (SIGCONT),
# as a long GC pause, a stalled disk or a hung VM would: connections stay
# open, nothing answers. Used by the fault-injection suite (`make chaos`
# and the quick version in `make test`); it disturbs every client of that
# service on this machine, so nothing else should be running tests meanwhile.
source "$(dirname "$0")/common.sh"

# The processes of one service, for freeze.
service_pids() {
  case "$1" in
    broker) kafka_running "$STATE_DIR/kafka" && cat "$STATE_DIR/kafka/kafka.pid" ;;
    # The cluster of `make up` only (its postmaster and children), not the
    # members of `make ha-up`, which have faults of their own (ha.sh).
    postgres)
      local version pm
      version="$(ls /etc/postgresql | sort -V | tail -n 1)"
      pm="$(head -n 1 "/var/run/postgresql/$version-main.pid" 2>/dev/null)" || return 0
      kill -0 "$pm" 2>/dev/null || return 0
      echo "$pm"; pgrep -P "$pm" || true
      ;;
    redis) pgrep -x redis-server || true ;;
  esac
}

case "${1:-}" in
  freeze)
    service="${2:-}"; seconds="${3:-5}"
    pids="$(service_pids "$service")"
    [[ -n "$pids" ]] || fail "no running $service to freeze"
    # Whatever happens meanwhile, the service goes on afterwards.
    trap 'kill -CONT $pids 2>/dev/null || true' EXIT
    kill -STOP $pids
    say "stopped $service"
    sleep "$seconds"
    kill -CONT $pids
    say "froze $service for ${seconds}s"
    exit 0
    ;;
  broker)
    dir="$STATE_DIR/kafka"
    kafka_running "$dir" || fail "the broker was not started by make up, so it cannot be restarted here"
    # SIGKILL: no controlled shutdown, as in a crash. Kafka recovers its log
    # segments on the next start; acknowledged records were on disk
    # (the OS page cache survives a process crash).
    kafka_stop "$dir" KILL
    "$(dirname "$0")/up.sh" >/dev/null
    ;;
  postgres)
    command -v pg_ctlcluster >/dev/null 2>&1 || fail "pg_ctlcluster not found: cannot restart Postgres here"
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    # -m fast: open connections are cut, in-flight transactions roll back.
    pg_ctlcluster --skip-systemctl-redirect "$version" main restart -m fast
    wait_for postgres 30 pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
    ;;
  redis)
    # Redis keeps nothing on disk here, so a restart is a total loss of its data.
    if [[ -f "$STATE_DIR/redis.pid" ]]; then
      redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
      rm -f "$STATE_DIR/redis.pid"
      "$(dirname "$0")/up.sh" >/dev/null
    elif [[ -x /etc/init.d/redis-server ]]; then
      redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" flushall >/dev/null
      /etc/init.d/redis-server restart >/dev/null
      wait_for redis 15 bash -c "redis-cli -h $REDIS_HOST -p $REDIS_PORT ping | grep -q PONG"
    else
      fail "Redis was not started by make up and has no init script: cannot restart it here"
    fi
    ;;
  *)
    fail "usage: $0 broker|postgres|redis, or $0 freeze broker|postgres|redis SECONDS"
    ;;
esac
say "restarted $1"
