#!/usr/bin/env bash
# Installs the console test's pinned tool into .state/console/ (project-local,
# cached: a rerun finds it and downloads nothing): playwright-core from the
# npm registry, exactly as tests/console/package-lock.json pins it. The
# browser is Debian's chromium (infra/local/setup.sh installs it); Playwright's
# own browser download is never used.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TOOLS="$ROOT/.state/console"
mkdir -p "$TOOLS"
if [[ ! -f "$TOOLS/node_modules/playwright-core/package.json" ]] \
    || ! cmp -s "$ROOT/tests/console/package-lock.json" "$TOOLS/package-lock.json"; then
  echo "console tools: installing playwright-core (npm registry, package-lock.json)" >&2
  cp "$ROOT/tests/console/package.json" "$ROOT/tests/console/package-lock.json" "$TOOLS/"
  (cd "$TOOLS" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
fi
command -v chromium >/dev/null 2>&1 || { echo "console tools: Debian's chromium is missing (make setup installs it)" >&2; exit 1; }
