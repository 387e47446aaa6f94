#!/usr/bin/env bash
# Installs what a fresh machine lacks: Postgres and Redis (Debian packages, if
# absent) and the Kafka-compatible broker tansu, built from crates.io with the
# storage engines its default build lacks. Safe to run again: it skips what is
# already there.
source "$(dirname "$0")/common.sh"

need_apt=()
command -v pg_ctlcluster >/dev/null 2>&1 || command -v pg_isready >/dev/null 2>&1 || need_apt+=(postgresql)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v perl >/dev/null 2>&1 || need_apt+=(perl)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
if ((${#need_apt[@]})); then
  say "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}"
fi

if [[ -x "$TANSU_BIN" ]] && "$TANSU_BIN" --version 2>/dev/null | grep -q " ${TANSU_VERSION}\$"; then
  say "tansu ${TANSU_VERSION} already installed at ${TANSU_BIN}"
else
  command -v cargo >/dev/null 2>&1 || fail "cargo is required to build tansu (install Rust with rustup)"
  say "building tansu ${TANSU_VERSION} into ${TANSU_ROOT} (about 10-15 minutes on 2 cores, once per machine)"
  build_dir="$(mktemp -d /var/tmp/tansu-build.XXXXXX)"
  CARGO_TARGET_DIR="$build_dir/target" cargo install tansu --version "$TANSU_VERSION" \
    --features libsql,dynostore --locked --root "$TANSU_ROOT"
  rm -rf "$build_dir"
fi
say "setup complete"
