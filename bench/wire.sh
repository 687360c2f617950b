#!/usr/bin/env bash
# Reads a 2 GiB disk over loopback and reports MB/s for:
#   diskferry capture (encrypted, the default)     diskferry-client  -> diskferry
#   diskferry capture --plaintext                  same, unencrypted after authentication
#   qemu-img convert -O raw nbd://...  (the peer)  qemu-nbd          -> qemu-img
#   cat FILE > /dev/null               (the limit) local page-cache read
# all in one run, on the same file, in two CPU layouts:
#   shared:  every process on both cores (the two ends compete for CPU);
#   pinned:  exporters (diskferry-client, qemu-nbd) on core 0, readers on core 1 -- the shape
#            of a real capture, where source machine and server have their own CPUs.
# Runs are round-robin (one of each tool per round) and the best round of each is reported,
# because first touches of fresh tmpfs pages make single runs noisy on these VMs.
# Source and outputs live on tmpfs (/dev/shm) so the machine's disk does not hide the
# differences; every reader writes a full 2 GiB raw output, checked with cmp. The data is
# random (no holes, no zeros): every byte crosses the wire.
#
# Usage: bench/wire.sh [ROUNDS]   (default 7). Needs qemu-utils and bc. Writes bench/out/wire.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-7}
size_mib=2048
source bench/lib.sh
bench_init diskferry-bench
work=$bench_work

for tool in qemu-img qemu-nbd bc taskset; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install qemu-utils bc util-linux)" >&2; exit 1; }
done
echo "== $(qemu-img --version | head -1); $(nproc) cores" >&2

echo "== building (release, static client)" >&2
cargo build --release --quiet -p diskferry-cli
deploy/build-client.sh "$work/bin" >&2
client="$work/bin/diskferry-client"
diskferry=${CARGO_TARGET_DIR:-target}/release/diskferry

echo "== generating a ${size_mib} MiB disk of random data" >&2
head -c $((size_mib << 20)) /dev/urandom > "$work/disk.img"
server_key=$("$diskferry" keygen "$work/key" 2>/dev/null) # the public half, for the clients
cat "$work/disk.img" > /dev/null # warm the page cache for everyone

now() { date +%s.%N; }
start_client() { # name, cpu list, extra args...; the client's pid goes to NAME.pid
  local name=$1 cpus=$2; shift 2
  bench_spawn "$name" taskset -c "$cpus" "$client" --listen 127.0.0.1:0 --server-key "$server_key" \
    --disk "$work/disk.img" "$@"
  echo "$bench_last_pid" > "$work/$name.pid"
}

names=("cat FILE > /dev/null (limit)" "diskferry capture (encrypted)" "diskferry capture --plaintext" "qemu-img convert nbd:// (peer)")
results=()
suite() { # label, exporter cpus, reader cpus
  local label=$1 ecpu=$2 rcpu=$3
  local enc_port plain_port nbd_port
  start_client "enc-$label" "$ecpu"
  start_client "plain-$label" "$ecpu" --plaintext
  enc_port=$(bench_wait_port "enc-$label" 127.0.0.1)
  plain_port=$(bench_wait_port "plain-$label" 127.0.0.1)
  nbd_port=$((20000 + RANDOM % 20000))
  bench_spawn "nbd-$label" taskset -c "$ecpu" qemu-nbd --read-only --persistent --format raw \
    --export-name disk --bind 127.0.0.1 --port "$nbd_port" "$work/disk.img"
  sleep 1
  local -a best=()
  for round in $(seq "$rounds"); do
    for i in 0 1 2 3; do
      rm -f "$work/out.raw"
      local t0 t1 t
      t0=$(now)
      case $i in
        0) taskset -c "$rcpu" cat "$work/disk.img" >/dev/null ;;
        1) taskset -c "$rcpu" "$diskferry" capture "$work/disk.img@127.0.0.1:$enc_port" "$work/out.raw" \
             --key-file "$work/key" --force --progress none 2>/dev/null ;;
        2) taskset -c "$rcpu" "$diskferry" capture "$work/disk.img@127.0.0.1:$plain_port" "$work/out.raw" \
             --key-file "$work/key" --force --progress none --plaintext 2>/dev/null ;;
        3) taskset -c "$rcpu" qemu-img convert -f raw -O raw "nbd://127.0.0.1:$nbd_port/disk" "$work/out.raw" ;;
      esac
      t1=$(now)
      t=$(echo "$t1 - $t0" | bc -l)
      if [ -z "${best[$i]:-}" ] || [ "$(echo "$t < ${best[$i]}" | bc -l)" = 1 ]; then best[$i]=$t; fi
      if [ "$i" != 0 ] && ! cmp -s "$work/disk.img" "$work/out.raw"; then
        echo "${names[$i]}: output differs!" >&2; exit 1
      fi
    done
    echo "   $label: round $round/$rounds" >&2
  done
  local rss_kib
  rss_kib=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$(cat "$work/enc-$label.pid")/status")
  for i in 0 1 2 3; do
    results+=("$label|${names[$i]}|${best[$i]}|$(echo "($size_mib * 1048576) / ${best[$i]} / 1000000" | bc -l)")
  done
  results+=("$label|rss|$rss_kib|0")
}

suite shared 0,1 0,1
suite pinned 0 1
bench_stop_all # the exporters of both layouts: nothing is left serving the disk

mbs() { for r in "${results[@]}"; do IFS='|' read -r l n _ m <<<"$r"; if [ "$l" = "$1" ] && [ "$n" = "$2" ]; then echo "$m"; fi; done; }
rss() { for r in "${results[@]}"; do IFS='|' read -r l n k _ <<<"$r"; if [ "$l" = "$1" ] && [ "$n" = rss ]; then echo $((k / 1024)); fi; done; }
mkdir -p bench/out
{
  echo "| reader ($size_mib MiB over loopback, best of $rounds rounds) | shared cores: s | MB/s | one core per side: s | MB/s |"
  echo "|---|---:|---:|---:|---:|"
  for n in "${names[@]}"; do
    ts=""; tp=""
    for r in "${results[@]}"; do
      IFS='|' read -r l nn t _ <<<"$r"
      if [ "$nn" = "$n" ]; then if [ "$l" = shared ]; then ts=$t; else tp=$t; fi; fi
    done
    printf '| %s | %.2f | %.0f | %.2f | %.0f |\n' "$n" "$ts" "$(mbs shared "$n")" "$tp" "$(mbs pinned "$n")"
  done
  echo
  for l in shared pinned; do
    printf '%s: encrypted/peer %.2fx, plaintext/peer %.2fx, encrypted/local read %.2fx; client peak RSS %s MiB\n' "$l" \
      "$(echo "$(mbs $l "${names[1]}") / $(mbs $l "${names[3]}")" | bc -l)" \
      "$(echo "$(mbs $l "${names[2]}") / $(mbs $l "${names[3]}")" | bc -l)" \
      "$(echo "$(mbs $l "${names[1]}") / $(mbs $l "${names[0]}")" | bc -l)" "$(rss $l)"
  done
  echo "static stripped diskferry-client: $(stat -c %s "$client") bytes; $(qemu-img --version | head -1)"
} | tee bench/out/wire.md
