#!/usr/bin/env bash
# Issue 12's quality check: the default model's recipe (Makefile DEFAULT_TRAIN_FLAGS) with
# positions counted from the window start against the newest event, seeds 42-44, each scored
# on full windows and on the windows incremental serving uses (`xsrec eval --window served`).
# Results: runs/positions/<positions>-s<seed>/eval-{newest,served}.json (docs/QUALITY.md).
# models/default is the seed-42 window-start model. About 20 minutes per training on one core.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/xsrec}
for seed in ${SEEDS:-42 43 44}; do
  for positions in window-start newest; do
    out=runs/positions/$positions-s$seed
    [ "$positions-$seed" = window-start-42 ] && out=models/default
    [ -f "$out/config.json" ] || OMP_NUM_THREADS=1 "$BIN" train --data data/ml-100k/ml-100k.inter \
      --max-len 50 --seed "$seed" --threads 1 --readouts off --positions "$positions" --quiet --out "$out"
    mkdir -p "runs/positions/$positions-s$seed"
    for window in newest served; do
      OMP_NUM_THREADS=1 "$BIN" eval --model "$out" --data data/ml-100k/ml-100k.inter --window "$window" \
        --json-out "runs/positions/$positions-s$seed/eval-$window.json" > /dev/null
    done
  done
done
python3 - <<'PY'
import glob, json
for f in sorted(glob.glob("runs/positions/*/eval-*.json")):
    t = json.load(open(f))["test"]["all"]["means"]
    print(f"{f}: test NDCG@10 {t['NDCG@10']:.4f} HR@10 {t['HR@10']:.4f}")
PY
