#!/usr/bin/env bash
# Time from command to a booted system, for a capture of the e2e tests' GRUB-booted Debian
# (its systemd marker unit prints DISKFERRY-MARKER lines, then powers off). Each row starts
# the clock, makes the capture bootable its own way, boots it under qemu-system-x86_64
# -accel tcg and stops the clock when the VM has printed DISKFERRY-MARKER-END and powered off:
#   export     diskferry export CAPTURE --writable --redo ram:1G, qemu boots nbd://
#   skeleton   diskferry export --files CAPTURE --writable --redo ram:1G (each ext4 synthesized
#              from the capture's files), qemu boots nbd://
#   convert    qemu-img convert -O raw CAPTURE restored.raw (a restore to a disk file, what a
#              "restore, then run" takes), then qemu boots the raw file
#   direct     qemu boots the qcow2 file itself with -snapshot (reference: no restore at all)
# Reports seconds and each row's time over convert's. TCG boots vary by a few seconds.
#
# Usage: bench/instant.sh  (needs qemu-system-x86, qemu-utils; the Debian tarball is built by
# the e2e fixture on first use). Writes bench/out/instant.md.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in qemu-system-x86_64 qemu-img; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
source bench/lib.sh
bench_init diskferry-instant /var/tmp
work=$bench_work
diskferry=${CARGO_TARGET_DIR:-target}/release/diskferry
cargo build --release --quiet -p diskferry-cli
echo "== building the Debian disk" >&2
cargo run --quiet -p diskferry-e2e --example installer_disk -- "$work/debian.raw"
"$diskferry" capture "$work/debian.raw" "$work/capture.qcow2" --progress none >/dev/null 2>&1
now() { date +%s.%N; }

# boot LOG DRIVE: boots until the VM powers off (at most 600 s); fails without the marker.
boot() {
  timeout 600 qemu-system-x86_64 -accel tcg -m 1024 -nographic -no-reboot -nic none \
    -monitor none -serial "file:$1" -drive "$2" </dev/null >/dev/null 2>&1 || true
  grep -q DISKFERRY-MARKER-END "$1" || { echo "no marker in $1" >&2; exit 1; }
}

# serve NAME ARGS...: starts diskferry export, prints its NBD URL once it serves.
serve() {
  local name=$1
  shift
  bench_spawn "$name" "$diskferry" export "$@" --listen 127.0.0.1:0
  for _ in $(seq 600); do
    grep -q nbd:// "$work/$name.out" 2>/dev/null && break
    sleep 0.05
  done
  grep -o 'nbd://[^ ,]*' "$work/$name.out" | head -n1
}

declare -A secs
t0=$(now); url=$(serve export "$work/capture.qcow2" --writable --redo ram:1G)
boot "$work/export.log" "file=$url,format=raw,if=virtio"
secs[export]=$(echo "$(now) - $t0" | bc -l); bench_stop_all

t0=$(now); url=$(serve skeleton --files "$work/capture.qcow2" --writable --redo ram:1G)
boot "$work/skeleton.log" "file=$url,format=raw,if=virtio"
secs[skeleton]=$(echo "$(now) - $t0" | bc -l); bench_stop_all

t0=$(now)
qemu-img convert -O raw "$work/capture.qcow2" "$work/restored.raw"
boot "$work/convert.log" "file=$work/restored.raw,format=raw,if=virtio"
secs[convert]=$(echo "$(now) - $t0" | bc -l)

t0=$(now)
boot "$work/direct.log" "file=$work/capture.qcow2,format=qcow2,if=virtio,snapshot=on"
secs[direct]=$(echo "$(now) - $t0" | bc -l)

out=bench/out/instant.md
mkdir -p bench/out
{
  echo "bench/instant.sh, $(date -u '+%Y-%m-%d %H:%M') UTC, $(nproc) cores (TCG), diskferry $(git rev-parse --short HEAD), $(qemu-system-x86_64 --version | head -1)"
  echo
  echo "Capture: $(qemu-img info "$work/capture.qcow2" | awk -F': ' '/virtual size/{print $2}'), $(du -h "$work/capture.qcow2" | cut -f1) on disk"
  echo
  echo "| row | s to the booted marker | / convert then boot |"
  echo "|---|---:|---:|"
  for row in export skeleton convert direct; do
    printf '| %s | %.1f | %.2f× |\n' "$row" "${secs[$row]}" "$(echo "${secs[$row]} / ${secs[convert]}" | bc -l)"
  done
} | tee "$out"
