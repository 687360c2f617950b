#!/usr/bin/env bash
# Reads a 2 GiB disk over loopback and reports MB/s for:
#   diskferry capture (encrypted, the default)     diskferry-client  -> diskferry
#   diskferry capture --plaintext                  same, unencrypted after authentication
#   qemu-img convert -O raw nbd://...  (the peer)  qemu-nbd          -> qemu-img
#   cat FILE > /dev/null               (the limit) local page-cache read
# all in one run, on the same file. Source and outputs live on tmpfs (/dev/shm) so the
# machine's disk does not hide the differences; every tool writes a full 2 GiB raw output.
# The file is random data (no holes, no zeros): every byte crosses the wire.
#
# Usage: bench/wire.sh [RUNS]   (default 5; the best run of each tool is reported: first
# touches of fresh tmpfs pages make single runs noisy on these VMs)
# Needs: qemu-img and qemu-nbd (Debian qemu-utils). Writes bench/out/wire.md.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
size_mib=2048
work=$(mktemp -d /dev/shm/diskferry-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

command -v qemu-img >/dev/null && command -v qemu-nbd >/dev/null || { echo "install qemu-utils first" >&2; exit 1; }
echo "== $(qemu-img --version | head -1); $(nproc) cores" >&2

echo "== building (release, static client)" >&2
cargo build --release --quiet -p diskferry
deploy/build-client.sh "$work/bin" >&2
client="$work/bin/diskferry-client"
diskferry=target/release/diskferry

echo "== generating a ${size_mib} MiB disk of random data" >&2
head -c $((size_mib << 20)) /dev/urandom > "$work/disk.img"
"$diskferry" keygen "$work/key" 2>/dev/null

now() { date +%s.%N; }
start_client() { # name, extra args...; prints the port
  local name=$1; shift
  "$client" --listen 127.0.0.1:0 --key-file "$work/key" --disk "$work/disk.img" "$@" \
    > "$work/$name.out" 2>/dev/null &
  pids+=("$!"); echo "$!" > "$work/$name.pid"
  for _ in $(seq 100); do grep -q listening "$work/$name.out" 2>/dev/null && break; sleep 0.05; done
  sed -n 's/.*127.0.0.1://p' "$work/$name.out"
}
enc_port=$(start_client enc)
plain_port=$(start_client plain --plaintext)
nbd_port=$((20000 + RANDOM % 20000))
qemu-nbd --read-only --persistent --format raw --export-name disk --bind 127.0.0.1 --port "$nbd_port" "$work/disk.img" &
pids+=("$!"); sleep 1

names=("cat FILE > /dev/null (limit)" "diskferry capture (encrypted)" "diskferry capture --plaintext" "qemu-img convert nbd:// (peer)")
run_tool() { # index
  case $1 in
    0) cat "$work/disk.img" ;;
    1) "$diskferry" capture "$work/disk.img@127.0.0.1:$enc_port" "$work/out.raw" --key-file "$work/key" --force --progress none ;;
    2) "$diskferry" capture "$work/disk.img@127.0.0.1:$plain_port" "$work/out.raw" --key-file "$work/key" --force --progress none --plaintext ;;
    3) qemu-img convert -f raw -O raw "nbd://127.0.0.1:$nbd_port/disk" "$work/out.raw" ;;
  esac
}
declare -a t_best
cat "$work/disk.img" > /dev/null # warm the page cache for everyone
# Round-robin: one run of each tool per round, so drift on a shared machine hits all alike.
for round in $(seq "$runs"); do
  for i in 0 1 2 3; do
    rm -f "$work/out.raw"
    t0=$(now); run_tool "$i" >/dev/null 2>&1; t1=$(now)
    t=$(echo "$t1 - $t0" | bc -l)
    if [ -z "${t_best[$i]:-}" ] || [ "$(echo "$t < ${t_best[$i]}" | bc -l)" = 1 ]; then t_best[$i]=$t; fi
    if [ "$i" != 0 ] && ! cmp -s "$work/disk.img" "$work/out.raw"; then echo "${names[$i]}: output differs!" >&2; exit 1; fi
  done
  echo "round $round done" >&2
done
rss_kib=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$(cat "$work/enc.pid")/status")
best=()
for i in 0 1 2 3; do
  mbs=$(echo "($size_mib * 1048576) / ${t_best[$i]} / 1000000" | bc -l)
  printf '%-40s %7.2f s  %7.0f MB/s\n' "${names[$i]}" "${t_best[$i]}" "$mbs" >&2
  best+=("${names[$i]}|${t_best[$i]}|$mbs")
done

mbs_of() { for b in "${best[@]}"; do if [[ $b == "$1|"* ]]; then echo "${b##*|}"; fi; done; }
enc=$(mbs_of "diskferry capture (encrypted)")
plain=$(mbs_of "diskferry capture --plaintext")
peer=$(mbs_of "qemu-img convert nbd:// (peer)")
local_mbs=$(mbs_of "cat FILE > /dev/null (limit)")

mkdir -p bench/out
{
  echo "| reader ($size_mib MiB over loopback, best of $runs) | seconds | MB/s |"
  echo "|---|---:|---:|"
  for b in "${best[@]}"; do IFS='|' read -r n t m <<<"$b"; printf '| %s | %.2f | %.0f |\n' "$n" "$t" "$m"; done
  echo
  printf 'encrypted / peer: %.2fx; plaintext / peer: %.2fx; encrypted / local read: %.2fx\n' \
    "$(echo "$enc / $peer" | bc -l)" "$(echo "$plain / $peer" | bc -l)" "$(echo "$enc / $local_mbs" | bc -l)"
  echo "client peak RSS during the encrypted capture: $((rss_kib / 1024)) MiB; static client: $(stat -c %s "$client") bytes"
} | tee bench/out/wire.md
