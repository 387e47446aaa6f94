#!/usr/bin/env bash
# Postgres under Patroni on this machine: one etcd member as the
# configuration store, HA_MEMBERS (3) Postgres 15 members managed by Patroni
# with synchronous replication (a commit is acknowledged only once a standby
# has it), and HAProxy in front, routing by Patroni's REST health checks:
#
#   127.0.0.1:5440  writes: the leader (`/primary` answers 200 there only)
#   127.0.0.1:5439  reads: the replicas (`/replica`), the leader when none is up
#
#   ha.sh up                start what is not running (idempotent), wait until it serves
#   ha.sh down              stop HAProxy, the members and etcd (state kept)
#   ha.sh status            patronictl list
#   ha.sh wait-healthy [S]  wait (S seconds, 120) for a leader, every member
#                           streaming from it on its timeline and a sync standby
#   ha.sh leader            the leader's member name (pg1, pg2, pg3)
#   ha.sh sync-standby      the synchronous standby's member name
#   ha.sh kill-postmaster M kill -9 member M's postmaster (Patroni stays)
#   ha.sh kill M            kill -9 member M's Patroni and Postgres (the machine dies)
#   ha.sh start M           start member M's Patroni again
#   ha.sh freeze M SECONDS  SIGSTOP member M's Patroni and Postgres, SIGCONT after
#   ha.sh switchover [M]    patronictl switchover to M (default: the sync standby)
#   ha.sh stop-receivers    SIGSTOP every replica's WAL receiver (lagging standbys)
#   ha.sh kill-receivers    kill -9 them (with what their sockets held)
#   ha.sh set-config JSON   PATCH Patroni's dynamic configuration (e.g.
#                           '{"synchronous_mode": false}'), wait until applied
#   ha.sh url [DB]          the DATABASE_URL of the write port
#   ha.sh dir               where the members' data and logs are
#   ha.sh backup            pg_basebackup of the sync standby into .state/ha/backups, verified
#   ha.sh restore [DIR] [T] that backup plus the WAL archive, to time T, on port 5450
#   ha.sh restore-stop      stop the restored server
#
# Member pgN serves Postgres on HA_PG_BASE_PORT+N (5441..5443) and Patroni's
# REST API on HA_REST_BASE_PORT+N-1 (8008..8010); etcd listens on
# HA_ETCD_PORT (clients) and HA_ETCD_PORT+1 (peers). Data and logs live in
# .state/ha/ (etcd/, pgN/data, pgN/log). Postgres refuses to run as root, so
# the members run as the `postgres` user, as Debian's cluster of `make up` does.
# Development only: loopback connections need no password, as in up.sh.
source "$(dirname "$0")/common.sh"

HA_MEMBERS="${HA_MEMBERS:-3}"
HA_SCOPE="${HA_SCOPE:-coupons-ha}"
HA_WRITE_PORT="${HA_WRITE_PORT:-5440}"
HA_READ_PORT="${HA_READ_PORT:-5439}"
HA_PG_BASE_PORT="${HA_PG_BASE_PORT:-5440}"
HA_REST_BASE_PORT="${HA_REST_BASE_PORT:-8008}"
HA_ETCD_PORT="${HA_ETCD_PORT:-2391}"
HA_HOST=127.0.0.1
# Postgres refuses to run as root: as root, the members run as `postgres`;
# as anyone else, as that user.
if ((EUID == 0)); then HA_USER="${HA_USER:-postgres}"; else HA_USER="$(id -un)"; fi
HA_GROUP="$(id -gn "$HA_USER" 2>/dev/null || echo "$HA_USER")"
# The members' folders: .state/ha, unless the Postgres user cannot reach the
# clone (one under a private home such as /root): then beside its home.
if [[ -z "${HA_DIR:-}" ]]; then
  HA_DIR="$STATE_DIR/ha"
  if ((EUID == 0)) && id "$HA_USER" >/dev/null 2>&1 \
      && ! setpriv --reuid="$HA_USER" --regid="$HA_USER" --init-groups -- test -x "$REPO_ROOT" 2>/dev/null; then
    HA_DIR="$(getent passwd "$HA_USER" | cut -d: -f6)/coupons-ha-$(printf '%s' "$REPO_ROOT" | md5sum | cut -c1-8)"
  fi
fi
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
# Failure detection, sized in README "Operations": the leader key lives TTL
# seconds; Patroni's loop runs every LOOP_WAIT; a store or Postgres call is
# retried for RETRY_TIMEOUT (TTL >= LOOP_WAIT + 2 * RETRY_TIMEOUT).
HA_TTL="${HA_TTL:-10}"
HA_LOOP_WAIT="${HA_LOOP_WAIT:-2}"
HA_RETRY_TIMEOUT="${HA_RETRY_TIMEOUT:-4}"
# A replica whose replay is more than this much WAL behind the leader leaves
# the read port (Patroni's `/replica?lag=`); with none left, reads go to the leader.
HA_READ_MAX_LAG="${HA_READ_MAX_LAG:-16MB}"
ETCD_DIR="$HA_DIR/etcd"
ARCHIVE_DIR="$HA_DIR/archive"
HAPROXY_CFG="$HA_DIR/haproxy.cfg"
HAPROXY_PID="$HA_DIR/haproxy.pid"

members() { seq 1 "$HA_MEMBERS"; }
member_dir() { echo "$HA_DIR/pg$1"; }
member_port() { echo $((HA_PG_BASE_PORT + $1)); }
rest_port() { echo $((HA_REST_BASE_PORT + $1 - 1)); }
check_member() {
  [[ "${1:-}" =~ ^(pg)?[0-9]+$ ]] || fail "name a member: pg1..pg$HA_MEMBERS (or 1..$HA_MEMBERS)"
  local n=${1#pg}
  ((n >= 1 && n <= HA_MEMBERS)) || fail "no member $1 (pg1..pg$HA_MEMBERS)"
  echo "$n"
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
# Runs a command as the Postgres user, in the foreground.
as_pg() {
  if ((EUID == 0)); then setpriv --reuid="$HA_USER" --regid="$HA_USER" --init-groups -- "$@"; else "$@"; fi
}

etcd_healthy() { curl -sf --max-time 2 "http://$HA_HOST:$HA_ETCD_PORT/health" | grep -q '"health":"true"'; }

start_etcd() {
  if etcd_healthy; then say "ha: etcd: reusing $HA_HOST:$HA_ETCD_PORT"; return 0; fi
  if pid_alive "$ETCD_DIR/etcd.pid"; then
    say "ha: etcd: pid $(cat "$ETCD_DIR/etcd.pid") is starting; waiting for it"
  else
    mkdir -p "$ETCD_DIR"
    local peer="http://$HA_HOST:$((HA_ETCD_PORT + 1))" client="http://$HA_HOST:$HA_ETCD_PORT"
    (exec setsid etcd --name ha-etcd --data-dir "$ETCD_DIR/data" \
      --listen-client-urls "$client" --advertise-client-urls "$client" \
      --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
      --initial-cluster "ha-etcd=$peer" --initial-cluster-token "$HA_SCOPE" --initial-cluster-state new \
      --heartbeat-interval 100 --election-timeout 1000 --enable-v2=true --log-outputs stderr) \
      >>"$ETCD_DIR/etcd.log" 2>&1 </dev/null &
    echo $! >"$ETCD_DIR/etcd.pid"
  fi
  local deadline=$((SECONDS + 30))
  until etcd_healthy; do
    pid_alive "$ETCD_DIR/etcd.pid" || fail "etcd exited during start-up: see $ETCD_DIR/etcd.log"
    ((SECONDS < deadline)) || fail "etcd did not serve within 30s: see $ETCD_DIR/etcd.log"
    sleep 0.2
  done
  say "ha: etcd: serving on $HA_HOST:$HA_ETCD_PORT; log at $ETCD_DIR/etcd.log"
}

# Patroni's configuration of member N. The `bootstrap.dcs` part seeds the
# cluster-wide (dynamic) configuration in etcd on the first start only;
# `ha.sh set-config` changes it later.
write_member_config() {
  local n=$1 dir; dir="$(member_dir "$n")"
  mkdir -p "$dir/log" "$ARCHIVE_DIR" "$HA_DIR/run"
  cat >"$dir/patroni.yml" <<YAML
# Written by infra/local/ha.sh on every start of the member.
scope: $HA_SCOPE
namespace: /coupons/
name: pg$n
log:
  dir: $dir/log
  level: INFO
  file_num: 2
  file_size: 26214400
restapi:
  listen: $HA_HOST:$(rest_port "$n")
  connect_address: $HA_HOST:$(rest_port "$n")
# etcd's v2 API: Patroni 3.0.2's etcd3 client keeps a watch-fed cache that
# was seen to go stale after a failover here (every write of the /sync key
# then failed its compare-and-set, "Synchronous replication key updated by
# someone else", and the cluster stayed without a synchronous standby); the
# v2 client reads the cluster from etcd on every loop.
etcd:
  hosts: $HA_HOST:$HA_ETCD_PORT
bootstrap:
  dcs:
    ttl: $HA_TTL
    loop_wait: $HA_LOOP_WAIT
    retry_timeout: $HA_RETRY_TIMEOUT
    # A crashed leader's Postgres is not restarted in place: the
    # synchronous standby takes over at once, which is what losing the
    # machine looks like too.
    primary_start_timeout: 0
    maximum_lag_on_failover: 1048576
    # A commit returns once a standby has flushed it, and only a standby
    # that was synchronous may be promoted: no acknowledged commit is lost.
    # Not strict: with every standby gone the leader goes on alone (and no
    # automatic failover is possible until a standby caught up again).
    synchronous_mode: true
    synchronous_mode_strict: false
    synchronous_node_count: 1
    postgresql:
      use_pg_rewind: true
      use_slots: true
      remove_data_directory_on_rewind_failure: true
      parameters:
        max_connections: 400
        shared_buffers: 64MB
        wal_level: replica
        hot_standby: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 512MB
        synchronous_commit: "on"
        # Backups: every finished WAL segment is copied to one archive that
        # whichever member leads writes to (README "Backups").
        archive_mode: "on"
        archive_command: "test ! -f $ARCHIVE_DIR/%f && cp %p $ARCHIVE_DIR/%f"
        archive_timeout: 60
        wal_log_hints: "on"
  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
    - data-checksums
postgresql:
  listen: $HA_HOST:$(member_port "$n")
  connect_address: $HA_HOST:$(member_port "$n")
  data_dir: $dir/data
  bin_dir: $PG_BIN
  pgpass: $dir/pgpass
  authentication:
    superuser:
      username: postgres
      password: postgres
    replication:
      username: replicator
      password: replicator
    rewind:
      username: postgres
      password: postgres
  parameters:
    unix_socket_directories: $HA_DIR/run
    logging_collector: "on"
    log_directory: $dir/log
    log_filename: postgresql.log
    log_line_prefix: "%m [%p] %q%u@%d "
  pg_hba:
    - local all all trust
    - host all postgres 127.0.0.1/32 trust
    - host replication replicator 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 md5
YAML
  chown -R "$HA_USER:$HA_GROUP" "$dir"
}

member_running() { pid_alive "$(member_dir "$1")/patroni.pid"; }

start_member() {
  local n=$1 dir; dir="$(member_dir "$n")"
  if member_running "$n"; then return 0; fi
  mkdir -p "$dir"
  write_member_config "$n"
  chown "$HA_USER:$HA_GROUP" "$ARCHIVE_DIR" "$HA_DIR/run"
  local run=(env HOME="$dir" PATH="$PG_BIN:$PATH" patroni "$dir/patroni.yml")
  ((EUID != 0)) || run=(setpriv --reuid="$HA_USER" --regid="$HA_USER" --init-groups -- "${run[@]}")
  # exec all the way down: the pid written is Patroni's.
  (exec setsid "${run[@]}") >>"$dir/log/stdout.log" 2>&1 </dev/null &
  echo $! >"$dir/patroni.pid"
}

# The cluster as Patroni's REST API of any running member sees it (JSON).
cluster_json() {
  local n
  for n in $(members); do
    curl -sf --max-time 2 "http://$HA_HOST:$(rest_port "$n")/cluster" 2>/dev/null && return 0
  done
  return 1
}

leader() { cluster_json | jq -er '.members[] | select(.role == "leader") | .name'; }
sync_standby() { cluster_json | jq -er '[.members[] | select(.role == "sync_standby") | .name][0] // empty'; }

# True when the cluster is whole: a leader, HA_MEMBERS members running on the
# leader's timeline, a synchronous standby, and the write port on the leader.
healthy() {
  local json
  json="$(cluster_json)" || return 1
  jq -e --argjson want "$HA_MEMBERS" '
      ([.members[] | select(.role == "leader")] | length) == 1
      and ([.members[] | select(.role == "sync_standby")] | length) >= 1
      and (.members | length) == $want
      and ([.members[] | select(.state == "running" or .state == "streaming")] | length) == $want
      and ([.members[] | select(.role == "leader") | .timeline][0]) as $tl
      | ([.members[] | select(.timeline != $tl)] | length) == 0' <<<"$json" >/dev/null || return 1
  # HAProxy's checks run every second: the write port must be the leader.
  [[ "$(psql -h "$HA_HOST" -p "$HA_WRITE_PORT" -U postgres -d postgres -tAXc 'SELECT pg_is_in_recovery()' 2>/dev/null)" == f ]]
}

wait_healthy() {
  local seconds=${1:-120} deadline=$((SECONDS + ${1:-120}))
  until healthy; do
    if ((SECONDS >= deadline)); then
      as_status >&2 || true
      fail "the HA cluster was not whole (leader, sync standby, $HA_MEMBERS members on one timeline) within ${seconds}s; logs in $HA_DIR/pg*/log"
    fi
    sleep 0.2
  done
}

as_status() {
  etcd_healthy || { echo "etcd is not serving on $HA_HOST:$HA_ETCD_PORT (make ha-up starts it)"; return 1; }
  timeout 15 patronictl -c "$(member_dir 1)/patroni.yml" list 2>&1
}

write_haproxy_config() {
  local n servers=""
  for n in $(members); do
    servers+="  server pg$n $HA_HOST:$(member_port "$n") check port $(rest_port "$n")"$'\n'
  done
  cat >"$HAPROXY_CFG" <<CFG
# Written by infra/local/ha.sh. TCP proxying; Patroni's REST API answers 200
# on /primary for the leader only and on /replica for running replicas.
global
  maxconn 2000
  log stderr format short local0 notice

defaults
  mode tcp
  log global
  timeout connect 2s
  timeout client 30m
  timeout server 30m
  timeout check 1s
  # A check every 500 ms, down after 2 failures, up after 1: a new leader
  # takes writes about a second after Patroni promoted it. Sessions to a
  # server marked down are cut, so no client keeps talking to a demoted
  # leader.
  default-server inter 500ms fastinter 250ms downinter 500ms fall 2 rise 1 on-marked-down shutdown-sessions

listen writes
  bind $HA_HOST:$HA_WRITE_PORT
  option httpchk OPTIONS /primary
  http-check expect status 200
$servers
frontend reads
  bind $HA_HOST:$HA_READ_PORT
  use_backend replicas if { nbsrv(replicas) gt 0 }
  default_backend leader_for_reads

backend replicas
  balance leastconn
  option httpchk OPTIONS /replica?lag=$HA_READ_MAX_LAG
  http-check expect status 200
$servers
backend leader_for_reads
  option httpchk OPTIONS /primary
  http-check expect status 200
$servers
CFG
}

start_haproxy() {
  if pid_alive "$HAPROXY_PID"; then say "ha: haproxy: reusing pid $(cat "$HAPROXY_PID")"; return 0; fi
  write_haproxy_config
  haproxy -c -q -f "$HAPROXY_CFG" || fail "haproxy refused $HAPROXY_CFG"
  (exec setsid haproxy -W -db -f "$HAPROXY_CFG") >>"$HA_DIR/haproxy.log" 2>&1 </dev/null &
  echo $! >"$HAPROXY_PID"
  wait_for "haproxy on $HA_HOST:$HA_WRITE_PORT" 15 port_open "$HA_HOST" "$HA_WRITE_PORT"
  say "ha: haproxy: writes on $HA_HOST:$HA_WRITE_PORT, reads on $HA_HOST:$HA_READ_PORT; log at $HA_DIR/haproxy.log"
}

stop_pidfile() {
  local file=$1 what=$2 signal=${3:-TERM} seconds=${4:-60}
  pid_alive "$file" || { rm -f "$file"; return 0; }
  local pid; pid="$(cat "$file")"
  kill "-$signal" "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + seconds))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      say "ha: $what (pid $pid) did not stop within ${seconds}s; killing it"
      kill -9 "$pid" 2>/dev/null || true
    fi
    sleep 0.1
  done
  rm -f "$file"
}

# The postmaster of member N (first line of postmaster.pid), if running.
postmaster_pid() {
  local file; file="$(member_dir "$1")/data/postmaster.pid"
  [[ -f "$file" ]] || return 1
  local pid; pid="$(head -n 1 "$file")"
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Every process of member N: Patroni, its postmaster and the postmaster's children.
member_pids() {
  local n=$1 pm
  [[ -f "$(member_dir "$n")/patroni.pid" ]] && cat "$(member_dir "$n")/patroni.pid"
  if pm="$(postmaster_pid "$n")"; then echo "$pm"; pgrep -P "$pm" || true; fi
}

cmd=${1:-}
case "$cmd" in
  up)
    mkdir -p "$HA_DIR"
    started=$SECONDS
    command -v patroni >/dev/null 2>&1 || fail "patroni is not installed: run 'make setup'"
    [[ -x "$PG_BIN/postgres" ]] || fail "no Postgres binaries in $PG_BIN: run 'make setup'"
    start_etcd
    for n in $(members); do
      if member_running "$n"; then say "ha: pg$n: reusing Patroni pid $(cat "$(member_dir "$n")/patroni.pid")"
      else say "ha: pg$n: starting Patroni (Postgres on $HA_HOST:$(member_port "$n"), REST on $HA_HOST:$(rest_port "$n"))"; start_member "$n"; fi
    done
    start_haproxy
    wait_healthy 180
    # The application's default database, as up.sh creates it on the single server.
    db="$(printf '%s' "${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/coupons}" | sed -E 's#.*/([^/?]+)(\?.*)?$#\1#')"
    if ! psql -h "$HA_HOST" -p "$HA_WRITE_PORT" -U postgres -d postgres -tAXc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
      psql -h "$HA_HOST" -p "$HA_WRITE_PORT" -U postgres -d postgres -qXc "CREATE DATABASE \"$db\"" && say "ha: created database $db"
    fi
    say "ha: serving after $((SECONDS - started))s: leader $(leader), synchronous standby $(sync_standby); DATABASE_URL=postgres://postgres@$HA_HOST:$HA_WRITE_PORT/$db DATABASE_READ_URL=postgres://postgres@$HA_HOST:$HA_READ_PORT/$db"
    ;;
  down)
    stop_pidfile "$HAPROXY_PID" haproxy TERM 10
    # The replicas first, so that stopping the leader starts no failover.
    lead="$(leader 2>/dev/null || true)"
    for n in $(members); do [[ "pg$n" == "$lead" ]] || stop_pidfile "$(member_dir "$n")/patroni.pid" "pg$n" TERM 60 & done
    wait
    [[ -z "$lead" ]] || stop_pidfile "$(member_dir "${lead#pg}")/patroni.pid" "$lead" TERM 60
    stop_pidfile "$ETCD_DIR/etcd.pid" etcd TERM 20
    say "ha: down (state kept in $HA_DIR)"
    ;;
  status)
    as_status
    ;;
  wait-healthy)
    started=$SECONDS
    wait_healthy "${2:-120}"
    say "ha: whole after $((SECONDS - started))s: leader $(leader), synchronous standby $(sync_standby)"
    ;;
  leader)
    leader
    ;;
  sync-standby)
    sync_standby
    ;;
  kill-postmaster)
    n="$(check_member "${2:-}")"
    pm="$(postmaster_pid "$n")" || fail "pg$n has no running postmaster"
    kill -9 "$pm"
    say "ha: pg$n: postmaster $pm killed"
    ;;
  kill)
    n="$(check_member "${2:-}")"
    pids="$(member_pids "$n")"
    [[ -n "$pids" ]] || fail "pg$n is not running"
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    rm -f "$(member_dir "$n")/patroni.pid"
    say "ha: pg$n: Patroni and Postgres killed"
    ;;
  start)
    n="$(check_member "${2:-}")"
    # A killed member's orphaned backends may still hold its port for a moment.
    start_member "$n"
    say "ha: pg$n: Patroni started"
    ;;
  freeze)
    n="$(check_member "${2:-}")"; seconds="${3:-15}"
    pids="$(member_pids "$n")"
    [[ -n "$pids" ]] || fail "pg$n is not running"
    # Whatever happens meanwhile, the member goes on afterwards.
    # shellcheck disable=SC2064
    trap "kill -CONT $(echo $pids) 2>/dev/null || true" EXIT
    # shellcheck disable=SC2086
    kill -STOP $pids
    say "stopped pg$n"
    sleep "$seconds"
    # shellcheck disable=SC2086
    kill -CONT $pids
    say "froze pg$n for ${seconds}s"
    ;;
  stop-receivers)
    pids="$(pgrep -f 'postgres: .*walreceiver' || true)"
    [[ -n "$pids" ]] || fail "no WAL receiver runs"
    # shellcheck disable=SC2086
    kill -STOP $pids
    say "ha: WAL receivers stopped: $(echo $pids)"
    ;;
  kill-receivers)
    # SIGKILL also ends a stopped process; what its socket still held is lost.
    pids="$(pgrep -f 'postgres: .*walreceiver' || true)"
    # shellcheck disable=SC2086
    [[ -z "$pids" ]] || kill -9 $pids
    say "ha: WAL receivers killed: $(echo $pids)"
    ;;
  switchover)
    lead="$(leader)" || fail "no leader to switch over from"
    candidate="${2:-$(sync_standby)}"
    [[ -n "$candidate" ]] || fail "no synchronous standby to switch over to"
    [[ "$candidate" == pg* ]] || candidate="pg$candidate"
    patronictl -c "$(member_dir "${lead#pg}")/patroni.yml" switchover "$HA_SCOPE" \
      --leader "$lead" --candidate "$candidate" --force >&2
    # Until the candidate leads.
    wait_for "$candidate to lead" 60 bash -c "[[ \"\$('$0' leader 2>/dev/null)\" == '$candidate' ]]"
    say "ha: switched over from $lead to $candidate"
    ;;
  set-config)
    [[ -n "${2:-}" ]] || fail "usage: $0 set-config JSON"
    lead="$(leader)" || fail "no leader"
    curl -sf --max-time 5 -X PATCH -H 'Content-Type: application/json' -d "$2" \
      "http://$HA_HOST:$(rest_port "${lead#pg}")/config" >/dev/null || fail "Patroni refused the configuration $2"
    # The leader applies it on its next loop; for synchronous_mode, until
    # its synchronous_standby_names says so.
    case "$(jq -r '.synchronous_mode | tostring' <<<"$2")" in
      false) wait_for "the leader to replicate asynchronously" 30 \
        bash -c "[[ -z \"\$(psql -h $HA_HOST -p $HA_WRITE_PORT -U postgres -d postgres -tAXc 'SHOW synchronous_standby_names')\" ]]" ;;
      true) wait_for "the leader to replicate synchronously" 30 \
        bash -c "[[ -n \"\$(psql -h $HA_HOST -p $HA_WRITE_PORT -U postgres -d postgres -tAXc 'SHOW synchronous_standby_names')\" ]]" ;;
    esac
    say "ha: configuration patched: $2"
    ;;
  dir)
    echo "$HA_DIR"
    ;;
  backup)
    # A base backup from the synchronous standby (no load on the leader):
    # plain format with the WAL it needs and a manifest, then verified.
    src="$(sync_standby)" || fail "no synchronous standby to back up from"
    dest="$HA_DIR/backups/$(date -u +%Y%m%dT%H%M%SZ)"
    mkdir -p "$HA_DIR/backups"; chown "$HA_USER:$HA_GROUP" "$HA_DIR/backups"
    started=$SECONDS
    as_pg "$PG_BIN/pg_basebackup" -h "$HA_HOST" -p "$(member_port "${src#pg}")" -U replicator \
      -D "$dest" -X stream -c fast --checkpoint=fast 2>&1 | tail -n 5 >&2 || true
    [[ -f "$dest/backup_manifest" ]] || fail "pg_basebackup from $src failed"
    as_pg "$PG_BIN/pg_verifybackup" -q "$dest" || fail "pg_verifybackup found $dest damaged"
    say "ha: base backup of $src in $dest ($(du -sh "$dest" | cut -f1), $((SECONDS - started))s), verified"
    ;;
  restore)
    # ha.sh restore [BACKUP_DIR] [TARGET_TIME]: a copy of a base backup
    # (default: the newest) replaying the archive up to TARGET_TIME (default:
    # all of it), then promoted, on 127.0.0.1:$HA_RESTORE_PORT (5450).
    backup="${2:-$(ls -d "$HA_DIR"/backups/*/ 2>/dev/null | sort | tail -n 1)}"
    [[ -n "$backup" && -f "$backup/backup_manifest" ]] || fail "no base backup: run '$0 backup' first"
    port="${HA_RESTORE_PORT:-5450}"; dir="$HA_DIR/restore"
    if [[ -f "$dir/postmaster.pid" ]]; then as_pg "$PG_BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 || true; fi
    rm -rf "$dir"; cp -a "$backup" "$dir"; rm -f "$dir/backup_manifest"
    {
      echo "# ha.sh restore: point-in-time recovery from $backup"
      echo "restore_command = 'cp $ARCHIVE_DIR/%f %p'"
      [[ -z "${3:-}" ]] || echo "recovery_target_time = '$3'"
      echo "recovery_target_action = 'promote'"
      echo "archive_mode = off"
      echo "primary_conninfo = ''"
      echo "port = $port"
      echo "listen_addresses = '$HA_HOST'"
      echo "unix_socket_directories = '$HA_DIR/run'"
      echo "logging_collector = off"
    } >>"$dir/postgresql.auto.conf"
    rm -f "$dir/standby.signal"; touch "$dir/recovery.signal"; chown -R "$HA_USER:$HA_GROUP" "$dir"
    # The leader closes its current segment so the archive holds every commit so far.
    seg="$(psql -h "$HA_HOST" -p "$HA_WRITE_PORT" -U postgres -d postgres -tAXc 'SELECT pg_walfile_name(pg_switch_wal())')"
    wait_for "the archive to take $seg" 60 test -f "$ARCHIVE_DIR/$seg"
    started=$SECONDS
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/restore.log" -w -t 120 start >/dev/null \
      || fail "the restored server did not start: see $dir/restore.log"
    wait_for "the restore to finish recovery" 120 bash -c \
      "[[ \"\$(psql -h $HA_HOST -p $port -U postgres -d postgres -tAXc 'SELECT pg_is_in_recovery()')\" == f ]]"
    say "ha: restored $backup${3:+ to $3} on $HA_HOST:$port after $((SECONDS - started))s (stop it with '$0 restore-stop')"
    ;;
  restore-stop)
    dir="$HA_DIR/restore"
    [[ ! -f "$dir/postmaster.pid" ]] || as_pg "$PG_BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
    say "ha: restored server stopped"
    ;;
  url)
    echo "postgres://postgres@$HA_HOST:$HA_WRITE_PORT/${2:-coupons}"
    ;;
  *)
    fail "usage: $0 up|down|status|wait-healthy [S]|leader|sync-standby|kill-postmaster M|kill M|start M|freeze M S|stop-receivers|kill-receivers|switchover [M]|set-config JSON|url [DB]|dir|backup|restore [DIR] [TIME]|restore-stop"
    ;;
esac
