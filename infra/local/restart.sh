#!/usr/bin/env bash
# restart.sh broker|postgres|redis: stops one service hard and starts it
# again, as an outage would. Used by the fault-injection suite (`make chaos`
# and the quick version in `make test`); it disturbs every client of that
# service on this machine, so nothing else should be running tests meanwhile.
source "$(dirname "$0")/common.sh"

case "${1:-}" in
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
    fail "usage: $0 broker|postgres|redis"
    ;;
esac
say "restarted $1"
