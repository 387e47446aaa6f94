#!/usr/bin/env bash
# Starts Postgres, Redis and the Kafka broker, reusing any that already
# answer. Idempotent: running it twice is fine.
source "$(dirname "$0")/common.sh"
mkdir -p "$STATE_DIR"

# Postgres: Debian's cluster, with passwordless access for the `postgres`
# role over loopback so that the default DATABASE_URL
# (postgres://postgres@127.0.0.1:5432/coupons) works. Development only: the
# rule admits nothing but local connections.
if pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then
  say "postgres: reusing ${PG_HOST}:${PG_PORT}"
elif command -v pg_ctlcluster >/dev/null 2>&1 && [[ -d /etc/postgresql ]] && [[ -n "$(ls /etc/postgresql)" ]]; then
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  conf="/etc/postgresql/$version/main"
  if ! grep -q 'coupons: local development' "$conf/pg_hba.conf"; then
    { printf '# coupons: local development (infra/local/up.sh): loopback needs no password\n'
      printf 'host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust\n'
      cat "$conf/pg_hba.conf"; } >"$conf/pg_hba.conf.new"
    mv "$conf/pg_hba.conf.new" "$conf/pg_hba.conf"
    chown postgres:postgres "$conf/pg_hba.conf"
  fi
  # Sized for the test suite (one database and pool per test, in parallel).
  printf '%s\n' "# Written by infra/local/up.sh" "max_connections = 400" "shared_buffers = 256MB" \
    >"$conf/conf.d/coupons.conf"
  say "postgres: starting cluster ${version}/main"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
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
  # noeviction: the sold-out answers read a missing hold or quota key as a
  # fact (consumers/src/restore.rs), so keys may be lost only all at once.
  redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no \
    --maxmemory-policy noeviction \
    --dir "$STATE_DIR/redis" --logfile "$STATE_DIR/redis.log" --pidfile "$STATE_DIR/redis.pid"
  wait_for redis 15 bash -c "redis-cli -h $REDIS_HOST -p $REDIS_PORT ping | grep -q PONG"
  say "redis: log at $STATE_DIR/redis.log"
fi

# Broker: a single Apache Kafka node in KRaft mode (broker and controller in
# one process), replication factor 1.
# A node with a big data directory (every test and bench run's topics) takes
# longer to load its logs: BROKER_START_TIMEOUT seconds, 300 by default.
start_timeout="${BROKER_START_TIMEOUT:-300}"
if port_open "$BROKER_HOST" "$BROKER_PORT"; then
  say "broker: reusing ${BROKER_HOST}:${BROKER_PORT}"
elif [[ -f "$STATE_DIR/kafka/kafka.pid" ]] && kill -0 "$(cat "$STATE_DIR/kafka/kafka.pid")" 2>/dev/null; then
  # A start that timed out left its node loading: wait for it rather than
  # start a second one on the same data directory.
  say "broker: a node is still starting (pid $(cat "$STATE_DIR/kafka/kafka.pid")); waiting for it"
  kafka_wait_started "$STATE_DIR/kafka" "$BROKER_PORT" "$start_timeout"
  say "broker: serving; log at $STATE_DIR/kafka/logs/server.log"
else
  dir="$STATE_DIR/kafka"
  kafka_configure "$dir" 1 "$BROKER_PORT" "$CONTROLLER_PORT" "1@${BROKER_HOST}:${CONTROLLER_PORT}" 1 1
  say "broker: starting Apache Kafka ${KAFKA_VERSION} (KRaft, 1 node) on ${BROKER_HOST}:${BROKER_PORT}"
  started=$SECONDS
  kafka_start "$dir" "$KAFKA_HEAP"
  kafka_wait_started "$dir" "$BROKER_PORT" "$start_timeout"
  say "broker: serving after $((SECONDS - started))s; data in $dir/data, log at $dir/logs/server.log"
fi

# The default database for `couponctl run` (tests make their own).
db="$(printf '%s' "${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/coupons}" | sed -E 's#.*/([^/?]+)(\?.*)?$#\1#')"
if ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
  psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "CREATE DATABASE \"$db\"" && say "postgres: created database $db"
fi
say "up: postgres ${PG_HOST}:${PG_PORT}, redis ${REDIS_HOST}:${REDIS_PORT}, broker ${BROKER_HOST}:${BROKER_PORT}"
