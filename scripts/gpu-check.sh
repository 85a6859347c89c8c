#!/usr/bin/env bash
# Issue 5's GPU checks in one go (about 8 minutes on an H200), ending with a summary table.
#
# That machine has no Rust and no network (torch 2.11 lives in /opt/torch/.venv), so first, here:
#   scripts/gpu-bundle.sh                   (.gpu-bundle/: the release binary and its libraries)
# then on the GPU machine, from the repo root, with .gpu-bundle and data/ml-100k carried:
#   scripts/gpu-check.sh [OUT_DIR]          (default: $OUT when set, else runs/gpu-check)
# Rehearsal on a CPU machine, small shapes: DEVICE=cpu QUICK=1 scripts/gpu-check.sh
#
# Steps (each under its own time limit; a failed step is reported and the rest still run):
#   env       libtorch_cuda mapped into the process, CUDA devices seen (stops here if not)
#   parity    top-10 of 1,000 ml-100k histories, CPU fp32 vs device fp32 and bf16
#   forward-* serving one uncached batch by batch size, per stage, vs the floor from the
#             measured bf16/fp32 matmul rate and device copy bandwidth: the ml-100k model and a
#             1M-item, d=128, max_len 200 model (2 layers fp32 and bf16, 4 layers bf16)
#   train-*   one epoch of the ml-100k recipe on the device and on this machine's CPU
#   load-*    the server on the device with the 1M-item model, 100,000 users preloaded,
#             recommend at concurrency 64 and 256, no hidden-state cache (every request runs
#             the encoder), fp32 and bf16, with the server's batching read from /metrics
# Output: OUT_DIR/summary.md, and every log and JSON in OUT_DIR/gpu-check.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu-check}}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
# A local build wins where there is one (rehearsals here); the GPU machine has only the bundle.
if [ -x target/release/xsrec ]; then BIN=${XSREC_BIN:-target/release/xsrec}; else BIN=${XSREC_BIN:-.gpu-bundle/xsrec}; fi
LOGS=$OUT_DIR/gpu-check
SCRATCH=${SCRATCH:-/tmp/xsrec-gpu-check}
PORT=${PORT:-18200}
# Whole-run budget: later steps shrink or are skipped so the summary always gets written inside
# the device tool's 10-minute command limit.
BUDGET=${BUDGET:-540}
rm -rf "$SCRATCH" && mkdir -p "$LOGS" "$SCRATCH"
: > "$LOGS/steps.tsv"

for candidate in /opt/torch/.venv/bin/python .venv/bin/python python3; do
  if [ -x "$(command -v "$candidate")" ] && "$candidate" -c 'import torch' 2>/dev/null; then PY=$candidate; break; fi
done
[ -n "${PY:-}" ] || { echo "no python with torch found" >&2; exit 1; }
TORCH_LIB=$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TORCH_LIB:$PWD/.gpu-bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

if [ "$QUICK" = 1 ]; then
  LARGE=(--items 20000 --d-model 32 --max-len 50); SIZES=1,8,64; USERS=2000; EVENTS=50; SECS=3; THREADS=2
else
  LARGE=(--items 1000000 --d-model 128 --max-len 200); SIZES=1,2,4,8,16,32,64,128,256,512,1024
  USERS=100000; EVENTS=200; SECS=15; THREADS=16
fi

# step NAME LIMIT_SECS COMMAND...: runs with a limit, logs to $LOGS/NAME.log, records rc and time.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -le 5 ]; then
    echo "== $name: skipped, the ${BUDGET}s budget is spent"
    printf '%s\tskipped\t0\n' "$name" >> "$LOGS/steps.tsv"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name: $*"
  local started=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" >> "$LOGS/steps.tsv"
  tail -n 15 "$LOGS/$name.log"
  return $rc
}

step env 60 bash -c "nvidia-smi 2>/dev/null; '$BIN' bench env"
if [ "$DEVICE" != cpu ] && ! grep -q "CUDA available: true" "$LOGS/env.log"; then
  echo "CUDA is not usable from $BIN (see $LOGS/env.log); nothing else can be measured" >&2
  exit 1
fi

step parity 180 "$BIN" bench parity --device "$DEVICE" --model models/default \
  --data data/ml-100k/ml-100k.inter --users 1000 --out "$LOGS/parity.json"
for precision in fp32 bf16; do
  step "forward-ml100k-$precision" 120 "$BIN" bench forward --device "$DEVICE" --precision "$precision" \
    --model models/default --batch-sizes "$SIZES" --threads "$THREADS" --out "$LOGS/forward-ml100k-$precision.json" \
    --plot "$LOGS/forward-ml100k-$precision.png"
  step "forward-large-$precision" 150 "$BIN" bench forward --device "$DEVICE" --precision "$precision" \
    "${LARGE[@]}" --layers 2 --batch-sizes "$SIZES" --threads "$THREADS" --out "$LOGS/forward-large-$precision.json" \
    --plot "$LOGS/forward-large-$precision.png"
done
step forward-large4-bf16 90 "$BIN" bench forward --device "$DEVICE" --precision bf16 "${LARGE[@]}" --layers 4 \
  --batch-sizes 1,64,256,1024 --threads "$THREADS" --out "$LOGS/forward-large4-bf16.json"

for where in "$DEVICE" cpu; do
  step "train-$where" 150 "$BIN" train --data data/ml-100k/ml-100k.inter --out "$SCRATCH/train-$where" \
    --device "$where" --threads "$THREADS" --epochs 1 --max-len 50 --seed 42 \
    && cp "$SCRATCH/train-$where/epochs.json" "$LOGS/train-$where.json"
  [ "$DEVICE" = cpu ] && break
done

step init-large 120 "$BIN" bench init-model "${LARGE[@]}" --layers 2 --out "$SCRATCH/large"
for precision in fp32 bf16; do
  "$BIN" serve --model "$SCRATCH/large" --addr "127.0.0.1:$PORT" --device "$DEVICE" --precision "$precision" \
    --cache-capacity 0 --max-batch-size 256 --max-concurrent-requests 4096 --history-cap 200 \
    --torch-threads "$THREADS" > "$LOGS/server-$precision.log" 2>&1 &
  server=$!
  step "load-$precision" 150 "$BIN" bench load --url "http://127.0.0.1:$PORT" --model "$SCRATCH/large" \
    --users "$USERS" --events-per-user "$EVENTS" --concurrency 64,256 --duration-secs "$SECS" \
    --out "$LOGS/load-$precision.json"
  "$PY" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' \
    "http://127.0.0.1:$PORT/metrics" > "$LOGS/metrics-$precision.txt" 2>&1
  kill -TERM $server 2>/dev/null; wait $server 2>/dev/null
done

"$PY" scripts/gpu_summary.py "$LOGS" > "$OUT_DIR/summary.md"
tar czf "$OUT_DIR/gpu-check.tar.gz" -C "$OUT_DIR" gpu-check
# The device tool returns at most 8 files: there, keep only the summary and the archive.
[ -n "${OUT:-}" ] && [ "$OUT_DIR" = "$OUT" ] && rm -rf "$LOGS"
echo
cat "$OUT_DIR/summary.md"
