#!/usr/bin/env bash
# Where an ingest call's CPU goes, memory-only against `--fsync interval` (docs/RELIABILITY.md,
# "Where the CPU goes"): the server on core 0, `xsrec bench load --mode ingest` (calls of 100
# events for 100,000 random users, 16 clients) on core 1, and `perf record --call-graph dwarf`
# attached to the server for 8 s once the load runs. Read the profiles with e.g.
#   perf report -i $OUT/perf-interval.data --comm tokio-rt-worker --children --sort symbol -g none
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/default}
OUT=${OUT:-runs/profile-ingest}
PORT=${PORT:-18383}
. scripts/bench-common.sh
for store in memory interval; do
  rm -rf "$OUT/data-$store"
  flags=()
  [ "$store" = interval ] && flags=(--data-dir "$OUT/data-$store" --fsync interval)
  taskset -c 0 "$BIN" serve --model "$MODEL" --addr "127.0.0.1:$PORT" --device cpu \
    --max-concurrent-requests 4096 "${flags[@]}" > "$OUT/server-$store.log" 2>&1 &
  server_pid=$!
  until curl -sf "http://127.0.0.1:$PORT/health/ready" > /dev/null; do sleep 0.2; done
  (sleep 3; perf record -p "$server_pid" -F 499 --call-graph dwarf,16384 -o "$OUT/perf-$store.data" -- sleep 8) \
    > "$OUT/perf-$store.log" 2>&1 &
  profiler=$!
  taskset -c 1 "$BIN" bench load --url "http://127.0.0.1:$PORT" --model "$MODEL" --mode ingest \
    --events-per-user 0 --users 100000 --ingest-batch 100 --concurrency 16 --duration-secs 13 \
    --out "$OUT/ingest-$store.json" > "$OUT/ingest-$store.txt" 2>&1
  wait "$profiler"
  stop_server
  echo "$store: $(grep -h 'req/s' "$OUT/ingest-$store.txt" | head -1)"
done
