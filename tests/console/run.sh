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

# shellcheck source=tests/live_server.sh
source tests/live_server.sh
live_server_env console
# Short holds, so that the funnel shows expirations within the run.
export HOLD_TTL="${CONSOLE_HOLD_TTL:-5s}" REPLY_TIMEOUT=10s REQUEST_TIMEOUT=30s
export METRICS_INTERVAL=1s
export CONSOLE_BASE="$base"
export CONSOLE_SCREENSHOTS="${CONSOLE_SCREENSHOTS:-$ROOT/docs/console}"
export CONSOLE_TOOLS="$TOOLS"
export CONSOLE_CATEGORY="Console-$RANDOM"
log="$TOOLS/server.log"
trap live_server_stop EXIT

echo "== console: couponctl run on $CONSOLE_BASE (database $database, topics $run_id.*)"
if ! live_server_start "$log"; then
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
