#!/usr/bin/env bash
# Capture of a partitioned disk over loopback, filesystem-aware, against peers, in one run:
# a GPT disk with one ext4 partition about 30% used by mixed file sizes, served by the static
# diskferry-client (encrypted), captured to VHDX with `--mode files` and `--mode blocks`,
# against (a) `qemu-img convert -O vhdx` of the raw disk (a sector copy of everything that is
# not a hole), (b) `partclone.ext4 -c` of the partition (the used-block peer), and (c) reading
# the used bytes locally with dd (the limit). Also the cost-follows-used-bytes check: the same
# data on a disk 4 times larger. Round-robin, best of ROUNDS; time and output size per tool.
#
# Usage: bench/capture.sh [ROUNDS]   (default 3). Needs qemu-utils, partclone, e2fsprogs, gdisk,
# bc. Runs as root (nothing is mounted). Writes bench/out/capture.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
source bench/lib.sh
bench_init diskferry-capture
work=$bench_work
for tool in qemu-img partclone.ext4 mkfs.ext4 sgdisk bc; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
echo "== $(qemu-img --version | head -1); $(partclone.ext4 -v 2>&1 | head -1); $(nproc) cores" >&2
cargo build --release --quiet -p diskferry-cli
deploy/build-client.sh "$work/bin" >&2
client="$work/bin/diskferry-client"
diskferry=${CARGO_TARGET_DIR:-target}/release/diskferry
server_key=$("$diskferry" keygen "$work/key" 2>/dev/null) # the public half, for the clients

echo "== generating ~1.2 GiB of mixed files" >&2
python3 - "$work/tree" <<'EOF'
import os, random, sys
root = sys.argv[1]
random.seed(11)
blob = os.urandom(32 << 20)
def write(path, size):
    with open(path, "wb") as f:
        while size > 0:
            n = min(size, len(blob)); off = random.randrange(0, len(blob) - n + 1)
            f.write(blob[off:off + n]); size -= n
total = 0
for d in range(100):
    p = os.path.join(root, f"d{d:03}"); os.makedirs(p)
    for i in range(100):
        n = random.randint(1, 64) << 10; write(os.path.join(p, f"s{i:03}"), n); total += n
    for i in range(2):
        n = random.randint(1, 4) << 20; write(os.path.join(p, f"m{i}"), n); total += n
os.makedirs(os.path.join(root, "big"))
i = 0
while total < (1200 << 20):
    write(os.path.join(root, "big", f"l{i}"), 64 << 20); total += 64 << 20; i += 1
print(f"{total >> 20} MiB in files", file=sys.stderr)
EOF
make_disk() { # path, disk size, partition size
  local disk=$1 size=$2 part=$3
  truncate -s "$size" "$disk"
  sgdisk -n1:2048:+"$part" -t1:8300 "$disk" >/dev/null
  sgdisk -p "$disk" | grep -q '^   1 ' || { echo "sgdisk made no partition on $disk" >&2; exit 1; }
  truncate -s "$part" "$work/part.ext4"
  mkfs.ext4 -q -F -d "$work/tree" "$work/part.ext4"
  dd if="$work/part.ext4" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
}
make_disk "$work/disk.img" 4G 3990M
make_disk "$work/big.img" 16G 3990M
used=$(dumpe2fs -h "$work/part.ext4" 2>/dev/null | awk -F: '/^Block count/{b=$2} /^Free blocks/{f=$2} /^Block size/{s=$2} END{print (b-f)*s}')
echo "== used bytes in the partition: $((used >> 20)) MiB" >&2
cat "$work/disk.img" "$work/big.img" "$work/part.ext4" > /dev/null

bench_spawn client "$client" --listen 127.0.0.1:0 --server-key "$server_key" --disk "$work/disk.img"
bench_spawn client-big "$client" --listen 127.0.0.1:0 --server-key "$server_key" --disk "$work/big.img"
port=$(bench_wait_port client 127.0.0.1)
port_big=$(bench_wait_port client-big 127.0.0.1)

now() { date +%s.%N; }
declare -A best size
time_it() { # key, output file (- for none), command...
  local key=$1 out=$2; shift 2
  [ "$out" = - ] || rm -f "$out"
  local t0 t1 t; t0=$(now); bench_run "$@" >/dev/null 2>&1; t1=$(now)
  t=$(echo "$t1 - $t0" | bc -l)
  if [ -z "${best[$key]:-}" ] || [ "$(echo "$t < ${best[$key]}" | bc -l)" = 1 ]; then best[$key]=$t; fi
  if [ "$out" != - ] && [ -e "$out" ]; then size[$key]=$(( $(stat -c %b "$out") * 512 )); else size[$key]=$used; fi
}
k=(--key-file "$work/key")
"$diskferry" inspect "$work/disk.img" | grep "partition table: gpt" >/dev/null || { echo "no GPT on the source" >&2; exit 1; }
for round in $(seq "$rounds"); do
  time_it files "$work/f.vhdx" "$diskferry" capture "$work/disk.img@127.0.0.1:$port" "$work/f.vhdx" --mode files "${k[@]}"
  time_it blocks "$work/b.vhdx" "$diskferry" capture "$work/disk.img@127.0.0.1:$port" "$work/b.vhdx" --mode blocks "${k[@]}"
  time_it files16 "$work/f16.vhdx" "$diskferry" capture "$work/big.img@127.0.0.1:$port_big" "$work/f16.vhdx" --mode files "${k[@]}"
  time_it qemu "$work/q.vhdx" qemu-img convert -f raw -O vhdx "$work/disk.img" "$work/q.vhdx"
  time_it partclone "$work/p.img" partclone.ext4 -c -q -s "$work/part.ext4" -o "$work/p.img"
  time_it local - dd if="$work/part.ext4" of=/dev/null bs=4M count=$((used / (4 << 20)))
  echo "   round $round/$rounds" >&2
done
"$diskferry" verify "$work/disk.img" "$work/f.vhdx" >/dev/null 2>&1 || { echo "files capture does not verify" >&2; exit 1; }
"$diskferry" verify "$work/disk.img" "$work/b.vhdx" >/dev/null 2>&1 || { echo "blocks capture does not verify" >&2; exit 1; }
bench_stop_all # the clients: nothing is left serving the disks
mkdir -p bench/out
rate() { echo "$used / ${best[$1]} / 1000000" | bc -l; }
{
  echo "| capture, $((used >> 20)) MiB used of a 4 GiB disk (best of $rounds) | s | output on disk | MB/s of used bytes |"
  echo "|---|---:|---:|---:|"
  for key in files blocks qemu partclone local files16; do
    case $key in
      files) label="diskferry --mode files (over loopback, encrypted)";;
      blocks) label="diskferry --mode blocks (over loopback, encrypted)";;
      qemu) label="qemu-img convert -O vhdx (raw disk, local)";;
      partclone) label="partclone.ext4 -c (partition, local)";;
      local) label="dd of the used bytes (local, the limit)";;
      files16) label="diskferry --mode files, same data on a 16 GiB disk";;
    esac
    printf '| %s | %.2f | %s MiB | %.0f |\n' "$label" "${best[$key]}" "$(( ${size[$key]} >> 20 ))" "$(rate $key)"
  done
  echo
  printf 'files / partclone time: %.2fx; blocks rate / local rate: %.2fx; 16 GiB / 4 GiB disk (files): %.2fx\n' \
    "$(echo "${best[files]} / ${best[partclone]}" | bc -l)" \
    "$(echo "${best[local]} / ${best[blocks]}" | bc -l)" \
    "$(echo "${best[files16]} / ${best[files]}" | bc -l)"
} | tee bench/out/capture.md
