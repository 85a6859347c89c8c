#!/usr/bin/env bash
# Schemathesis, an OpenAPI-driven robustness tool, against a running `xsrec serve` with API keys
# on and a durable store: every check it has (no 5xx; statuses, bodies, content types and
# headers as documented; schema-violating requests refused and schema-valid ones accepted;
# missing or wrong keys refused). Exits non-zero on any failure.
#
#   scripts/api_fuzz.sh [SECONDS]     (default 120; the report is printed)
#
# Installs schemathesis into .venv-api-fuzz on first use. BIN=... picks another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_BUDGET=${1:-120}
BIN=${BIN:-target/release/xsrec}
VENV=.venv-api-fuzz
[ -x "$BIN" ] || make build
[ -x "$VENV/bin/st" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q schemathesis==4.32.5; }
work=$(mktemp -d)
key="api-fuzz-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
XSREC_API_KEYS="$key read,write,admin" OMP_NUM_THREADS=1 "$BIN" serve --addr "127.0.0.1:$port" \
  --grpc-addr 127.0.0.1:0 --data-dir "$work/data" > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health/ready" > /dev/null && break
  kill -0 $server 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.1
done
status=0
"$VENV/bin/st" --config-file scripts/schemathesis.toml run "http://127.0.0.1:$port/openapi.json" --checks all \
  -H "Authorization: Bearer $key" --max-time "$SECONDS_BUDGET" -w 2 || status=$?
kill -0 $server 2>/dev/null || { echo "the server died:"; tail -20 "$work/server.log"; exit 1; }
exit $status
