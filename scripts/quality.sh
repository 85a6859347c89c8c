#!/usr/bin/env bash
# Trains and evaluates the ml-100k quality matrix of docs/QUALITY.md, two runs at a time with one
# libtorch thread each (better throughput on 2 cores than one run with two threads).
#
#   scripts/quality.sh [SEED...]      (default: 42 43 44; results in runs/quality/, reruns skip done work)
#   OUT=runs/other ONLY="transformer-L200 lstm-L200" scripts/quality.sh 42    (only those variants)
#
# Jobs run in priority order: the three main variants at every seed, then the feature ablations
# at the first seed (then at the others). A job whose log exists is skipped (it is done or
# running); delete runs/quality/NAME-seedS.log to run it again.
# Summarise with: .venv/bin/python scripts/quality_table.py runs/quality
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/xsrec
DATA=data/ml-100k/ml-100k.inter
OUT=${OUT:-runs/quality}
SEEDS=(${@:-42 43 44})
LANES=${LANES:-2}
[ -x "$BIN" ] || make build
[ -f "$DATA" ] || "$BIN" data fetch movielens-100k --out data
mkdir -p "$OUT"

# The table was measured with length-grouped batches, `xsrec train`'s default until shuffled
# batches proved better (docs/QUALITY.md, "The ml-100k clue"); BATCHING=shuffled trains the
# better recipe.
BATCHING=${BATCHING:-grouped}

# name|flags: every variant uses the default recipe of `xsrec train` plus these flags. All but
# `default-L50` leave out the cross-session readouts (`--readouts off`), as the table was first
# measured; `default-L50` is the recipe as a user gets it (with and without, chosen on validation).
MAIN=(
  "transformer-L200|--max-len 200 --readouts off"
  "lstm-L200|--max-len 200 --arch lstm --readouts off"
  "transformer-L50|--max-len 50 --readouts off"
  "default-L50|--max-len 50"
)
ABLATIONS=(
  "plain-sasrec|--max-len 200 --readouts off --no-session-recency --no-time-gap --no-prediction-gap"
  "no-prediction-gap|--max-len 200 --readouts off --no-prediction-gap"
  "no-session-recency|--max-len 200 --readouts off --no-session-recency"
  "no-time-gap|--max-len 200 --readouts off --no-time-gap"
  "concat|--max-len 200 --readouts off --combine concat"
)

run_one() {
  local name=$1 seed=$2 flags=$3 dir="$OUT/$1-seed$2"
  [ -f "$dir.log" ] && return 0
  # shellcheck disable=SC2086
  "$BIN" train --data "$DATA" --out "$dir" --seed "$seed" --threads 1 --batching "$BATCHING" $flags > "$dir.log" 2>&1
  "$BIN" eval --model "$dir" --data "$DATA" --json-out "$dir/eval.json" >> "$dir.log" 2>&1
  echo "$name seed $seed: $(grep '^best epoch' "$dir.log")"
}

jobs=()
for seed in "${SEEDS[@]}"; do
  for variant in "${MAIN[@]}"; do jobs+=("${variant%%|*}|$seed|${variant#*|}"); done
done
for seed in "${SEEDS[@]}"; do
  for variant in "${ABLATIONS[@]}"; do jobs+=("${variant%%|*}|$seed|${variant#*|}"); done
done
running=${ALREADY_RUNNING:-0}
for job in "${jobs[@]}"; do
  IFS='|' read -r name seed flags <<< "$job"
  [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] || continue
  run_one "$name" "$seed" "$flags" &
  running=$((running + 1))
  if [ "$running" -ge "$LANES" ]; then wait -n; running=$((running - 1)); fi
done
wait
