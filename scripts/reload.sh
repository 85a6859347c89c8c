#!/usr/bin/env bash
# Hot model reload under load: the load generator's static workload (random users among 10,000
# with 50 events each, warm cache) for DURATION seconds, once without reloads and once with a
# reload every RELOAD_EVERY seconds alternating the default model and a retrained one (the same
# recipe, another seed, a few epochs: the same vocabulary, other weights). Server on core 0, load
# generator and trainer on core 1.
#
#   scripts/reload.sh          (DURATION=20 RELOAD_EVERY=2 CONCURRENCY=16)
#
# Results: runs/reload/results.md, the load reports and each reload's time beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/default}
DURATION=${DURATION:-20}
RELOAD_EVERY=${RELOAD_EVERY:-2}
CONCURRENCY=${CONCURRENCY:-16}
PORT=${PORT:-18290}
OUT=runs/reload
. scripts/bench-common.sh

other="$OUT/retrained"
if [ ! -f "$other/model.safetensors" ]; then
  taskset -c 1 "$BIN" train --data data/ml-100k/ml-100k.inter --item-meta data/ml-100k/ml-100k.item \
    --out "$other" --seed 7 --epochs 3 --max-len 50 --dropout 0.3 --quiet
fi
models=("$(realpath "$MODEL")" "$(realpath "$other")")

taskset -c 0 "$BIN" serve --model "$MODEL" --addr "127.0.0.1:$PORT" --grpc-addr off --device cpu \
  > "$OUT/server.log" 2>&1 &
server_pid=$!
taskset -c 1 "$BIN" bench load --url "http://127.0.0.1:$PORT" --model "$MODEL" --users 10000 --events-per-user 50 \
  --mode recommend --concurrency 64 --duration-secs 5 > "$OUT/warm-up.txt"

results="$OUT/results.md"
{
  echo "| run | reloads | req/s | p50 ms | p99 ms | max ms | errors | reload time (mean / max, s) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---|"
} > "$results"
for run in steady reloading; do
  : > "$OUT/reloads-$run.txt"
  if [ "$run" = reloading ]; then
    (
      i=1
      while true; do
        sleep "$RELOAD_EVERY"
        curl -s -o /dev/null -w '%{http_code} %{time_total}\n' -XPOST "http://127.0.0.1:$PORT/admin/v1/model" \
          -H 'content-type: application/json' -d "{\"path\": \"${models[$((i % 2))]}\"}" >> "$OUT/reloads-$run.txt"
        i=$((i + 1))
      done
    ) &
    reloader=$!
  fi
  taskset -c 1 "$BIN" bench load --url "http://127.0.0.1:$PORT" --model "$MODEL" --users 10000 --events-per-user 0 \
    --mode recommend --concurrency "$CONCURRENCY" --duration-secs "$DURATION" --out "$OUT/$run.json" > "$OUT/$run.txt"
  [ "$run" = reloading ] && kill "$reloader" && wait "$reloader" 2>/dev/null || true
  python3 - "$OUT/$run.json" "$run" "$OUT/reloads-$run.txt" >> "$results" <<'PY'
import json, sys
report, run, reloads = json.load(open(sys.argv[1])), sys.argv[2], open(sys.argv[3]).read().split("\n")
times = [float(line.split()[1]) for line in reloads if line.startswith("200 ")]
failed = sum(1 for line in reloads if line and not line.startswith("200 "))
spent = f"{sum(times) / len(times):.2f} / {max(times):.2f}" if times else "–"
for level in report["levels"]:
    print(f"| {run} | {len(times)} ok, {failed} refused | {level['requests_per_sec']:,.0f} | {level['p50_ms']:.2f} | "
          f"{level['p99_ms']:.2f} | {level['max_ms']:.1f} | {level['errors']} | {spent} |")
PY
done
grep -h "model reloaded" "$OUT/server.log" | tail -2
cat "$results"
