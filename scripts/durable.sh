#!/usr/bin/env bash
# Durable histories, measured: ingest throughput with the store off, `--fsync interval` and
# `--fsync always` (calls of 100 events, as issue 9 asks), then recovery of a store holding many
# events. The server runs on SERVER_CPUS (core 0), the load generator on LOAD_CPUS (core 1).
#
#   scripts/durable.sh                 (RECOVER_EVENTS=10000000 DURATION=10 CONCURRENCY=16,64)
#   RATE=2000 CONCURRENCY=512 scripts/durable.sh   (open loop: 2,000 calls/s offered, at most
#                                                   512 outstanding; shows stalls a closed loop hides)
#   BIN=/tmp/xsrec-old scripts/durable.sh          (another build, to compare)
#
# Results: runs/durable/results.md (a markdown table) and the raw JSON and logs beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/default}
DURATION=${DURATION:-10}
CONCURRENCY=${CONCURRENCY:-16,64}
RECOVER_EVENTS=${RECOVER_EVENTS:-10000000}
PORT=${PORT:-18282}
SERVER_CPUS=${SERVER_CPUS:-0}
LOAD_CPUS=${LOAD_CPUS:-1}
RATE=${RATE:-}
OUT=${OUT:-runs/durable}
. scripts/bench-common.sh

results="$OUT/results.md"
{
  echo "| store | concurrency | offered calls/s | events/s | calls/s | p50 ms | p99 ms | max ms | not sent | fsyncs/s | errors | server CPU µs per call |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
} > "$results"

for store in memory interval always; do
  rm -rf "$OUT/data-$store"
  case $store in
    memory) flags=() ;;
    *) flags=(--data-dir "$OUT/data-$store" --fsync "$store") ;;
  esac
  taskset -c "$SERVER_CPUS" "$BIN" serve --model "$MODEL" --addr "127.0.0.1:$PORT" --device cpu \
    --max-concurrent-requests 4096 "${flags[@]}" > "$OUT/server-$store.log" 2>&1 &
  server_pid=$!
  taskset -c "$LOAD_CPUS" "$BIN" bench load --url "http://127.0.0.1:$PORT" --model "$MODEL" --mode ingest \
    --events-per-user 0 --users 100000 --ingest-batch 100 --concurrency "$CONCURRENCY" ${RATE:+--rate "$RATE"} \
    --duration-secs "$DURATION" --out "$OUT/ingest-$store.json" > "$OUT/ingest-$store.txt"
  fsyncs=$(curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^xsrec_journal_fsyncs_total /{print $2}')
  # Where the server's CPU went, by thread (handlers, journal writer, indexer, fjall's workers):
  # clock ticks of user + system time, summed by thread name, over the whole run.
  for task in /proc/"$server_pid"/task/*; do
    sed 's/^[0-9]* (\(.*\)) [A-Z] /\1 /' "$task/stat" | awk '{print $1, $12 + $13}'
  done | awk '{ticks[$1] += $2} END {for (t in ticks) if (ticks[t] > 0) print t, ticks[t]}' > "$OUT/cpu-$store.txt"
  stop_server
  python3 - "$OUT/ingest-$store.json" "$store" "${fsyncs:-0}" "$DURATION" "$OUT/cpu-$store.txt" "$(getconf CLK_TCK)" >> "$results" <<'PY'
import json, sys
report, store, fsyncs, duration = json.load(open(sys.argv[1])), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
ticks = {name: int(n) for name, n in (line.split() for line in open(sys.argv[5]))}
tick_micros = 1e6 / int(sys.argv[6])
levels = report["levels"]
calls = sum(level["requests"] for level in levels)
# The journal's threads by name, the rest (start-up, the tracing appender) together.
split = {"handlers": ticks.pop("tokio-rt-worker", 0), "writer": ticks.pop("journal-writer", 0),
         "indexer": ticks.pop("journal-indexer", 0), "fjall": ticks.pop("fjall:worker", 0)}
split["other"] = sum(ticks.values())
cpu = " / ".join(f"{name} {n * tick_micros / max(calls, 1):.0f}" for name, n in split.items() if n)
for level in levels:
    # fsyncs are counted over the whole run; shown per second of load.
    per_sec = fsyncs / (duration * len(levels))
    offered = level["offered_per_sec"]
    print(f"| {store} | {level['concurrency']} | {'closed loop' if offered is None else f'{offered:,.0f}'} | "
          f"{level['events_per_sec']:,.0f} | {level['requests_per_sec']:,.0f} | {level['p50_ms']:.2f} | "
          f"{level['p99_ms']:.2f} | {level['max_ms']:.0f} | {level['not_sent']} | {per_sec:,.0f} | {level['errors']} | {cpu} |")
PY
done

# Recovery: seed a store offline with `xsrec history import`, then time a start until ready.
if [ "$RECOVER_EVENTS" -gt 0 ]; then
  log="$OUT/recover-$RECOVER_EVENTS.tsv"
  python3 - "$log" "$RECOVER_EVENTS" <<'PY'
import random, sys
path, n = sys.argv[1], int(sys.argv[2])
users, per_user = max(1, n // 100), 100
rng = random.Random(1)
with open(path, "w") as out:
    out.write("user_id\titem_id\ttimestamp\tevent_type\n")
    written = 0
    for u in range(users):
        t = 1_600_000_000 + rng.randrange(10_000_000)
        for _ in range(min(per_user, n - written)):
            t += rng.randrange(1, 4000)
            out.write(f"user-{u}\t{rng.randrange(1, 1683)}\t{t}\tview\n")
            written += 1
PY
  rm -rf "$OUT/data-recover"
  /usr/bin/time -v "$BIN" history import --data-dir "$OUT/data-recover" --data "$log" \
    > "$OUT/import.log" 2>&1
  du -sb "$OUT/data-recover" | awk '{print "store bytes: " $1}' >> "$OUT/import.log"
  started=$(date +%s.%N)
  "$BIN" serve --model "$MODEL" --addr "127.0.0.1:$PORT" --device cpu --data-dir "$OUT/data-recover" \
    > "$OUT/server-recover.log" 2>&1 &
  server_pid=$!
  until curl -sf "http://127.0.0.1:$PORT/health/ready" > /dev/null; do sleep 0.1; done
  ready=$(date +%s.%N)
  rss=$(awk '/VmRSS/{print $2}' "/proc/$server_pid/status")
  stop_server
  {
    echo
    echo "Recovery of $RECOVER_EVENTS events: ready $(python3 -c "print(f'{$ready - $started:.1f}')") s after start, RSS ${rss} kB"
    grep -h "recovered\|imported\|store bytes\|Maximum resident" "$OUT/server-recover.log" "$OUT/import.log" | sed 's/^/    /'
  } >> "$results"
fi
cat "$results"
