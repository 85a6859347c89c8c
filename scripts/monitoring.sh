#!/usr/bin/env bash
# The monitoring kit of docker/ checked with a real Prometheus, where no container can run
# (`podman run` is refused in this sandbox, so `docker compose up` cannot be tried here):
#   1. promtool: the alert rules and the compose's scrape config are valid, and the rules' unit
#      tests (docker/prometheus/alerts.test.yml) pass: every alert fires when it should and only then;
#   2. live: `xsrec serve` (durable, with a memory budget that evicts) under a mixed load, scraped
#      every second by Prometheus with docker/prometheus/prometheus.yml's rules; then every query of
#      the Grafana dashboard is run against it and must return data, the target must be up and every
#      alert rule must evaluate without error.
#
#   scripts/monitoring.sh              (LOAD_SECS=20; results in runs/monitoring/)
#
# Needs promtool and prometheus (Debian's `prometheus` package; installed here when missing and
# run as root). Grafana itself is not packaged for Debian: its dashboard is checked through the
# queries it sends, which is where a dashboard breaks when metrics change.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/default}
LOAD_SECS=${LOAD_SECS:-20}
PORT=${PORT:-18390}
PROM_PORT=${PROM_PORT:-18391}
OUT=runs/monitoring
. scripts/bench-common.sh

if ! command -v promtool > /dev/null || ! command -v prometheus > /dev/null; then
  [ "$(id -u)" = 0 ] || { echo "monitoring.sh: needs promtool and prometheus (apt-get install prometheus)" >&2; exit 1; }
  # A fresh machine may have no package lists yet.
  install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >> "$OUT/apt.log" 2>&1; }
  install || { apt-get update >> "$OUT/apt.log" 2>&1 && install; } || { cat "$OUT/apt.log" >&2; exit 1; }
  # The package's service is not wanted; where an init system started it, stop it.
  pkill -x prometheus 2> /dev/null || true
fi

rm -rf "$OUT/data" "$OUT/tsdb"
config="$OUT/prometheus.yml"
sed -e "s#/etc/prometheus/alerts.yml#$PWD/docker/prometheus/alerts.yml#" \
  -e "s#xsrec:8080#127.0.0.1:$PORT#" -e 's#: 10s#: 1s#' docker/prometheus/prometheus.yml > "$config"
promtool check config "$config"
promtool check rules docker/prometheus/alerts.yml
promtool test rules docker/prometheus/alerts.test.yml

"$BIN" serve --model "$MODEL" --addr "127.0.0.1:$PORT" --grpc-addr 127.0.0.1:0 --device cpu \
  --data-dir "$OUT/data" --fsync interval --max-memory-bytes 2M > "$OUT/server.log" 2>&1 &
server_pid=$!
prometheus --config.file="$config" --storage.tsdb.path="$OUT/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" > "$OUT/prometheus.log" 2>&1 &
prom_pid=$!
trap 'kill $prom_pid 2> /dev/null; stop_server' EXIT

# Mixed traffic: fresh events with recommends (journal writes, cache misses, budget evictions and
# reloads), then cached recommends (hits), and a few refused requests (failures by code).
half=$((LOAD_SECS / 2))
"$BIN" bench load --url "http://127.0.0.1:$PORT" --model "$MODEL" --users 5000 --events-per-user 20 \
  --mode fresh --concurrency 16 --duration-secs "$half" > "$OUT/load-fresh.txt"
for _ in 1 2 3; do
  curl -s -o /dev/null -X POST "http://127.0.0.1:$PORT/v1/recommend" -H 'content-type: application/json' \
    -d '{"user_id": "", "k": 10}'
done
"$BIN" bench load --url "http://127.0.0.1:$PORT" --model "$MODEL" --users 5000 --events-per-user 0 \
  --mode recommend --concurrency 16 --duration-secs "$half" > "$OUT/load-recommend.txt"
sleep 3 # a last scrape and rule evaluation after the load

python3 - "http://127.0.0.1:$PROM_PORT" docker/grafana/dashboards/xsrec.json "$OUT/results.md" <<'PY'
import json, math, sys, urllib.parse, urllib.request

prometheus, dashboard, results = sys.argv[1:4]

def api(path, **params):
    url = f"{prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        reply = json.load(response)
    assert reply["status"] == "success", reply
    return reply["data"]

failures = []
targets = api("targets")["activeTargets"]
if [t["health"] for t in targets] != ["up"]:
    failures.append(f"target not up: {targets}")
rules = [r for group in api("rules")["groups"] for r in group["rules"]]
broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
if len(rules) != 8 or broken:
    failures.append(f"{len(rules)} rules, not evaluating: {broken}")
firing = [r["name"] for r in rules if r["state"] == "firing"]

lines = ["| panel | query | series | value (first series) |", "|---|---|---:|---:|"]
for panel in json.load(open(dashboard))["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"]
        series = api("query", query=expr)["result"]
        values = [float(s["value"][1]) for s in series]
        finite = [v for v in values if math.isfinite(v)]
        shown = f"{finite[0]:.4g}" if finite else "–"
        quoted = expr.replace("|", "\\|")
        lines.append(f"| {panel['title']} | `{quoted}` | {len(series)} | {shown} |")
        if not finite:
            failures.append(f"{panel['title']}: no finite value from {expr}")
lines.append("")
lines.append(f"Target up; {len(rules)} alert rules evaluating without error; firing: {firing or 'none'}.")
open(results, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
if failures:
    sys.exit("monitoring check failed:\n  " + "\n  ".join(failures))
PY
