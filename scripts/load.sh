#!/usr/bin/env bash
# Load test of `xsrec serve` with wrk (installed from Debian if missing).
#
#   scripts/load.sh [MODEL_DIR]      (default models/default)
#
# For batching on (64 requests / 1 ms window) and off (batch size 1): starts the server, preloads
# 10,000 users x 50 events, then runs two workloads for DURATION seconds at concurrency 1, 16 and 64:
#   static  recommendations for random users whose history does not change (the cache can help)
#   fresh   one new event then a recommendation for the same user (no cache can help)
# wrk is closed-loop; set RATE_PER_CONN=N to pace every connection at N requests/s instead
# (open-loop-like fixed rate). BIN picks another build. MODES="on off" and CONNS="1 16 64" choose the cells; SERVE_FLAGS
# adds server flags (e.g. "--data-dir /tmp/state --fsync interval"); WARM=1 first asks one
# recommendation per preloaded user (scripts/load/warm.py), so that static measures the steady
# state with every state cached rather than each user's first request; WORKLOADS="static" runs one
# workload; SERVER_CPUS=0 pins the server to those CPUs (taskset) and wrk to the others; HISTORY_CAP sets the
# events kept per user (default: the server's, max_len, or max_len × 1.5 for a model that serves
# incrementally: a cap of max_len would trim the window's first event with every new one and
# force a full recompute). req/s counts every response (a shed 429 too); ok/s only those below
# 400, and errors every non-2xx/3xx response or socket error. Results: a markdown table on stdout and in $OUT/results.md (OUT
# defaults to runs/load), plus the server's own per-route latency histograms ($OUT/metrics-*.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/default}
DURATION=${DURATION:-10}
USERS=${USERS:-10000}
EVENTS=${EVENTS:-50}
PORT=${PORT:-18181}
BASE="http://127.0.0.1:$PORT"
OUT=${OUT:-runs/load}
mkdir -p "$OUT"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
BIN=${BIN:-target/release/xsrec}   # another build, to compare two
[ -x "$BIN" ] || make build
ITEMS=$(($(wc -l < "$MODEL/items.tsv") - 1))
server_pin=() client_pin=()
if [ -n "${SERVER_CPUS:-}" ]; then
  server_pin=(taskset -c "$SERVER_CPUS")
  others=$(python3 -c "import os,sys; s={int(c) for c in sys.argv[1].split(',')}; print(','.join(str(c) for c in sorted(os.sched_getaffinity(0)) if c not in s))" "$SERVER_CPUS")
  [ -n "$others" ] && client_pin=(taskset -c "$others")
fi

server_pid=
stop_server() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null; server_pid=; }
trap stop_server EXIT

results="$OUT/results.md"
{
  echo "| batching | workload | concurrency | req/s | ok/s | pairs/s | p50 ms | p90 ms | p99 ms | errors |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
} > "$results"

for mode in ${MODES:-on off}; do
  if [ "$mode" = on ]; then batch_flags=(--max-batch-size 64 --max-batch-delay-us 1000); else batch_flags=(--max-batch-size 1 --max-batch-delay-us 0); fi
  "${server_pin[@]}" "$BIN" serve --model "$MODEL" --addr "127.0.0.1:$PORT" --device cpu \
    ${HISTORY_CAP:+--history-cap "$HISTORY_CAP"} --max-concurrent-requests 4096 "${batch_flags[@]}" ${SERVE_FLAGS:-} > "$OUT/server-$mode.log" 2>&1 &
  server_pid=$!
  until curl -sf "$BASE/health/ready" >/dev/null; do sleep 0.2; done
  python3 scripts/load/preload.py "$BASE" "$USERS" "$EVENTS" "$ITEMS"
  [ -n "${WARM:-}" ] && "${client_pin[@]}" python3 scripts/load/warm.py "$BASE" "$USERS" 64
  for workload in ${WORKLOADS:-static fresh}; do
    for conns in ${CONNS:-1 16 64}; do
      line=$(XSREC_USERS=$USERS XSREC_ITEMS=$ITEMS XSREC_RATE_PER_CONN=${RATE_PER_CONN:-0} \
        "${client_pin[@]}" wrk -t"$conns" -c"$conns" -d"${DURATION}s" -s "scripts/load/$workload.lua" "$BASE" | grep '^RESULT')
      eval "$(echo "$line" | sed 's/^RESULT //')"
      rps=$(python3 -c "print(f'{$requests / $seconds:.0f}')")
      ok=$(python3 -c "print(f'{($requests - $status) / $seconds:.0f}')")
      pairs=$([ "$workload" = fresh ] && python3 -c "print(f'{$requests / $seconds / 2:.0f}')" || echo "—")
      ms() { python3 -c "print(f'{$1 / 1000:.2f}')"; }
      row="| $mode | $workload | $conns | $rps | $ok | $pairs | $(ms "$p50_us") | $(ms "$p90_us") | $(ms "$p99_us") | $errors |"
      echo "$row" | tee -a "$results"
    done
  done
  curl -s "$BASE/metrics" > "$OUT/metrics-$mode.txt"
  stop_server
done
echo "wrote $results"
