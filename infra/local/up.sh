#!/usr/bin/env bash
# Starts Postgres, Redis and the broker, reusing any that already answer.
# Idempotent: running it twice is fine.
source "$(dirname "$0")/common.sh"
mkdir -p "$STATE_DIR"

# Postgres
if pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then
  say "postgres: reusing ${PG_HOST}:${PG_PORT}"
elif command -v pg_ctlcluster >/dev/null 2>&1 && [[ -d /etc/postgresql ]]; then
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  say "postgres: starting cluster ${version}/main"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for postgres 30 pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
  say "postgres: logs in /var/log/postgresql/"
else
  fail "no Postgres on ${PG_HOST}:${PG_PORT} and none installed: run 'make setup'"
fi

# Redis
if redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
  say "redis: reusing ${REDIS_HOST}:${REDIS_PORT}"
else
  command -v redis-server >/dev/null 2>&1 || fail "no Redis on ${REDIS_HOST}:${REDIS_PORT} and none installed: run 'make setup'"
  mkdir -p "$STATE_DIR/redis"
  say "redis: starting on ${REDIS_HOST}:${REDIS_PORT}"
  redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$STATE_DIR/redis" --logfile "$STATE_DIR/redis.log" --pidfile "$STATE_DIR/redis.pid"
  wait_for redis 15 bash -c "redis-cli -h $REDIS_HOST -p $REDIS_PORT ping | grep -q PONG"
  say "redis: log at $STATE_DIR/redis.log"
fi

# Broker
if port_open "$BROKER_HOST" "$BROKER_PORT"; then
  say "broker: reusing ${BROKER_HOST}:${BROKER_PORT}"
else
  [[ -x "$TANSU_BIN" ]] || fail "tansu is not installed at $TANSU_BIN: run 'make setup'"
  mkdir -p "$STATE_DIR/tansu"
  case "$BROKER_STORAGE" in
    sqlite) engine="sqlite://tansu.db"; where="sqlite storage in $STATE_DIR/tansu" ;;
    memory) engine="memory://tansu/"; where="memory storage: every record is lost when it stops" ;;
    *) fail "BROKER_STORAGE must be sqlite or memory, not '$BROKER_STORAGE'" ;;
  esac
  say "broker: starting tansu ${TANSU_VERSION} on ${BROKER_HOST}:${BROKER_PORT} ($where)"
  # tansu resolves sqlite:// paths against its working directory. The
  # subshell execs into the broker with every descriptor redirected, so
  # nothing keeps the caller's terminal or pipe open.
  (cd "$STATE_DIR/tansu" && exec setsid "$TANSU_BIN" broker \
      --listener-url "tcp://${BROKER_HOST}:${BROKER_PORT}" \
      --advertised-listener-url "tcp://${BROKER_HOST}:${BROKER_PORT}" \
      --storage-engine "$engine") >>"$STATE_DIR/tansu.log" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/tansu.pid"
  wait_for broker 30 port_open "$BROKER_HOST" "$BROKER_PORT"
  say "broker: log at $STATE_DIR/tansu.log"
fi

# The default database for `couponctl run` (tests make their own).
db="$(printf '%s' "${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/coupons}" | sed -E 's#.*/([^/?]+)(\?.*)?$#\1#')"
if ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
  psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "CREATE DATABASE \"$db\"" && say "postgres: created database $db"
fi
say "up: postgres ${PG_HOST}:${PG_PORT}, redis ${REDIS_HOST}:${REDIS_PORT}, broker ${BROKER_HOST}:${BROKER_PORT}"
