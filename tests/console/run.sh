#!/usr/bin/env bash
# The web console in a real browser (issue #18): Debian's chromium, headless,
# driven by playwright-core (tests/console/console.mjs). It signs in, releases
# a batch and watches the pool grow to its size, blacklists a user (and lifts
# another's entry), reads the analysts' charts and downloads, and the
# operators' live numbers, and fails when a number the page shows differs
# from Postgres (psql) or from /metrics. Screenshots of each page go to
# docs/console/ (CONSOLE_SCREENSHOTS to put them elsewhere).
# Starts `couponctl run` on a free port with its own database and topic
# prefix, both tokens set; stops it and drops the database at the end.
# Closes with 'console: N passed, M failed'; exits non-zero on any failure.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
TOOLS="$ROOT/.state/console"
PG_ADMIN="${CONSOLE_PG_ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}"
summary() { echo "console: $1 passed, $2 failed"; }

echo "== console: tools (pinned, cached in .state/console)"
if ! tests/console/tools.sh; then summary 0 1; exit 1; fi
cargo build -q --bin couponctl || { summary 0 1; exit 1; }

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
run_id="console_$$_$RANDOM"
database="$run_id"
export DATABASE_URL="${PG_ADMIN%/*}/$database"
export COUPON_TOPIC_PREFIX="$run_id"
export COUPON_API_TOKEN="console-api-$RANDOM$RANDOM"
export COUPON_ADMIN_TOKEN="console-admin-$RANDOM$RANDOM"
export HTTP_ADDR="127.0.0.1:$port"
export FLOOD_LIMIT=1000000 ADDRESS_LIMIT=1000000
# Short holds, so that the funnel shows expirations within the run.
export HOLD_TTL="${CONSOLE_HOLD_TTL:-5s}" REPLY_TIMEOUT=10s REQUEST_TIMEOUT=30s
export METRICS_INTERVAL=1s
export RUST_LOG="${RUST_LOG:-warn}"
export CONSOLE_BASE="http://$HTTP_ADDR"
export CONSOLE_SCREENSHOTS="${CONSOLE_SCREENSHOTS:-$ROOT/docs/console}"
export CONSOLE_TOOLS="$TOOLS"
export CONSOLE_CATEGORY="Console-$RANDOM"
log="$TOOLS/server.log"
server=""

cleanup() {
  if [[ -n "$server" ]]; then
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
  fi
  psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null 2>&1
  # The run's topics ($run_id.*) stay on the broker, as in tests/contract/run.sh.
}
trap cleanup EXIT

psql -q "$PG_ADMIN" -c "CREATE DATABASE \"$database\"" >/dev/null || { summary 0 1; exit 1; }
echo "== console: couponctl run on $CONSOLE_BASE (database $database, topics $run_id.*)"
target/debug/couponctl run >"$log" 2>&1 &
server=$!
healthy=""
for _ in $(seq 1 120); do
  if curl -fsS "$CONSOLE_BASE/healthz" >/dev/null 2>&1; then healthy=1; break; fi
  kill -0 "$server" 2>/dev/null || break
  sleep 0.5
done
if [[ -z "$healthy" ]]; then
  tail -n 30 "$log"
  summary 0 1
  exit 1
fi

mkdir -p "$CONSOLE_SCREENSHOTS"
node tests/console/console.mjs | tee "$TOOLS/browser.log"
counts="$(sed -n 's/^browser: \([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$TOOLS/browser.log" | tail -n 1)"
read -r passed failed <<<"${counts:-0 1}"

echo "== console: the monitoring files (infra/monitoring) against this server's /metrics"
if infra/monitoring/check.sh "$CONSOLE_BASE/metrics"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
fi
if ! kill -0 "$server" 2>/dev/null; then
  echo "FAILED: the server did not stay up"
  tail -n 30 "$log"
  failed=$((failed + 1))
fi
summary "$passed" "$failed"
((failed == 0))
