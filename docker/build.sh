#!/usr/bin/env bash
# Builds the xsrec image with podman on a machine that reaches package registries but no image
# registry (this project's build machines): the Debian base is made from the Debian mirror
# (mmdebstrap), the Rust build image from that base plus this machine's Rust toolchain, and
# docker/Dockerfile is built unchanged with them as its base images. Then a smoke test of the
# image's own filesystem: where `podman run` is refused (this sandbox), the image is exported
# and its binary started in a chroot, as root, with the image's environment and as its user.
#
#   docker/build.sh                  (FLAVOR=cpu TAG=localhost/xsrec:cpu)
#
# Needs: podman, mmdebstrap (apt-get install podman mmdebstrap), root, and rustup's stable
# toolchain. Output: the image (docker format, which keeps the HEALTHCHECK), and what the smoke
# test saw in docker/SMOKE.md (FLAVOR=cpu) or docker/SMOKE-$FLAVOR.md.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOR=${FLAVOR:-cpu}
TAG=${TAG:-localhost/xsrec:$FLAVOR}
SMOKE=docker/SMOKE.md
[ "$FLAVOR" = cpu ] || SMOKE=docker/SMOKE-$FLAVOR.md
BASE=localhost/debian:bookworm-slim
RUST=localhost/xsrec-rust:bookworm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! podman image exists "$BASE"; then
  mmdebstrap --variant=minbase bookworm "$work/rootfs.tar"
  podman import --change 'CMD ["/bin/bash"]' "$work/rootfs.tar" "$BASE"
fi
if ! podman image exists "$RUST"; then
  toolchain=$(rustup toolchain list | awk '/^stable/ {print $1}')
  mkdir -p "$work/rust/ca"
  cp -a "$(rustup run "$toolchain" rustc --print sysroot)" "$work/rust/toolchain"
  # This machine's own certificate authorities (where a TLS proxy stands between it and the
  # registries), for the build stage only: pip and cargo fetch over TLS.
  cp /usr/local/share/ca-certificates/*.crt "$work/rust/ca/" 2> /dev/null || true
  cat > "$work/rust/Containerfile" <<CONTAINERFILE
FROM $BASE
COPY toolchain /usr/local/rust
COPY ca/ /usr/local/share/ca-certificates/
ENV PATH=/usr/local/rust/bin:\$PATH CARGO_HOME=/usr/local/cargo \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt CARGO_HTTP_CAINFO=/etc/ssl/certs/ca-certificates.crt
CONTAINERFILE
  podman build --isolation=chroot -t "$RUST" "$work/rust"
fi
podman build --isolation=chroot --format docker -f docker/Dockerfile \
  --build-arg RUST_IMAGE="$RUST" --build-arg RUNTIME_IMAGE="$BASE" --build-arg TORCH_FLAVOR="$FLAVOR" \
  -t "$TAG" .

# Smoke test: the image's filesystem, its environment, its user, its entrypoint.
container=$(podman create "$TAG")
mkdir "$work/root"
podman export "$container" | tar -x -C "$work/root"
podman rm "$container" > /dev/null
env_args=()
while IFS= read -r line; do env_args+=("$line"); done \
  < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$TAG" | sed '/^$/d')
user=$(podman image inspect --format '{{.Config.User}}' "$TAG")
port=18380
mount --bind /proc "$work/root/proc"
mount --bind /dev "$work/root/dev"
cleanup() { umount "$work/root/proc" "$work/root/dev" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
env -i "${env_args[@]}" XSREC_ADDR=127.0.0.1:$port XSREC_GRPC_ADDR=127.0.0.1:$((port + 1)) \
  chroot --userspec="$user:$user" "$work/root" /usr/local/bin/xsrec serve > "$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health/ready" > /dev/null && break
  kill -0 "$server" 2> /dev/null || { cat "$work/serve.log"; exit 1; }
  sleep 0.2
done
base="http://127.0.0.1:$port"
{
  echo "# Smoke test of $TAG ($(date -u +%Y-%m-%d), docker/build.sh)"
  echo
  echo '```'
  echo "\$ podman image inspect $TAG"
  podman image inspect "$TAG" | python3 -c 'import json, sys
image = json.load(sys.stdin)[0]
config = image["Config"]
print("size:", round(image["Size"] / 2**20), "MiB; user:", config.get("User"), "; entrypoint:", config.get("Entrypoint"))
print("healthcheck:", (image.get("Healthcheck") or {}).get("Test"))
print("env:", config.get("Env"))
print("volumes:", list(config.get("Volumes") or {}), "; ports:", list(config.get("ExposedPorts") or {}))'
  echo "\$ ldd /usr/local/bin/xsrec (inside the image)"
  chroot "$work/root" ldd /usr/local/bin/xsrec | sed 's/ (0x[0-9a-f]*)//'
  echo "\$ the HEALTHCHECK's curl, from inside the image (port $port here, 8080 in a container)"
  chroot --userspec="$user:$user" "$work/root" curl -fsS "$base/health/ready" && echo " -> healthy"
  echo "\$ curl -X POST $base/v1/events (2 events of user 42)"
  curl -s -H 'content-type: application/json' "$base/v1/events" \
    -d '{"events":[{"user_id":"42","item_id":"50","timestamp":1700000000},{"user_id":"42","item_id":"181","timestamp":1700000100}]}'; echo
  echo "\$ curl -X POST $base/v1/recommend (k=3)"
  curl -s -H 'content-type: application/json' "$base/v1/recommend" -d '{"user_id":"42","k":3}'; echo
  echo "\$ curl $base/metrics | grep xsrec_journal_events_total"
  curl -s "$base/metrics" | grep '^xsrec_journal_events_total'
  echo "\$ ls -ln /var/lib/xsrec/data (the volume, written by uid 10001)"
  ls -ln "$work/root/var/lib/xsrec/data"
  echo "\$ the server's first log lines"
  head -3 "$work/serve.log" | cut -c1-300
  echo '```'
} > "$SMOKE"
kill "$server"; wait "$server" || true
cat "$SMOKE"
