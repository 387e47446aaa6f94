#!/usr/bin/env bash
# Checks the monitoring files of infra/monitoring:
#   - the alert rules with `promtool check rules` and their unit tests with
#     `promtool test rules` (Debian's prometheus package; make setup);
#   - the Grafana dashboard is JSON with a query on every panel;
#   - with a /metrics URL as argument (tests/console/run.sh passes its live
#     server's), every coupon_* metric the rules and the dashboard name is one
#     that /metrics really exposes.
# Prints 'monitoring: ok' or the failures; exits non-zero on any failure.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
failed=0
bad() { echo "FAILED: $*"; failed=1; }

command -v promtool >/dev/null 2>&1 || { echo "monitoring: promtool is missing (make setup installs Debian's prometheus)"; exit 1; }
promtool check rules "$HERE/prometheus/alerts.yml" || bad "promtool check rules"
(cd "$HERE/prometheus" && promtool test rules alerts_test.yml) || bad "promtool test rules"
python3 - "$HERE/grafana/coupons.json" <<'PY' || bad "the Grafana dashboard"
import json, sys
dash = json.load(open(sys.argv[1]))
assert dash["panels"], "no panels"
for p in dash["panels"]:
    assert p.get("targets") and all(t.get("expr") for t in p["targets"]), f"panel {p.get('title')} has no query"
PY
if [[ $# -ge 1 ]]; then
  exposed="$(curl -fsS "$1" | grep -o '^coupon_[a-z_]*' | sort -u)"
  if [[ -z "$exposed" ]]; then
    bad "no coupon_* metric at $1"
  else
    root="$(cd "$HERE/../.." && pwd)"
    for name in $(grep -oh 'coupon_[a-z_]*' "$HERE/prometheus/alerts.yml" "$HERE/grafana/coupons.json" | sort -u); do
      grep -qx "$name" <<<"$exposed" && continue
      # A counter appears on its first increment (load shedding, consumer
      # errors): then it must at least be one the code records.
      base="${name%_bucket}"; base="${base%_sum}"; base="${base%_count}"
      if grep -rqs --include='*.rs' "\"$base\"" "$root/producers/src" "$root/consumers/src" "$root/platform/src" "$root/src"; then
        echo "note: $name is not on $1 yet (recorded on its first event)"
      else
        bad "$name is used by the monitoring files but neither $1 nor the code has it"
      fi
    done
  fi
fi
((failed == 0)) && echo "monitoring: ok"
exit $failed
