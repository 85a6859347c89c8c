#!/usr/bin/env bash
# Overload, measured: what the server does with more than it can take. Every recommend is a full
# Transformer pass (--cache-capacity 0), so the inference worker is the bottleneck. Levels:
#   peak        closed loop, 64 clients (the capacity C: answered recommends/s)
#   0.25C       open loop at a quarter of C (the unloaded latency)
#   2C, 10C     open loop at twice and ten times C (calls start on schedule, answered or not;
#               at most 2,000 outstanding, the rest counted as not sent)
#   256, 2000   closed loops whose clients retry at once on 429 (the harshest clients)
# for the adaptive limit (--queue-delay-target-ms 5, the default) and the static one (0), with
# the HTTP threads' default priority (nice 10). Server and generator share the machine's cores.
#
#   scripts/overload.sh        (DURATION=10)
#
# Results: runs/overload/results.md (a markdown table) and the raw JSON and logs beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/default}
DURATION=${DURATION:-10}
PORT=${PORT:-18283}
OUT=runs/overload
. scripts/bench-common.sh

load() { # load NAME ARGS... → $OUT/NAME.json
  local name=$1; shift
  "$BIN" bench load --url "http://127.0.0.1:$PORT" --model "$MODEL" --users 10000 \
    --duration-secs "$DURATION" --out "$OUT/$name.json" "$@" | grep -v '^ '
}

for target in 5 0; do
  "$BIN" serve --model "$MODEL" --addr "127.0.0.1:$PORT" --device cpu \
    --cache-capacity 0 --queue-delay-target-ms "$target" > "$OUT/server-$target.log" 2>&1 &
  server_pid=$!
  load "peak-$target" --events-per-user 50 --concurrency 64
  capacity=$(python3 -c "import json;print(json.load(open('$OUT/peak-$target.json'))['levels'][0]['requests_per_sec'])")
  rates=$(python3 -c "c=$capacity;print(','.join(str(round(c*f)) for f in (0.25, 2, 10)))")
  load "open-$target" --events-per-user 0 --concurrency 2000 --rate "$rates"
  load "closed-$target" --events-per-user 0 --concurrency 256,2000
  stop_server
done
python3 scripts/overload_table.py "$OUT" | tee "$OUT/results.md"
