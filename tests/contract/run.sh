#!/usr/bin/env bash
# The storefront's contract against a live server (issue #19):
#   1. buf breaking: schemas/coupons/v1 against the released coupons.v1;
#   2. schemathesis: every check, stateful phase included, on the document
#      the server serves (CONTRACT_SEED: fixed for CI, `random` for make fuzz;
#      CONTRACT_EXAMPLES per operation);
#   3. a TypeScript client generated from that document (openapi-typescript +
#      openapi-fetch), compiled and run: a claim, a purchase, each error status.
# Starts `couponctl run` on a free port with its own database and topic
# prefix, both tokens set; stops it and drops the database at the end.
# Closes with 'contract: N passed, M failed'; exits non-zero on any failure.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
TOOLS="$ROOT/.state/contract"
SEED="${CONTRACT_SEED:-19}"
EXAMPLES="${CONTRACT_EXAMPLES:-25}"
PG_ADMIN="${CONTRACT_PG_ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}"
passed=0
failed=0
failures=()
step() { echo "== contract: $*"; }
ok() { passed=$((passed + 1)); echo "ok: $1"; }
bad() { failed=$((failed + 1)); failures+=("$1"); echo "FAILED: $1"; }

step "tools (pinned, cached in .state/contract)"
if ! tests/contract/tools.sh; then
  echo "contract: 0 passed, 1 failed"
  exit 1
fi

step "buf breaking (schemas/coupons/v1 against the released coupons.v1 in schemas/compat/v1)"
if (cd schemas && "$TOOLS/bin/buf" breaking . --against compat/v1); then
  ok "buf breaking"
else
  bad "buf breaking"
fi

cargo build -q --bin couponctl || { echo "contract: $passed passed, $((failed + 1)) failed"; exit 1; }

# shellcheck source=tests/live_server.sh
source tests/live_server.sh
live_server_env contract
export HOLD_TTL="${CONTRACT_HOLD_TTL:-60s}" REPLY_TIMEOUT=10s REQUEST_TIMEOUT=15s
log="$TOOLS/server.log"
trap live_server_stop EXIT

step "couponctl run on $base (database $database, topics $run_id.*)"
live_server_start "$log"
case $? in
  0) ;;
  2) bad "create database"; echo "contract: $passed passed, $failed failed"; exit 1 ;;
  *) bad "server start"; echo "contract: $passed passed, $failed failed"; exit 1 ;;
esac
curl -fsS "$base/api/v1/openapi.json" -o "$TOOLS/openapi.json" || bad "fetch the document"

# Coupons to claim (the fuzzers also release some of their own).
curl -fsS -XPOST "$base/api/v1/coupon" -H "authorization: Bearer $COUPON_ADMIN_TOKEN" \
  -H 'content-type: application/json' -d '{"id":"contract","category":"Electronics","count":2000}' >/dev/null \
  || bad "release coupons"

step "schemathesis (seed $SEED, $EXAMPLES examples per operation)"
seed_args=(--seed "$SEED" --generation-deterministic)
[[ "$SEED" == random ]] && seed_args=()
if (cd tests/contract && PYTHONPATH="$ROOT/tests/contract" SCHEMATHESIS_HOOKS=hooks \
    "$TOOLS/venv/bin/schemathesis" --config-file schemathesis.toml run "$base/api/v1/openapi.json" \
      --checks all --max-examples "$EXAMPLES" "${seed_args[@]}" --workers 1 \
      --request-timeout 20 --max-time "${CONTRACT_MAX_TIME:-100}" \
      --report junit --report-dir "$TOOLS/report" 2>&1); then
  ok "schemathesis"
else
  bad "schemathesis"
fi

step "TypeScript client generated from the document"
export CONTRACT_BLACKLISTED_USER="ts-blacklisted-$run_id"
target/debug/couponctl blacklist add "$CONTRACT_BLACKLISTED_USER" --reason contract >/dev/null 2>&1 \
  || bad "blacklist a user for the client's 403"
if (cd tests/contract/ts && npx --no-install openapi-typescript "$TOOLS/openapi.json" -o src/generated/api.d.ts >/dev/null \
    && npx --no-install tsc -p tsconfig.json \
    && CONTRACT_BASE="$base" node dist/main.js); then
  ok "TypeScript client"
else
  bad "TypeScript client"
fi

if ! kill -0 "$server" 2>/dev/null; then
  bad "the server stayed up"
  tail -n 30 "$log"
fi
for f in "${failures[@]}"; do echo "failed: $f"; done
echo "contract: $passed passed, $failed failed"
((failed == 0))
