#!/usr/bin/env bash
# Stopping the broker with `make down` (a controlled shutdown) and starting it
# with `make up` keeps topics and committed offsets. Run by `make test` after
# the Rust tests, because it restarts the shared broker.
set -euo pipefail
cd "$(dirname "$0")/.."
source infra/local/common.sh

if ! kafka_running "$STATE_DIR/kafka"; then
  echo "broker restart check: skipped (the broker was not started by make up, so make down would not stop it)"
  exit 0
fi
bin=target/debug/couponctl
[[ -x $bin ]] || cargo build -q --bin couponctl
export COUPON_TOPIC_PREFIX="restart$(date +%s)" TOPIC_PARTITIONS=2 RUST_LOG=warn
db="restart_check_$(date +%s)"
psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "CREATE DATABASE \"$db\""
trap 'psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null' EXIT
export DATABASE_URL="postgres://postgres@${PG_HOST}:${PG_PORT}/${db}"

$bin issue --employee e1 --category Restart --count 2500 >/dev/null
$bin consume coupons >/dev/null 2>&1 &
consumer=$!
wait_for "the projector" 60 bash -c "psql -h $PG_HOST -p $PG_PORT -U postgres -tAc 'SELECT count(*) FROM coupons' $db | grep -qx 2500"
kill -TERM "$consumer"; wait "$consumer" || true
coupons_lag() { $bin status 2>/dev/null | awk '$1 == "coupons" && NF == 2 {print $2}'; }
lag_before="$(coupons_lag)"
[[ "$lag_before" == 0 ]] || fail "coupons group lag before the restart is '$lag_before', expected 0"

infra/local/down.sh >/dev/null
port_open "$BROKER_HOST" "$BROKER_PORT" && fail "the broker still answers after make down"
infra/local/up.sh >/dev/null

topics="$($bin topics)"
[[ "$(grep -c 'exists$' <<<"$topics")" == "$(wc -l <<<"$topics")" ]] || fail "topics after restart: $topics"
# A restarted broker loads its group coordinators (all of __consumer_offsets)
# before it answers for committed offsets: `status` says "unknown" meanwhile,
# longer the more groups the broker has seen.
deadline=$((SECONDS + 120))
until lag_after="$(coupons_lag)"; [[ -n "$lag_after" ]] || ((SECONDS >= deadline)); do sleep 1; done
[[ "$lag_after" == 0 ]] || fail "committed offsets lost in the restart: coupons group lag is '$lag_after' (expected 0)"
records="$($bin replay --topic created 2>/dev/null | wc -l)"
[[ "$records" == 3 ]] || fail "expected the 3 created events to survive the restart, found $records"
echo "broker-restart: 1 passed, 0 failed"
