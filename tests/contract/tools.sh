#!/usr/bin/env bash
# Installs the pinned tools of the contract checks into .state/contract/
# (project-local, cached: a rerun finds them and downloads nothing):
#   - schemathesis (PyPI) in a Python venv,
#   - buf (Go module proxy) with GOBIN,
#   - the TypeScript client's packages (npm registry) from package-lock.json.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TOOLS="$ROOT/.state/contract"
SCHEMATHESIS_VERSION=4.32.5
BUF_VERSION=v1.75.0
mkdir -p "$TOOLS/bin"

say() { echo "contract tools: $*" >&2; }

if [[ ! -x "$TOOLS/venv/bin/schemathesis" ]] \
    || [[ "$("$TOOLS/venv/bin/python" -m pip show schemathesis 2>/dev/null | sed -n 's/^Version: //p')" != "$SCHEMATHESIS_VERSION" ]]; then
  say "installing schemathesis $SCHEMATHESIS_VERSION (PyPI)"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/python" -m pip install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

if [[ ! -x "$TOOLS/bin/buf" ]] || [[ "$("$TOOLS/bin/buf" --version 2>/dev/null)" != "${BUF_VERSION#v}" ]]; then
  say "installing buf $BUF_VERSION (Go module proxy)"
  GOBIN="$TOOLS/bin" GOFLAGS=-mod=mod go install "github.com/bufbuild/buf/cmd/buf@$BUF_VERSION"
fi

TS="$ROOT/tests/contract/ts"
if [[ ! -f "$TS/node_modules/.package-lock.json" ]] || ! cmp -s "$TS/package-lock.json" "$TS/node_modules/.lock-copy"; then
  say "installing the TypeScript client's packages (npm registry, package-lock.json)"
  (cd "$TS" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$TS/package-lock.json" "$TS/node_modules/.lock-copy"
fi
