#!/usr/bin/env bash
# Converts a 4 GiB raw disk that is 50% data (random, in 64 MiB runs alternating with holes)
# into qcow2 with `diskferry convert` and with `qemu-img convert -O qcow2` (the peer), in one
# run, round-robin, best of ROUNDS. Also reports the sparseness figure: a 4 GiB raw holding
# 200 MiB of data converted by both tools, file size against data. Outputs are checked with
# qemu-img check and compare. Files live on tmpfs.
#
# Usage: bench/convert.sh [ROUNDS]   (default 5). Needs qemu-utils and bc. Writes bench/out/convert.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
work=$(mktemp -d /dev/shm/diskferry-convert.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "== $(qemu-img --version | head -1); $(nproc) cores" >&2
cargo build --release --quiet -p diskferry
diskferry=target/release/diskferry

make_raw() { # path, data MiB per 128 MiB stripe (of 32 stripes)
  local out=$1 per=$2
  truncate -s 4G "$out"
  for i in $(seq 0 31); do
    head -c $((per << 20)) /dev/urandom | dd of="$out" bs=1M seek=$((i * 128)) conv=notrunc status=none
  done
}
echo "== generating inputs" >&2
make_raw "$work/half.raw" 64      # 2 GiB of data in 4 GiB
make_raw "$work/sparse.raw" 6     # 192 MiB of data in 4 GiB (about 200 MiB)
head -c $((8 << 20)) /dev/urandom | dd of="$work/sparse.raw" bs=1M seek=4000 conv=notrunc status=none
cat "$work/half.raw" "$work/sparse.raw" > /dev/null

now() { date +%s.%N; }
best_df=""; best_q=""
for round in $(seq "$rounds"); do
  rm -f "$work/df.qcow2"; t0=$(now); "$diskferry" convert "$work/half.raw" "$work/df.qcow2" --progress none 2>/dev/null; t1=$(now)
  t=$(echo "$t1 - $t0" | bc -l); if [ -z "$best_df" ] || [ "$(echo "$t < $best_df" | bc -l)" = 1 ]; then best_df=$t; fi
  rm -f "$work/q.qcow2"; t0=$(now); qemu-img convert -f raw -O qcow2 "$work/half.raw" "$work/q.qcow2"; t1=$(now)
  t=$(echo "$t1 - $t0" | bc -l); if [ -z "$best_q" ] || [ "$(echo "$t < $best_q" | bc -l)" = 1 ]; then best_q=$t; fi
  echo "   round $round/$rounds" >&2
done
qemu-img check "$work/df.qcow2" | grep -q "No errors" || { echo "qemu-img check failed" >&2; exit 1; }
qemu-img compare -q -f raw -F qcow2 "$work/half.raw" "$work/df.qcow2" || { echo "compare failed" >&2; exit 1; }

rm -f "$work/df-s.qcow2" "$work/q-s.qcow2"
"$diskferry" convert "$work/sparse.raw" "$work/df-s.qcow2" --progress none 2>/dev/null
qemu-img convert -f raw -O qcow2 "$work/sparse.raw" "$work/q-s.qcow2"
qemu-img compare -q -f raw -F qcow2 "$work/sparse.raw" "$work/df-s.qcow2" || { echo "compare failed" >&2; exit 1; }
data=$(( (6 * 32 + 8) << 20 ))
mkdir -p bench/out
{
  echo "| convert 4 GiB raw, 50% data → qcow2 (best of $rounds) | seconds |"
  echo "|---|---:|"
  printf '| diskferry convert | %.2f |\n| qemu-img convert -O qcow2 (peer) | %.2f |\n' "$best_df" "$best_q"
  printf '\ndiskferry / qemu-img time: %.2fx\n\n' "$(echo "$best_df / $best_q" | bc -l)"
  echo "| 4 GiB raw holding $((data >> 20)) MiB of data → qcow2 | file size | on disk | size / data |"
  echo "|---|---:|---:|---:|"
  for f in df-s q-s; do
    sz=$(stat -c %s "$work/$f.qcow2"); du=$(( $(stat -c %b "$work/$f.qcow2") * 512 ))
    printf '| %s | %d | %d | %.3f |\n' "$([ $f = df-s ] && echo diskferry || echo qemu-img)" "$sz" "$du" "$(echo "$sz / $data" | bc -l)"
  done
} | tee bench/out/convert.md
