#!/usr/bin/env bash
# Recursive listing of an ext4 image holding 100,000 files, cold cache: `diskferry ls -R`
# (our reader, nothing mounted) against `find` on the same image loop-mounted read-only by the
# kernel (the peer). Names only, and long listings (mode, links, owner, size, mtime: every
# inode read) against `find -printf` with the same fields. The page cache is dropped before
# every run, so both read the image from disk. Round-robin, best of ROUNDS.
#
# Usage: bench/browse.sh [ROUNDS]   (default 5). Runs as root (loop mount, drop_caches).
# Needs e2fsprogs and bc. Writes bench/out/browse.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
source bench/lib.sh
bench_init diskferry-browse /var/tmp
work=$bench_work
mnt="$work/mnt"
# Never remove files through the mount: unmount before the work directory goes.
bench_on_exit 'if mountpoint -q "$mnt"; then umount "$mnt" || umount -l "$mnt"; fi' 
cargo build --release --quiet -p diskferry-cli
diskferry=${CARGO_TARGET_DIR:-target}/release/diskferry

echo "== generating 100,000 files in 1,000 directories" >&2
mkdir -p "$work/tree" "$mnt"
python3 - "$work/tree" <<'EOF'
import os, sys
root = sys.argv[1]
for d in range(1000):
    path = os.path.join(root, f"dir{d:04}")
    os.mkdir(path)
    for f in range(100):
        with open(os.path.join(path, f"file{f:03}.txt"), "w") as fh:
            fh.write(f"{d} {f}\n")
EOF
img="$work/files.ext4"
truncate -s 2G "$img"
mkfs.ext4 -q -b 4096 -d "$work/tree" "$img"
rm -rf "$work/tree"
mount -o loop,ro "$img" "$mnt"

cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
declare -A best
time_it() { # key, command...
  local key=$1; shift
  cold
  local t0 t1 t; t0=$(now); "$@" > "$work/$key.out" 2>/dev/null; t1=$(now)
  t=$(echo "$t1 - $t0" | bc -l)
  if [ -z "${best[$key]:-}" ] || [ "$(echo "$t < ${best[$key]}" | bc -l)" = 1 ]; then best[$key]=$t; fi
}
for round in $(seq "$rounds"); do
  time_it df-names "$diskferry" ls -R "$img"
  time_it find-names find "$mnt"
  time_it df-long "$diskferry" ls -l -R "$img"
  time_it find-long find "$mnt" -printf '%M %n %U %G %s %TY-%Tm-%Td %TT %P\n'
  echo "   round $round/$rounds" >&2
done
# Both saw every file: 100,000 files + 1,000 directories (+ lost+found).
ours=$(wc -l < "$work/df-names.out"); theirs=$(($(wc -l < "$work/find-names.out") - 1))
[ "$ours" = "$theirs" ] || { echo "diskferry listed $ours entries, find $theirs" >&2; exit 1; }

mkdir -p bench/out
{
  echo "| list 100k files in ext4, cold cache (best of $rounds) | diskferry s | kernel + find s | diskferry / find |"
  echo "|---|---:|---:|---:|"
  for kind in names long; do
    printf '| %s | %.2f | %.2f | %.2fx |\n' "$kind" "${best[df-$kind]}" "${best[find-$kind]}" \
      "$(echo "${best[df-$kind]} / ${best[find-$kind]}" | bc -l)"
  done
  echo
  echo "Entries listed: $ours by each."
} | tee bench/out/browse.md
