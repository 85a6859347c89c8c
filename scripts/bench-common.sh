# Sourced by the measurement scripts that start their own server: the binary (built if missing),
# the output folder $OUT (set before sourcing), and a server that is stopped on exit. BIN picks
# another build (to compare two).
BIN=${BIN:-target/release/xsrec}
mkdir -p "$OUT"
[ -x "$BIN" ] || make build

server_pid=
stop_server() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null; server_pid=; }
trap stop_server EXIT
