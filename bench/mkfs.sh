#!/usr/bin/env bash
# Builds an ext4 image from a 2 GiB tree of mixed file sizes with `diskferry mkfs ext4` and
# with `mke2fs -t ext4 -d` (the peer), same tree, same size, same place, in one run,
# round-robin, best of ROUNDS. Our image is checked with e2fsck -fn. Tree and images live on
# tmpfs, so the figure is the writers' own cost, not the disk's.
#
# Usage: bench/mkfs.sh [ROUNDS]   (default 3). Needs e2fsprogs and bc. Writes bench/out/mkfs.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
source bench/lib.sh
bench_init diskferry-mkfs
work=$bench_work
cargo build --release --quiet -p diskferry-cli
diskferry=${CARGO_TARGET_DIR:-target}/release/diskferry
echo "== $(mke2fs -V 2>&1 | head -1); $(nproc) cores" >&2

echo "== generating a 2 GiB tree of mixed sizes" >&2
python3 - "$work/tree" <<'EOF'
import os, random, sys
root = sys.argv[1]
random.seed(7)
blob = os.urandom(64 << 20)
def write(path, size):
    with open(path, "wb") as f:
        while size > 0:
            n = min(size, len(blob))
            off = random.randrange(0, len(blob) - n + 1)
            f.write(blob[off:off + n])
            size -= n
total = 0
for d in range(200):
    path = os.path.join(root, f"d{d:03}", f"sub{d % 7}")
    os.makedirs(path, exist_ok=True)
    for i in range(100):                      # 20,000 small files, 1-32 KiB
        n = random.randint(1, 32) << 10
        write(os.path.join(path, f"small{i:03}.dat"), n); total += n
    for i in range(3):                        # 600 medium files, ~1-3 MiB
        n = random.randint(1, 3) << 20
        write(os.path.join(path, f"medium{i}.bin"), n); total += n
big = os.path.join(root, "big")
os.makedirs(big)
i = 0
while total < (2 << 30):                      # the rest in 128 MiB files
    write(os.path.join(big, f"large{i}.img"), 128 << 20); total += 128 << 20; i += 1
print(f"{total >> 20} MiB", file=sys.stderr)
EOF
size=3G
now() { date +%s.%N; }
declare -A best
time_it() { # key, command...
  local key=$1; shift
  rm -f "$work/out.img"
  local t0 t1 t; t0=$(now); "$@" >/dev/null 2>&1; t1=$(now)
  t=$(echo "$t1 - $t0" | bc -l)
  if [ -z "${best[$key]:-}" ] || [ "$(echo "$t < ${best[$key]}" | bc -l)" = 1 ]; then best[$key]=$t; fi
}
for round in $(seq "$rounds"); do
  time_it diskferry "$diskferry" mkfs ext4 "$work/out.img" --from "$work/tree" --size "$size"
  e2fsck -fn "$work/out.img" >/dev/null || { echo "e2fsck found problems in our image" >&2; exit 1; }
  time_it mke2fs sh -c "truncate -s $size '$work/out.img' && mke2fs -q -F -t ext4 -d '$work/tree' '$work/out.img'"
  echo "   round $round/$rounds" >&2
done
mkdir -p bench/out
{
  echo "| ext4 image from a 2 GiB tree (best of $rounds) | diskferry s | mke2fs -d s | diskferry / mke2fs |"
  echo "|---|---:|---:|---:|"
  printf '| 20,600 files + 16 large, %s image | %.2f | %.2f | %.2fx |\n' "$size" "${best[diskferry]}" "${best[mke2fs]}" \
    "$(echo "${best[diskferry]} / ${best[mke2fs]}" | bc -l)"
} | tee bench/out/mkfs.md
