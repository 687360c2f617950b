#!/usr/bin/env bash
# Serving a capture over NBD: diskferry export against qemu-nbd exporting the same qcow2, in
# one run. The image: a 2 GiB qcow2 (64 KiB clusters) holding 1 GiB of random data, written by
# qemu-io in scattered 1 MiB pieces, so reads cross the cluster tables. Rows, each with both
# servers on loopback:
#   rand4k   qemu-img bench, 4 KiB reads, queue depth 16, one connection, the offsets stepping
#            by a prime number of 4 KiB blocks around the image (scattered, not sequential)
#   seq1m    qemu-img bench, 1 MiB sequential reads, queue depth 8
#   copy     nbdcopy of the whole export to /dev/null (four connections, block status first)
# Reports seconds, operations per second and diskferry's speed relative to qemu-nbd (>1: faster).
#
# Usage: bench/nbd.sh  (needs qemu-utils and libnbd-bin). Writes bench/out/nbd.md.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in qemu-img qemu-io qemu-nbd nbdcopy; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install qemu-utils libnbd-bin)" >&2; exit 1; }
done
source bench/lib.sh
bench_init diskferry-nbd
work=$bench_work
diskferry=${CARGO_TARGET_DIR:-target}/release/diskferry
cargo build --release --quiet -p diskferry-cli

image=$work/disk.qcow2
qemu-img create -q -f qcow2 "$image" 2G
for i in $(seq 0 1023); do
  echo "write -P $((i % 250 + 1)) $(((i * 2 % 2048) + (i % 2)))M 1M"
done | sed 's/^/-c\n/' | tr '\n' '\0' | xargs -0 qemu-io -f qcow2 "$image" >/dev/null
# Random content instead of patterns in the first 256 MiB, so nothing is trivially cacheable.
head -c $((256 << 20)) /dev/urandom >"$work/rand.bin"
qemu-io -f qcow2 -c "write -s $work/rand.bin 0 256M" "$image" >/dev/null
rm "$work/rand.bin"

now() { date +%s.%N; }
start_servers() {
  bench_spawn df "$diskferry" export "$image" --listen 127.0.0.1:10830 --name disk
  bench_spawn qn qemu-nbd --read-only --persistent --shared=8 --port 10831 --bind 127.0.0.1 \
    --export-name disk -f qcow2 "$image"
  for _ in $(seq 100); do
    grep -q nbd:// "$work/df.out" 2>/dev/null && nbdinfo --size nbd://127.0.0.1:10831/disk >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "servers did not start: $(cat "$work/df.err" "$work/qn.err")" >&2
  exit 1
}

# time_it SECONDS_VAR COMMAND...
time_it() {
  local t0
  t0=$(now)
  "${@:2}" >/dev/null
  printf -v "$1" '%.2f' "$(echo "$(now) - $t0" | bc -l)"
}

row() { # name ops command-with-URL-placeholder
  local name=$1 ops=$2 cmd=$3 df qn
  time_it df bash -c "${cmd//URL/nbd://127.0.0.1:10830/disk}"
  time_it qn bash -c "${cmd//URL/nbd://127.0.0.1:10831/disk}"
  printf '| %s | %s | %.0f | %s | %.0f | %.2f× |\n' "$name" "$df" "$(echo "$ops / $df" | bc -l)" \
    "$qn" "$(echo "$ops / $qn" | bc -l)" "$(echo "$qn / $df" | bc -l)"
}

start_servers
out=bench/out/nbd.md
mkdir -p bench/out
{
  echo "bench/nbd.sh, $(date -u '+%Y-%m-%d %H:%M') UTC, $(nproc) cores, diskferry $(git rev-parse --short HEAD), $(qemu-nbd --version | head -1)"
  echo
  echo "| row | diskferry s | ops/s | qemu-nbd s | ops/s | diskferry speed / qemu-nbd |"
  echo "|---|---:|---:|---:|---:|---:|"
  for pass in 1 2; do
    row "rand4k (pass $pass)" 200000 "qemu-img bench -f raw -c 200000 -d 16 -s 4096 -S $((7919 * 4096)) URL"
  done
  row seq1m 2048 "qemu-img bench -f raw -c 2048 -d 8 -s 1M -S 1M URL"
  row copy 1 "nbdcopy URL null:"
} | tee "$out"
