#!/usr/bin/env bash
# Issue 14's ml-100k clue: the PyTorch twin under torchrun (2 processes, its defaults) reached test
# NDCG@10 0.140 at one seed, `xsrec train --max-len 200 --readouts off` 0.1220 ± 0.0074 at three.
# Batch 128 alone did not explain it (docs/QUALITY.md, "The ml-100k clue"). These runs separate
# the rest, three seeds each:
#   twin-shuffled   the twin's torchrun run as it was (plain shuffled batches, readouts on)
#   twin-grouped    the same with batches of similar length (the twin's default since 2026-12-04)
#   rust-readouts   xsrec train with the twin's settings: readouts on, 128 windows per step
#   rust-shuffled   the same with plain shuffled batches, as the twin's torchrun run had
#
#   scripts/clue_100k.sh [SEED...]      (default: 42 43 44; results in runs/clue-100k/)
#   ONLY="twin-shuffled" scripts/clue_100k.sh 43 44
#
# One run at a time on both cores. A finished run (its eval.json exists) is skipped; the Rust
# runs resume from their checkpoints, an interrupted twin run starts again.
# Summarise with: MAIN=twin-shuffled .venv/bin/python scripts/quality_table.py runs/clue-100k
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/xsrec
DATA=${DATA:-data/ml-100k/ml-100k.inter}
OUT=${OUT:-runs/clue-100k}
SEEDS=(${@:-42 43 44})
[ -x "$BIN" ] || make build
[ -f "$DATA" ] || "$BIN" data fetch movielens-100k --out data
mkdir -p "$OUT"

twin() {
  local dir=$1 seed=$2 batching=$3
  # --standalone: a free local port for the rendezvous. Paths are absolute: torchrun runs from here.
  PYTHONPATH=models/torch OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=2 \
    -m xsrec_torch.train --data "$DATA" --out "$dir" --seed "$seed" --batching "$batching"
}

rust() {
  local dir=$1 seed=$2 batching=$3
  "$BIN" train --data "$DATA" --out "$dir" --seed "$seed" --threads 2 --resume \
    --max-len 200 --readouts on --batch-size 128 --batching "$batching"
}

for name in twin-shuffled twin-grouped rust-readouts rust-shuffled; do
  for seed in "${SEEDS[@]}"; do
    dir="$OUT/$name-seed$seed"
    [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] || continue
    [ -f "$dir/eval.json" ] && continue
    if [ ! -f "$dir/model.safetensors" ]; then
      case $name in
        twin-shuffled) twin "$dir" "$seed" shuffled ;;
        twin-grouped) twin "$dir" "$seed" grouped ;;
        rust-readouts) rust "$dir" "$seed" grouped ;;
        rust-shuffled) rust "$dir" "$seed" shuffled ;;
      esac >> "$dir.log" 2>&1
    fi
    "$BIN" eval --model "$dir" --data "$DATA" --json-out "$dir/eval.json" >> "$dir.log" 2>&1
    echo "$name seed $seed: $(grep '^best epoch' "$dir.log" | tail -1)"
  done
done
