#!/usr/bin/env bash
# The large-catalogue load test (issue 13, docs/BENCHMARKS.md "Large catalogues"): an untrained
# artifact of the large shape (1,000,000 items, d_model 128, max_len 200; item ids renamed to the
# plain numbers the load scripts send), 100,000 users x 200 events preloaded, static recommends
# (k = 10, seen items excluded), closed loop at concurrency 64, the server pinned to one core and
# wrk on the other. SERVE_FLAGS passes server flags; DURATION, USERS and EVENTS as in load.sh.
#
#   scripts/large.sh                 results in runs/large/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-runs/large/model}
[ -x target/release/xsrec ] || make build
if [ ! -f "$MODEL/items.tsv" ]; then
  target/release/xsrec bench init-model --items 1000000 --d-model 128 --max-len 200 --out "$MODEL"
  awk -F'\t' -v OFS='\t' 'NR > 1 { sub(/^i/, "", $2) } 1' "$MODEL/items.tsv" > "$MODEL/items.tsv.plain"
  mv "$MODEL/items.tsv.plain" "$MODEL/items.tsv"
fi
OUT=${OUT:-runs/large} MODES=on CONNS=64 WORKLOADS=static SERVER_CPUS=${SERVER_CPUS:-0} \
  USERS=${USERS:-100000} EVENTS=${EVENTS:-200} DURATION=${DURATION:-20} scripts/load.sh "$MODEL"
