# Shared settings for the local infrastructure scripts. Sourced, not run.
# shellcheck shell=bash
set -euo pipefail

TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
# Installed once per machine, outside any clone, and reused by every clone.
TANSU_ROOT="${TANSU_ROOT:-/opt/tansu-${TANSU_VERSION}}"
TANSU_BIN="${TANSU_ROOT}/bin/tansu"
STATE_DIR="${STATE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.state}"
BROKER_HOST="${BROKER_HOST:-127.0.0.1}"
BROKER_PORT="${BROKER_PORT:-9092}"
# sqlite (durable, the default) or memory (lost when the broker stops; for
# measuring what the sqlite engine costs, never for data you need).
BROKER_STORAGE="${BROKER_STORAGE:-sqlite}"
PG_HOST="${PG_HOST:-127.0.0.1}"
PG_PORT="${PG_PORT:-5432}"
REDIS_HOST="${REDIS_HOST:-127.0.0.1}"
REDIS_PORT="${REDIS_PORT:-6379}"

say() { printf '==> %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

# True when something accepts TCP connections on host:port.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_for NAME SECONDS COMMAND...: retries COMMAND until it succeeds.
wait_for() {
  local name=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then fail "$name did not become ready within ${seconds}s"; fi
    sleep 0.2
  done
}
