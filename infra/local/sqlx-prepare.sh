#!/usr/bin/env bash
# Regenerates .sqlx/, the offline data of the compile-checked queries
# (`sqlx::query!`, mostly in platform/src/store/), against a fresh database migrated
# from migrations/ on the DATABASE_URL server. No sqlx-cli needed: with
# SQLX_OFFLINE_DIR set and SQLX_OFFLINE=false, the macros describe each query
# against DATABASE_URL and write its data there. The database is dropped after.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DATABASE_URL:?DATABASE_URL must name the Postgres server (make sets it)}"
server="${DATABASE_URL%/*}"
db="coupons_sqlx_$$"
psql "$DATABASE_URL" -qv ON_ERROR_STOP=1 -c "CREATE DATABASE $db" >/dev/null
trap 'psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null' EXIT
for migration in migrations/*.sql; do
    psql "$server/$db" -qv ON_ERROR_STOP=1 -f "$migration" >/dev/null
done
mkdir -p .sqlx
rm -f .sqlx/query-*.json
# The macros run when their crate compiles: make sure every file with one does.
grep -rlE --include='*.rs' 'sqlx::query(_as|_scalar)?!' domain schemas platform producers consumers src \
    | xargs touch
SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$PWD/.sqlx" DATABASE_URL="$server/$db" \
    cargo check --workspace --all-targets --quiet
echo "wrote $(ls .sqlx | wc -l) query files to .sqlx/"
