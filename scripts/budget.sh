#!/usr/bin/env bash
# The memory budget, measured: the same durable server (`--fsync interval`, 50 events kept per
# user) without a budget and with budgets that hold only part of the users, under recommends for
# random users (so that most requests of a small budget find their user evicted and read it back
# from the store). Server on core 0, load generator on core 1.
#
#   scripts/budget.sh          (USERS=100000 DURATION=20 BUDGETS="none 96M 48M 24M" CONCURRENCY=64)
#
# Results: runs/budget/results.md, the load reports and metrics beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/default}
USERS=${USERS:-100000}
DURATION=${DURATION:-20}
BUDGETS=${BUDGETS:-none 96M 48M 24M}
CONCURRENCY=${CONCURRENCY:-64}
PORT=${PORT:-18286}
OUT=runs/budget
. scripts/bench-common.sh
BASE="http://127.0.0.1:$PORT"

metric() { awk -v name="$1" '$1 == name {print $2}' "$2"; }
results="$OUT/results.md"
{
  echo "| budget | users in memory | history MB | RSS MB | req/s | p50 ms | p99 ms | reloads/s | mean reload µs | evictions |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
} > "$results"
for budget in $BUDGETS; do
  rm -rf "$OUT/data-$budget"
  flags=(--data-dir "$OUT/data-$budget" --fsync interval)
  [ "$budget" = none ] || flags+=(--max-memory-bytes "$budget")
  taskset -c 0 "$BIN" serve --model "$MODEL" --addr "127.0.0.1:$PORT" --device cpu "${flags[@]}" \
    > "$OUT/server-$budget.log" 2>&1 &
  server_pid=$!
  until curl -sf "$BASE/health/ready" >/dev/null; do sleep 0.2; done
  taskset -c 1 "$BIN" bench load --url "$BASE" --model "$MODEL" --users "$USERS" --events-per-user 50 \
    --mode recommend --concurrency "$CONCURRENCY" --duration-secs "$DURATION" \
    --out "$OUT/load-$budget.json" > "$OUT/load-$budget.txt" 2>&1
  curl -s "$BASE/metrics" > "$OUT/metrics-$budget.txt"
  rss=$(awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$server_pid/status")
  stop_server
  m="$OUT/metrics-$budget.txt"
  python3 - "$OUT/load-$budget.json" "$budget" "$rss" "$DURATION" \
    "$(metric xsrec_users "$m")" "$(metric xsrec_history_bytes "$m")" "$(metric xsrec_history_reloads_total "$m")" \
    "$(metric xsrec_history_reload_seconds_total "$m")" "$(metric xsrec_history_evictions_total "$m")" >> "$results" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
budget, rss, duration = sys.argv[2], sys.argv[3], float(sys.argv[4])
users, history_bytes, reloads, reload_seconds, evictions = (float(x or 0) for x in sys.argv[5:10])
for level in report["levels"]:
    # The preload gives each user its events in one call, so every reload is the load's.
    mean_us = 1e6 * reload_seconds / reloads if reloads else 0
    print(f"| {budget} | {users:,.0f} | {history_bytes / 2**20:,.1f} | {rss} | {level['requests_per_sec']:,.0f} | "
          f"{level['p50_ms']:.2f} | {level['p99_ms']:.2f} | {reloads / duration:,.0f} | {mean_us:,.0f} | {evictions:,.0f} |")
PY
done
cat "$results"
