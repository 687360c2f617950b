#!/usr/bin/env bash
# Builds the statically linked diskferry-client for a bare initramfs (no libc on the target).
# Usage: deploy/build-client.sh [OUTDIR]   (default: target/client-static)
# Prints the path and the stripped size of the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/client-static}
triple=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps the static flag away from build scripts and proc macros (they must stay dynamic).
RUSTFLAGS="-C target-feature=+crt-static" cargo build --profile client -p diskferry-client --target "$triple"
mkdir -p "$out"
cp "${CARGO_TARGET_DIR:-target}/$triple/client/diskferry-client" "$out/diskferry-client"
if ldd "$out/diskferry-client" 2>&1 | grep -q "=>"; then
  echo "error: $out/diskferry-client is dynamically linked" >&2
  exit 1
fi
size=$(stat -c %s "$out/diskferry-client")
echo "$out/diskferry-client: static, stripped, $size bytes ($((size / 1024)) KiB)"
