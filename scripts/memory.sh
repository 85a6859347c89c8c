#!/usr/bin/env bash
# Resident memory of `xsrec serve` under the fresh workload (every request a new event and a
# forward pass), then after erasing every user: issue 9's "RSS grows from 394 MB to 1,420 MB and
# erasing frees nothing". RSS is sampled every 5 s from /proc.
#
#   scripts/memory.sh [LABEL]        (USERS=10000 DURATION=80 SERVE_FLAGS=...; BIN to compare builds)
#
# Results: runs/memory/LABEL.tsv (seconds, phase, RSS MB), the server's own count of users, events,
# history bytes and cached states after the load (metrics-LABEL.txt), and a line per phase.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/default}
USERS=${USERS:-10000}
DURATION=${DURATION:-80}
PORT=${PORT:-18284}
LABEL=${1:-default}
OUT=runs/memory
. scripts/bench-common.sh
BIN=${SERVE_BIN:-$BIN}
BASE="http://127.0.0.1:$PORT"

rss_mb() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$server_pid/status"; }
"$BIN" serve --model "$MODEL" --addr "127.0.0.1:$PORT" --device cpu ${SERVE_FLAGS:-} \
  > "$OUT/server-$LABEL.log" 2>&1 &
server_pid=$!
until curl -sf "$BASE/health/ready" >/dev/null; do sleep 0.2; done
started=$(date +%s)
sample() { echo -e "$(( $(date +%s) - started ))\t$1\t$(rss_mb)" >> "$OUT/$LABEL.tsv"; }
: > "$OUT/$LABEL.tsv"
sample ready
target/release/xsrec bench load --url "$BASE" --model "$MODEL" --users "$USERS" --events-per-user 50 \
  --mode fresh --concurrency 64 --duration-secs "$DURATION" > "$OUT/load-$LABEL.txt" 2>&1 &
load_pid=$!
while kill -0 "$load_pid" 2>/dev/null; do sample fresh; sleep 5; done
sample loaded
curl -s "$BASE/metrics" | grep -E '^xsrec_(users|history_events|history_bytes|cached_states) ' > "$OUT/metrics-$LABEL.txt"
for ((u = 0; u < USERS; u++)); do echo "url = \"$BASE/v1/users/load-$u\""; echo 'request = "DELETE"'; done > "$OUT/erase.curl"
curl -s -o /dev/null --parallel --parallel-max 16 -K "$OUT/erase.curl"
sleep 2
sample erased
cat "$OUT/metrics-$LABEL.txt"
awk -F'\t' '{last[$2] = $3; if (!($2 in first)) { first[$2] = $3; order[n++] = $2 } } END { for (i = 0; i < n; i++) printf "%s: %s → %s MB\n", order[i], first[order[i]], last[order[i]] }' "$OUT/$LABEL.tsv"
