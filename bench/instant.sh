#!/usr/bin/env bash
# Time from command to a booted system, for a capture of the e2e tests' GRUB-booted Debian
# (its systemd marker unit prints DISKFERRY-MARKER lines, then powers off). Each row starts
# the clock, makes the capture bootable its own way, boots it under qemu-system-x86_64
# -accel tcg and stops the clock when the VM has printed DISKFERRY-MARKER-END and powered off:
#   export     diskferry export CAPTURE --writable --redo ram:1G, qemu boots nbd://
#   skeleton   diskferry export --files CAPTURE --writable --redo ram:1G (each ext4 synthesized
#              from the capture's files), qemu boots nbd://
#   convert    the restore first, then qemu boots the restored raw file: locally `qemu-img
#              convert -O raw CAPTURE restored.raw`; with LINK, `qemu-img convert -O raw
#              nbd://SERVER/… restored.raw` (the whole capture crosses the link, as a restore
#              from a backup server does)
#   direct     qemu boots the qcow2 file itself with -snapshot (reference: no restore at all,
#              the capture on the VM host's own disk)
# Reports seconds and each row's time over convert's. TCG boots vary by a few seconds.
#
# DATA_GIB=N adds a data partition (ext4, N GiB of random files, not mounted by the system) to
# the disk before it is captured: a machine with data beside its system. A restore copies it
# all; an instant boot reads only what the system touches.
# LINK=RATE (e.g. 1gbit) puts the capture and diskferry on a server namespace and qemu on a
# VM-host namespace, joined by veth with tbf at RATE on both ends; the export is reached
# through socat on the server's address (diskferry's NBD listens on loopback, so it is
# tunnelled there, as an SSH tunnel would). The direct row stays local.
#
# Usage: [DATA_GIB=8] [LINK=1gbit] bench/instant.sh  (as root with LINK; needs qemu-system-x86,
# qemu-utils, socat; the Debian tarball is built by the e2e fixture on first use). Writes
# bench/out/instant.md.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in qemu-system-x86_64 qemu-img socat; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
source bench/lib.sh
bench_init diskferry-instant /var/tmp
work=$bench_work
DATA_GIB=${DATA_GIB:-0}
LINK=${LINK:-}
diskferry=${CARGO_TARGET_DIR:-target}/release/diskferry
cargo build --release --quiet -p diskferry-cli
now() { date +%s.%N; }

# --- where things run ----------------------------------------------------------------------------
srv_ip=127.0.0.1
in_srv() { "$@"; }
in_vm() { "$@"; }
if [ -n "$LINK" ]; then
  srv=dfisrv$$ vm=dfivm$$ srv_ip=10.78.0.1
  bench_net "$srv" "$vm" visrv ivm "$srv_ip" 10.78.0.2
  bench_rate "$srv" visrv "$LINK"
  bench_rate "$vm" ivm "$LINK"
  in_srv() { ip netns exec "$srv" "$@"; }
  in_vm() { ip netns exec "$vm" "$@"; }
fi

# --- the disk ------------------------------------------------------------------------------------
echo "== building the Debian disk" >&2
cargo run --quiet -p diskferry-e2e --example installer_disk -- "$work/debian.raw"
data_note=""
if [ "$DATA_GIB" -gt 0 ]; then
  echo "== adding a ${DATA_GIB} GiB data partition of random files" >&2
  start=$((3072 << 20)) size=$(((DATA_GIB + 1) << 30))
  truncate -s $((start + size + (1 << 20))) "$work/debian.raw"
  echo "start=$((start / 512)), size=$((size / 512)), type=83" | sfdisk -q --append "$work/debian.raw"
  mke2fs -q -t ext4 -L data -E offset=$start "$work/debian.raw" $((size >> 10))k
  mkdir -p "$work/mnt"
  mount -o loop,offset=$start,sizelimit=$size "$work/debian.raw" "$work/mnt"
  bench_on_exit "umount '$work/mnt' 2>/dev/null || true"
  for i in $(seq $((DATA_GIB * 8))); do
    head -c $((128 << 20)) /dev/urandom >"$work/mnt/data-$i.bin"
  done
  umount "$work/mnt"
  data_note=", plus a ${DATA_GIB} GiB data partition of random files"
fi
"$diskferry" capture "$work/debian.raw" "$work/capture.qcow2" --progress none >/dev/null 2>&1
rm -f "$work/debian.raw"

# boot RUNNER LOG DRIVE: boots (where RUNNER runs commands) until the VM powers off (at most
# 900 s); fails without the marker.
boot() {
  local run=$1
  shift
  "$run" timeout 900 qemu-system-x86_64 -accel tcg -m 1024 -nographic -no-reboot -nic none \
    -monitor none -serial "file:$1" -drive "$2" </dev/null >/dev/null 2>&1 || true
  grep -q DISKFERRY-MARKER-END "$1" || { echo "no marker in $1" >&2; exit 1; }
}

# serve NAME ARGS...: starts diskferry export on the server side; sets `url` to the NBD URL
# the VM host uses once it serves (through socat on the server's address with LINK). Never
# called inside $(…): what it starts must stay this shell's children, for the cleanup.
serve() {
  local name=$1
  shift
  bench_spawn "$name" in_srv "$diskferry" export "$@" --listen 127.0.0.1:0
  for _ in $(seq 1200); do
    grep -q nbd:// "$work/$name.out" 2>/dev/null && break
    sleep 0.05
  done
  url=$(grep -o 'nbd://[^ ,]*' "$work/$name.out" | head -n1)
  [ -n "$url" ] || { echo "$name did not serve: $(cat "$work/$name.err")" >&2; exit 1; }
  if [ -n "$LINK" ]; then
    local port=${url#nbd://127.0.0.1:}
    port=${port%%/*}
    bench_spawn "$name-tunnel" in_srv socat "TCP-LISTEN:10809,bind=$srv_ip,reuseaddr,fork" \
      "TCP:127.0.0.1:$port"
    bench_wait_listen in_srv 10809 >/dev/null
    url="nbd://$srv_ip:10809/${url#nbd://127.0.0.1:"$port"/}"
  fi
}

declare -A secs
t0=$(now); serve export "$work/capture.qcow2" --writable --redo ram:1G
boot in_vm "$work/export.log" "file=$url,format=raw,if=virtio"
secs[export]=$(echo "$(now) - $t0" | bc -l); bench_stop_all

t0=$(now); serve skeleton --files "$work/capture.qcow2" --writable --redo ram:1G
boot in_vm "$work/skeleton.log" "file=$url,format=raw,if=virtio"
secs[skeleton]=$(echo "$(now) - $t0" | bc -l); bench_stop_all

t0=$(now)
if [ -n "$LINK" ]; then
  serve restore "$work/capture.qcow2"
  in_vm qemu-img convert -O raw "$url" "$work/restored.raw"
  bench_stop_all
else
  qemu-img convert -O raw "$work/capture.qcow2" "$work/restored.raw"
fi
t1=$(now)
boot in_vm "$work/convert.log" "file=$work/restored.raw,format=raw,if=virtio"
secs[convert]=$(echo "$(now) - $t0" | bc -l)
restore=$(echo "$t1 - $t0" | bc -l)
rm -f "$work/restored.raw"

t0=$(now)
boot env "$work/direct.log" "file=$work/capture.qcow2,format=qcow2,if=virtio,snapshot=on"
secs[direct]=$(echo "$(now) - $t0" | bc -l)

out=bench/out/instant.md
mkdir -p bench/out
{
  echo "bench/instant.sh, $(date -u '+%Y-%m-%d %H:%M') UTC, $(nproc) cores (TCG), diskferry $(git rev-parse --short HEAD), $(qemu-system-x86_64 --version | head -1)"
  echo
  echo "Capture: $(qemu-img info "$work/capture.qcow2" | awk -F': ' '/virtual size/{print $2}'), $(du -h "$work/capture.qcow2" | cut -f1) on disk (Debian 12 minbase$data_note); link: ${LINK:-none (all local)}"
  echo
  echo "| row | s to the booted marker | / convert then boot |"
  echo "|---|---:|---:|"
  for row in export skeleton convert direct; do
    printf '| %s | %.1f | %.2f× |\n' "$row" "${secs[$row]}" "$(echo "${secs[$row]} / ${secs[convert]}" | bc -l)"
  done
  echo
  printf 'The restore alone (convert row, before its boot) took %.1f s.\n' "$restore"
} | tee "$out"
