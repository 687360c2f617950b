#!/usr/bin/env bash
# Converts a 4 GiB raw disk that is 50% data (random, in 64 MiB runs alternating with holes)
# into qcow2 and into VHDX with `diskferry convert` and with `qemu-img convert` (the peer), in
# one run, round-robin, best of ROUNDS. Also reports the sparseness figure: a 4 GiB raw holding
# 200 MiB of data converted by both tools, file size against data. Outputs are checked with
# qemu-img check and compare. Files live on tmpfs.
#
# Usage: bench/convert.sh [ROUNDS]   (default 5). Needs qemu-utils and bc. Writes bench/out/convert.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
source bench/lib.sh
bench_init diskferry-convert
work=$bench_work
echo "== $(qemu-img --version | head -1); $(nproc) cores" >&2
cargo build --release --quiet -p diskferry-cli
diskferry=${CARGO_TARGET_DIR:-target}/release/diskferry

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
declare -A best
time_it() { # key, command...
  local key=$1; shift
  local t0 t1 t; t0=$(now); "$@" >/dev/null 2>&1; t1=$(now)
  t=$(echo "$t1 - $t0" | bc -l)
  if [ -z "${best[$key]:-}" ] || [ "$(echo "$t < ${best[$key]}" | bc -l)" = 1 ]; then best[$key]=$t; fi
}
for round in $(seq "$rounds"); do
  for fmt in qcow2 vhdx; do
    rm -f "$work/df.$fmt"; time_it "df-$fmt" "$diskferry" convert "$work/half.raw" "$work/df.$fmt" --progress none
    rm -f "$work/q.$fmt"; time_it "q-$fmt" qemu-img convert -f raw -O "$fmt" "$work/half.raw" "$work/q.$fmt"
  done
  echo "   round $round/$rounds" >&2
done
for fmt in qcow2 vhdx; do
  qemu-img check -f "$fmt" "$work/df.$fmt" | grep -q "No errors" || { echo "qemu-img check $fmt failed" >&2; exit 1; }
  qemu-img compare -q -f raw -F "$fmt" "$work/half.raw" "$work/df.$fmt" || { echo "compare $fmt failed" >&2; exit 1; }
  rm -f "$work/df-s.$fmt" "$work/q-s.$fmt"
  "$diskferry" convert "$work/sparse.raw" "$work/df-s.$fmt" --progress none 2>/dev/null
  qemu-img convert -f raw -O "$fmt" "$work/sparse.raw" "$work/q-s.$fmt"
  qemu-img compare -q -f raw -F "$fmt" "$work/sparse.raw" "$work/df-s.$fmt" || { echo "compare $fmt failed" >&2; exit 1; }
done
data=$(( (6 * 32 + 8) << 20 ))
mkdir -p bench/out
{
  echo "| convert 4 GiB raw, 50% data (best of $rounds) | diskferry s | qemu-img s | diskferry / qemu-img |"
  echo "|---|---:|---:|---:|"
  for fmt in qcow2 vhdx; do
    printf '| → %s | %.2f | %.2f | %.2fx |\n' "$fmt" "${best[df-$fmt]}" "${best[q-$fmt]}" "$(echo "${best[df-$fmt]} / ${best[q-$fmt]}" | bc -l)"
  done
  echo
  echo "| 4 GiB raw holding $((data >> 20)) MiB of data → | file size | on disk | on disk / data |"
  echo "|---|---:|---:|---:|"
  for fmt in qcow2 vhdx; do
    for who in df q; do
      f="$work/$who-s.$fmt"; sz=$(stat -c %s "$f"); du=$(( $(stat -c %b "$f") * 512 ))
      printf '| %s by %s | %d | %d | %.3f |\n' "$fmt" "$([ $who = df ] && echo diskferry || echo qemu-img)" "$sz" "$du" "$(echo "$du / $data" | bc -l)"
    done
  done
} | tee bench/out/convert.md
