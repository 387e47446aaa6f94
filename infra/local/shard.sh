#!/usr/bin/env bash
# Two more Postgres servers, the shards of README "Sharding", beside the
# shared one (never instead of it), for `make bench`'s sharding row:
#
#   shard.sh up     starts SHARDS servers (default 2) unless they run; shard i
#                   listens on 127.0.0.1:$((SHARD_BASE_PORT + i)) (5451, 5452)
#                   with a database `coupons`; `make shard-up`.
#   shard.sh down   stops them (data kept in .state/shard); `make shard-down`.
#   shard.sh urls   prints their URLs, comma-separated (BENCH_SHARD_URLS).
#
# Each server loads pg_stat_statements, so the bench can show which
# statements each shard ran. Development only: trust authentication on
# 127.0.0.1, like the shared server.
source "$(dirname "$0")/common.sh"

SHARDS="${SHARDS:-2}"
SHARD_BASE_PORT="${SHARD_BASE_PORT:-5450}"
SHARD_HOST=127.0.0.1
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
# Postgres refuses to run as root: as root, the servers run as `postgres`.
if ((EUID == 0)); then SHARD_USER="${SHARD_USER:-postgres}"; else SHARD_USER="$(id -un)"; fi
# Their folders: .state/shard, unless the Postgres user cannot reach the
# clone (one under a private home such as /root): then beside its home.
if [[ -z "${SHARD_DIR:-}" ]]; then
  SHARD_DIR="$STATE_DIR/shard"
  if ((EUID == 0)) && id "$SHARD_USER" >/dev/null 2>&1 \
      && ! setpriv --reuid="$SHARD_USER" --regid="$SHARD_USER" --init-groups -- test -x "$REPO_ROOT" 2>/dev/null; then
    SHARD_DIR="$(getent passwd "$SHARD_USER" | cut -d: -f6)/coupons-shard-$(printf '%s' "$REPO_ROOT" | md5sum | cut -c1-8)"
  fi
fi

as_pg() {
  if ((EUID == 0)); then setpriv --reuid="$SHARD_USER" --regid="$SHARD_USER" --init-groups -- "$@"; else "$@"; fi
}
shard_dir() { echo "$SHARD_DIR/pg$1"; }
shard_port() { echo $((SHARD_BASE_PORT + $1)); }
shard_running() { [[ -f "$(shard_dir "$1")/postmaster.pid" ]] && as_pg "$PG_BIN/pg_ctl" -D "$(shard_dir "$1")" status >/dev/null 2>&1; }

start_shard() {
  local n=$1 dir port
  dir="$(shard_dir "$n")"; port="$(shard_port "$n")"
  if [[ ! -f "$dir/PG_VERSION" ]]; then
    mkdir -p "$dir"
    if ((EUID == 0)); then chown "$SHARD_USER" "$SHARD_DIR" "$dir"; fi
    chmod 700 "$dir"
    as_pg "$PG_BIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >"$SHARD_DIR/initdb-$n.log" 2>&1 \
      || fail "initdb of shard $n failed: see $SHARD_DIR/initdb-$n.log"
    cat >>"$dir/postgresql.conf" <<CONF
listen_addresses = '$SHARD_HOST'
port = $port
unix_socket_directories = '$dir'
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
shared_buffers = 128MB
max_connections = 50
CONF
  fi
  as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null \
    || fail "shard $n did not start: see $dir/server.log"
  psql -h "$SHARD_HOST" -p "$port" -U postgres -d postgres -tAXc "SELECT 1 FROM pg_database WHERE datname = 'coupons'" | grep -q 1 \
    || psql -h "$SHARD_HOST" -p "$port" -U postgres -d postgres -qXc 'CREATE DATABASE coupons'
  psql -h "$SHARD_HOST" -p "$port" -U postgres -d coupons -qXc 'CREATE EXTENSION IF NOT EXISTS pg_stat_statements'
}

urls() {
  local n out=()
  for n in $(seq 1 "$SHARDS"); do out+=("postgres://postgres@$SHARD_HOST:$(shard_port "$n")/coupons"); done
  (IFS=,; echo "${out[*]}")
}

case "${1:-}" in
  up)
    [[ -x "$PG_BIN/initdb" ]] || fail "no Postgres binaries in $PG_BIN: run 'make setup'"
    mkdir -p "$SHARD_DIR"
    for n in $(seq 1 "$SHARDS"); do
      if shard_running "$n"; then say "shard: $n: reusing $SHARD_HOST:$(shard_port "$n")"
      else say "shard: $n: starting Postgres on $SHARD_HOST:$(shard_port "$n") (data in $(shard_dir "$n"))"; start_shard "$n"; fi
    done
    say "shard: up: $(urls)"
    ;;
  down)
    for n in $(seq 1 "$SHARDS"); do
      if shard_running "$n"; then
        as_pg "$PG_BIN/pg_ctl" -D "$(shard_dir "$n")" -m fast -w stop >/dev/null && say "shard: $n: stopped"
      fi
    done
    ;;
  urls) urls ;;
  *) fail "usage: shard.sh up | down | urls" ;;
esac
