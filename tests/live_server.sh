# Sourced by tests/contract/run.sh and tests/console/run.sh: one
# `couponctl run` on a free port with its own database and topic prefix and
# both tokens set, so a test of the live HTTP surface runs beside anything
# else on the shared services. The caller sets PG_ADMIN (the Postgres server's
# admin URL) and, before live_server_start, any other setting it wants
# (HOLD_TTL, REPLY_TIMEOUT, ...).
#
#   live_server_env NAME   picks a free port and the run's names; exports the
#                          server's environment; sets run_id, database and
#                          base (http://127.0.0.1:<port>)
#   live_server_start LOG  creates the database, starts target/debug/couponctl
#                          run (its output to LOG) and waits up to 60 s for
#                          /healthz; returns 2 when the database could not be
#                          created, 1 when the server did not come up (the
#                          log's tail printed)
#   live_server_stop       stops the server and drops the database (call it
#                          at EXIT); the run's topics ($run_id.*) stay on the
#                          broker: couponctl has no command to delete topics
#                          and the broker install has no admin tools
server=""

live_server_env() {
  local name="$1" port
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  run_id="${name}_$$_$RANDOM"
  database="$run_id"
  export DATABASE_URL="${PG_ADMIN%/*}/$database"
  export COUPON_TOPIC_PREFIX="$run_id"
  export COUPON_API_TOKEN="$name-api-$RANDOM$RANDOM"
  export COUPON_ADMIN_TOKEN="$name-admin-$RANDOM$RANDOM"
  export HTTP_ADDR="127.0.0.1:$port"
  export FLOOD_LIMIT=1000000
  export RUST_LOG="${RUST_LOG:-warn}"
  base="http://$HTTP_ADDR"
}

live_server_start() {
  local log="$1" _
  psql -q "$PG_ADMIN" -c "CREATE DATABASE \"$database\"" >/dev/null || return 2
  target/debug/couponctl run >"$log" 2>&1 &
  server=$!
  for _ in $(seq 1 120); do
    if curl -fsS "$base/healthz" >/dev/null 2>&1; then return 0; fi
    kill -0 "$server" 2>/dev/null || break
    sleep 0.5
  done
  tail -n 30 "$log"
  return 1
}

live_server_stop() {
  if [[ -n "$server" ]]; then
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
  fi
  psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null 2>&1
}
