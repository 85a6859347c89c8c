#!/usr/bin/env bash
# REST against gRPC on the same server: the load generator's workload (random users among 10,000
# with 50 events each; `recommend` with a warm cache, or `fresh`: an event then a recommend) at
# each concurrency, once over REST and once over gRPC. Server on core 0, load generator on core 1.
#
#   scripts/protocols.sh          (CONCURRENCY=1,16,64 DURATION=10 MODE=recommend)
#
# Results: runs/protocols/results.md and the JSON reports beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/default}
CONCURRENCY=${CONCURRENCY:-1,16,64}
DURATION=${DURATION:-10}
MODE=${MODE:-recommend}
PORT=${PORT:-18288}
GRPC_PORT=${GRPC_PORT:-18289}
OUT=runs/protocols
. scripts/bench-common.sh

results="$OUT/results.md"
{
  echo "| protocol | workload | concurrency | req/s | p50 ms | p99 ms | errors |"
  echo "|---|---|---:|---:|---:|---:|---:|"
} > "$results"
taskset -c 0 "$BIN" serve --model "$MODEL" --addr "127.0.0.1:$PORT" --grpc-addr "127.0.0.1:$GRPC_PORT" \
  --device cpu > "$OUT/server.log" 2>&1 &
server_pid=$!
# Preload, then warm the inference cache with one untimed run, so that neither protocol's
# measurement pays for the other's cache misses.
taskset -c 1 "$BIN" bench load --url "http://127.0.0.1:$PORT" --model "$MODEL" --users 10000 --events-per-user 50 \
  --mode recommend --concurrency 64 --duration-secs 5 > "$OUT/warm-up.txt"
preload=(--events-per-user 0)
for protocol in rest grpc; do
  via=()
  [ "$protocol" = grpc ] && via=(--grpc "127.0.0.1:$GRPC_PORT")
  taskset -c 1 "$BIN" bench load --url "http://127.0.0.1:$PORT" --model "$MODEL" --users 10000 "${preload[@]}" \
    --mode "$MODE" --concurrency "$CONCURRENCY" --duration-secs "$DURATION" "${via[@]}" \
    --out "$OUT/$protocol.json" > "$OUT/$protocol.txt"
  python3 - "$OUT/$protocol.json" "$protocol" "$MODE" >> "$results" <<'PY'
import json, sys
report, protocol, mode = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
for level in report["levels"]:
    print(f"| {protocol} | {mode} | {level['concurrency']} | {level['requests_per_sec']:,.0f} | "
          f"{level['p50_ms']:.2f} | {level['p99_ms']:.2f} | {level['errors']} |")
PY
done
cat "$results"
