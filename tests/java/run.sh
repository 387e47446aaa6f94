#!/usr/bin/env bash
# The storefront's Kafka path as a Java team uses it (issue 30): the example
# in examples/java-storefront (Maven: kafka-clients, protobuf-java, classes
# generated from schemas/ at build time) is built and run against a live
# server, and what it prints is checked, as is Postgres and the gateway:
#   1. JAVA_USERS users claim straight on the claims topic with
#      JAVA_COUPONS coupons released: each gets exactly one decision, the
#      granted ones a code, the rest SOLD_OUT; a repeat of one request id
#      gets the same decision; the purchase is REDEEMED; a claim without user
#      id is answered INVALID and one without envelope is dead-lettered;
#   2. Postgres recorded those decisions and the redemption;
#   3. the same users claim through the gateway (HTTP): the holders get their
#      coupon again, the buyer 429, the others 404; and every claim of each
#      user, the storefront's and the gateway's, sits on one partition, the
#      one Kafka's murmur2 picks (tests/java/CheckPartitions.java).
# Starts `couponctl run` on a free port with its own database and topic
# prefix (tests/live_server.sh); stops it and drops the database at the end.
# Maven reuses ~/.m2 (`make setup` fetched what the example needs).
# Closes with 'java: N passed, M failed'; exits non-zero on any failure.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
STATE="$ROOT/.state/java"
EXAMPLE="$ROOT/examples/java-storefront"
PG_ADMIN="${JAVA_PG_ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}"
USERS="${JAVA_USERS:-12}"
COUPONS="${JAVA_COUPONS:-10}"
mkdir -p "$STATE"
passed=0
failed=0
failures=()
step() { echo "== java: $*"; }
ok() { passed=$((passed + 1)); echo "ok: $1"; }
bad() { failed=$((failed + 1)); failures+=("$1"); echo "FAILED: $1"; }
finish() {
  for f in "${failures[@]}"; do echo "failed: $f"; done
  echo "java: $passed passed, $failed failed"
  ((failed == 0))
  exit
}
# `ok` when the storefront's output has a line matching the pattern.
printed() {
  if grep -Eq -- "$2" "$STATE/storefront.log"; then ok "$1"; else bad "$1 (no line matching '$2')"; fi
}

step "build the example (mvn; protobuf classes generated from schemas/coupons/v1)"
if mvn -B -q -f "$EXAMPLE/pom.xml" compile dependency:build-classpath \
    -Dmdep.outputFile="$EXAMPLE/target/classpath.txt" >"$STATE/mvn.log" 2>&1; then
  ok "mvn compile"
else
  tail -n 30 "$STATE/mvn.log"
  bad "mvn compile"
  finish
fi
classpath="$EXAMPLE/target/classes:$(cat "$EXAMPLE/target/classpath.txt")"

cargo build -q --bin couponctl || { bad "cargo build"; finish; }

# shellcheck source=tests/live_server.sh
source tests/live_server.sh
live_server_env java
export HOLD_TTL=120s REPLY_TIMEOUT=10s REQUEST_TIMEOUT=15s
brokers="${KAFKA_BROKERS:-127.0.0.1:9092}"
users="java-$RANDOM-user-"
trap live_server_stop EXIT

step "couponctl run on $base (database $database, topics $run_id.*)"
if ! live_server_start "$STATE/server.log"; then bad "server start"; finish; fi

step "release $COUPONS coupons through the admin API"
if curl -fsS -XPOST "$base/api/v1/coupon" -H "authorization: Bearer $COUPON_ADMIN_TOKEN" \
    -H 'content-type: application/json' -d "{\"id\":\"java\",\"category\":\"Books\",\"count\":$COUPONS}" >/dev/null; then
  ok "release"
else
  bad "release"
  finish
fi
available() { psql -qtA "$DATABASE_URL" -c "SELECT count(*) FROM coupons WHERE status = 'available'"; }
deadline=$((SECONDS + 60))
until [[ "$(available)" == "$COUPONS" ]]; do
  if ((SECONDS >= deadline)); then bad "the released coupons were not projected within 60 s"; finish; fi
  sleep 0.2
done

step "the Java storefront: $USERS claims straight to $run_id.claims"
java -cp "$classpath" storefront.Storefront --brokers "$brokers" --prefix "$run_id" \
  --users "$USERS" --user-prefix "$users" --timeout 60 | tee "$STATE/storefront.log"
if ((PIPESTATUS[0] == 0)); then ok "the storefront's own checks"; else bad "the storefront's own checks"; fi
printed "every claim answered exactly once" \
  "^decisions: $USERS claims, each answered exactly once: $COUPONS GRANTED, $((USERS - COUPONS)) SOLD_OUT$"
printed "a repeated request id gets the same decision" "^repeat: request .* published again: same decision \(GRANTED "
printed "the purchase is redeemed" "^purchase: order .*: REDEEMED$"
printed "a claim without user id is answered INVALID" "^mistake: claim without user_id: INVALID "
printed "a claim without envelope is dead-lettered" "^mistake: claim without envelope: dead letter on $run_id.dead-letter "
buyer="$(sed -n 's/^purchase: order [^ ]* of \([^ ]*\) for \([^:]*\): REDEEMED$/\1 \2/p' "$STATE/storefront.log")"
read -r buyer code <<<"${buyer:-- -}"

step "what Postgres recorded"
sql() { psql -qtA "$DATABASE_URL" -c "$1"; }
decided="$(sql "SELECT count(*) || ' ' || count(*) FILTER (WHERE outcome = 'granted') FROM claim_decisions WHERE user_id LIKE '$users%'")"
if [[ "$decided" == "$USERS $COUPONS" ]]; then ok "claim decisions stored: $decided"; else bad "claim decisions stored: '$decided', expected '$USERS $COUPONS'"; fi
redeemed="$(sql "SELECT holder_user_id || ' ' || code FROM coupons WHERE status = 'redeemed'")"
if [[ "$redeemed" == "$buyer $code" ]]; then ok "coupon $code redeemed by $buyer"; else bad "redeemed coupons: '$redeemed', expected '$buyer $code'"; fi

step "the same users claim through the gateway"
declare -A statuses=()
mismatched=0
for ((i = 0; i < USERS; i++)); do
  user="$users$i"
  answer="$(curl -sS -o "$STATE/claim.json" -w '%{http_code}' -H "authorization: Bearer $COUPON_API_TOKEN" \
    "$base/api/v1/coupon?id=$user")"
  statuses[$answer]=$((${statuses[$answer]:-0} + 1))
  if [[ "$answer" == 200 ]]; then
    held="$(sed -n 's/.*"coupon_code":"\([^"]*\)".*/\1/p' "$STATE/claim.json")"
    grep -Eq "^$user +[0-9]+ +GRANTED +$held " "$STATE/storefront.log" || mismatched=$((mismatched + 1))
  fi
done
summary="200:${statuses[200]:-0} 404:${statuses[404]:-0} 429:${statuses[429]:-0}"
if [[ "$summary" == "200:$((COUPONS - 1)) 404:$((USERS - COUPONS)) 429:1" && $mismatched == 0 ]]; then
  ok "gateway answers ($summary; each holder got the coupon the storefront was granted)"
else
  bad "gateway answers ($summary, $mismatched holders got another coupon)"
fi

step "every claim of each user on one partition, the one murmur2 picks"
if java -cp "$classpath" tests/java/CheckPartitions.java "$brokers" "$run_id.claims" "$users" \
    java-storefront "$USERS"; then
  ok "partitions"
else
  bad "partitions"
fi

if ! kill -0 "$server" 2>/dev/null; then
  bad "the server stayed up"
  tail -n 30 "$STATE/server.log"
fi
finish
