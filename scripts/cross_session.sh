#!/usr/bin/env bash
# The cross-session matrix of docs/QUALITY.md: for every pattern of the synthetic family and
# every seed, a log and its flattened-time control (`xsrec data synth --pattern`), then the
# default recipe of `xsrec train` as the full model (which trains the model with and without its
# readouts and keeps the better on validation: both candidates are scored too, as `readouts` and
# `lean`), the same recipe on the control, the LSTM, plain SASRec, the model without each of
# its readouts (session successor, clock) and the recipe plus the shared calendar embedding (in
# that order, the references of the table first), then the scoreboard with the references (`xsrec cross-session`). Two trainings at a time, one
# libtorch thread each.
#
#   scripts/cross_session.sh [SEED...]     (default: 0 1 2; results in runs/cross-session/)
#
# PATTERNS="rotation funnel" limits the patterns. A job whose log exists is skipped (done or
# running); delete runs/cross-session/P-seedS/VARIANT.log to run it again.
# Summarise with: python3 scripts/cross_session_table.py runs/cross-session
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/xsrec}
OUT=runs/cross-session
SEEDS=(${@:-0 1 2})
PATTERNS=(${PATTERNS:-rotation return periodic funnel mixture})
LANES=${LANES:-2}
[ -x "$BIN" ] || make build
mkdir -p "$OUT"

# name|flags: every variant is the default recipe plus these flags.
VARIANTS=(
  "full|--keep-candidates"
  "control|"
  "lstm|--arch lstm"
  "plain|--readouts off --no-session-recency --no-time-gap --no-prediction-gap --no-event-type"
  "no-successor|--readouts on --no-session-successor"
  "no-clock|--readouts on --no-clock-readout"
  "calendar|--calendar"
)

train_one() {
  local dir=$1 variant=$2 seed=$3 flags=$4 data=$1/log.csv
  [ -f "$dir/$variant.log" ] && return 0
  [ "$variant" = control ] && data=$dir/control.csv
  # shellcheck disable=SC2086
  "$BIN" train --data "$data" --out "$dir/$variant" --seed "$seed" --threads 1 --quiet $flags > "$dir/$variant.log" 2>&1
  if [ "$variant" = full ]; then
    ln -sfn full/candidates/with-readouts "$dir/readouts"
    ln -sfn full/candidates/without-readouts "$dir/lean"
  fi
  echo "$(basename "$dir") $variant: $(grep '^best epoch' "$dir/$variant.log")"
}

for seed in "${SEEDS[@]}"; do
  for pattern in "${PATTERNS[@]}"; do
    dir=$OUT/$pattern-seed$seed
    mkdir -p "$dir"
    [ -f "$dir/log.csv" ] || "$BIN" data synth --pattern "$pattern" --seed "$seed" \
      --out "$dir/log.csv" --control-out "$dir/control.csv" > "$dir/params.json" 2>/dev/null
  done
done
# Variant by variant, so that a partial run has the full model and its control everywhere first.
jobs=()
for variant in "${VARIANTS[@]}"; do
  for seed in "${SEEDS[@]}"; do
    for pattern in "${PATTERNS[@]}"; do jobs+=("$OUT/$pattern-seed$seed|${variant%%|*}|$seed|${variant#*|}"); done
  done
done
running=0
for job in "${jobs[@]}"; do
  IFS='|' read -r dir variant seed flags <<< "$job"
  train_one "$dir" "$variant" "$seed" "$flags" &
  running=$((running + 1))
  if [ "$running" -ge "$LANES" ]; then wait -n; running=$((running - 1)); fi
done
wait
for seed in "${SEEDS[@]}"; do
  for pattern in "${PATTERNS[@]}"; do
    dir=$OUT/$pattern-seed$seed
    "$BIN" cross-session --pattern "$pattern" --seed "$seed" --runs "$dir" --json-out "$dir/scores.json" > "$dir/scores.md"
  done
done
