#!/usr/bin/env bash
# Trains and evaluates the ml-100k quality matrix recorded in docs/QUALITY.md.
# Usage: scripts/quality.sh [SEEDS...]   (default seeds: 1 2 3); results land in runs/quality/.
# Each run writes its artifact, training log and eval.json; scripts/quality_table.py summarises.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/xsrec
DATA=data/ml-100k/ml-100k.inter
OUT=runs/quality
SEEDS=("${@:-1 2 3}")
[ -x "$BIN" ] || make build
[ -f "$DATA" ] || "$BIN" data fetch movielens-100k --out data
mkdir -p "$OUT"

# name|flags — every variant shares the default training recipe of `xsrec train`.
VARIANTS=(
  "transformer-L200|--max-len 200"
  "transformer-L50|--max-len 50"
  "lstm-L200|--max-len 200 --arch lstm"
  "no-session-recency|--max-len 200 --no-session-recency"
  "no-time-gap|--max-len 200 --no-time-gap"
  "no-prediction-gap|--max-len 200 --no-prediction-gap"
  "plain-sasrec|--max-len 200 --no-session-recency --no-time-gap --no-prediction-gap"
  "concat|--max-len 200 --combine concat"
)
for seed in ${SEEDS[@]}; do
  for variant in "${VARIANTS[@]}"; do
    name=${variant%%|*}
    flags=${variant#*|}
    dir="$OUT/$name-seed$seed"
    [ -f "$dir/eval.json" ] && continue
    echo "== $name seed $seed"
    # shellcheck disable=SC2086
    "$BIN" train --data "$DATA" --out "$dir" --seed "$seed" $flags > "$dir.log" 2>&1
    "$BIN" eval --model "$dir" --data "$DATA" --json-out "$dir/eval.json" >> "$dir.log" 2>&1
    tail -1 "$dir.log"
  done
done
