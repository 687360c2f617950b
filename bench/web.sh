#!/usr/bin/env bash
# The web API under load: listing a 10,000-entry directory inside a 4 GiB capture (VHDX, one
# ext4 partition) with `diskferry serve` (GET /api/captures/1/partitions/1/dir, JSON with
# kind, size, mtime, mode, owner of every entry: each inode read through our ext4 reader from
# the VHDX), against nginx's JSON autoindex of the same directory on a kernel loop mount of the
# same filesystem (the peer: names, kinds, sizes, mtimes). wrk measures one client in a loop
# (latency p50/p95) and 50 concurrent clients (requests/s, p50/p95).
#
# Usage: bench/web.sh [SECONDS]   (default 10 per measurement). Runs as root (loop mount).
# Needs wrk, nginx-light, e2fsprogs, gdisk, qemu-utils. Writes bench/out/web.md.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
source bench/lib.sh
bench_init diskferry-web /var/tmp
work=$bench_work
mnt="$work/mnt"
# nginx daemonizes (it is no child of this shell): stop it by its own pid file. Never remove
# files through the mount: unmount before the work directory goes.
bench_on_exit '[ -f "$work/nginx.conf" ] && nginx -c "$work/nginx.conf" -s stop; sleep 1'
bench_on_exit 'if mountpoint -q "$mnt"; then umount "$mnt" || umount -l "$mnt"; fi'
cargo build --release --quiet -p diskferry-cli
diskferry=$(realpath "${CARGO_TARGET_DIR:-target}")/release/diskferry

echo "== a 4 GiB disk: GPT, one ext4 partition with a 10,000-entry directory" >&2
mkdir -p "$work/tree/many" "$work/tree/other" "$mnt" "$work/data/captures"
python3 - "$work/tree" <<'EOF'
import os, sys
root = sys.argv[1]
for i in range(10000):
    with open(os.path.join(root, "many", f"entry-{i:05}.dat"), "w") as fh:
        fh.write("x" * (i % 5000))
with open(os.path.join(root, "other", "big.bin"), "wb") as fh:
    fh.write(os.urandom(256 << 20))
EOF
disk="$work/disk.img"
truncate -s 4G "$disk"
sgdisk -n 1:2048:0 -t 1:8300 "$disk" >/dev/null
start=$((2048 * 512))
part_bytes=$(( $(sgdisk -i 1 "$disk" | awk '/Last sector/ {print $3}') * 512 + 512 - start ))
truncate -s "$part_bytes" "$work/part.ext4"
mkfs.ext4 -q -b 4096 -d "$work/tree" "$work/part.ext4"
dd if="$work/part.ext4" of="$disk" bs=4M seek="$start" oflag=seek_bytes conv=notrunc,sparse status=none
"$diskferry" convert "$disk" "$work/data/captures/bench.vhdx" >/dev/null 2>&1
rm -rf "$work/tree"
mount -o loop,ro "$work/part.ext4" "$mnt"

echo "== servers" >&2
bench_spawn serve "$diskferry" serve --data-dir "$work/data" --listen 127.0.0.1:18481 \
  --agent-listen 127.0.0.1:0 --tftp-listen off
for _ in $(seq 100); do grep -q "listening on" "$work/serve.err" && break; sleep 0.1; done
token=$(cat "$work/data/api-token")
cat > "$work/nginx.conf" <<EOF
# The work directory is private (mktemp): the workers read it as root.
user root;
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  server {
    listen 127.0.0.1:18482;
    root $mnt;
    location / { autoindex on; autoindex_format json; }
  }
}
EOF
nginx -c "$work/nginx.conf"
ours="http://127.0.0.1:18481/api/captures/1/partitions/1/dir?path=/many"
peer="http://127.0.0.1:18482/many/"
# Both list every entry.
curl -s -H "Authorization: Bearer $token" "$ours" > "$work/ours.json"
n_ours=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["entries"]))' "$work/ours.json") ||
  { echo "diskferry answered: $(head -c 300 "$work/ours.json")" >&2; cat "$work/serve.err" >&2; exit 1; }
curl -s "$peer" > "$work/peer.json"
n_peer=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$work/peer.json") ||
  { echo "nginx answered: $(head -c 300 "$work/peer.json")" >&2; exit 1; }
[ "$n_ours" = 10000 ] && [ "$n_peer" = 10000 ] || { echo "listed $n_ours / $n_peer entries" >&2; exit 1; }
size_ours=$(curl -sf -H "Authorization: Bearer $token" "$ours" | wc -c)
size_peer=$(curl -sf "$peer" | wc -c)

cat > "$work/report.lua" <<'EOF'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.1f %.2f %.2f %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, summary.errors.status))
end
EOF
run() { # threads connections url [header]
  local args=(-t "$1" -c "$2" -d "${secs}s" -s "$work/report.lua")
  [ -n "${4:-}" ] && args+=(-H "$4")
  wrk "${args[@]}" "$3" | awk '/^RESULT/ {print $2, $3, $4, $5}'
}
echo "== one client" >&2
read -r o1_rps o1_p50 o1_p95 o1_err < <(run 1 1 "$ours" "Authorization: Bearer $token")
read -r p1_rps p1_p50 p1_p95 p1_err < <(run 1 1 "$peer")
echo "== 50 clients" >&2
read -r o50_rps o50_p50 o50_p95 o50_err < <(run 2 50 "$ours" "Authorization: Bearer $token")
read -r p50_rps p50_p50 p50_p95 p50_err < <(run 2 50 "$peer")
[ "$o1_err$o50_err$p1_err$p50_err" = 0000 ] || echo "non-2xx answers: $o1_err $o50_err $p1_err $p50_err" >&2

mkdir -p bench/out
{
  echo "| list a 10,000-entry directory ($secs s each) | req/s | p50 ms | p95 ms |"
  echo "|---|---:|---:|---:|"
  echo "| diskferry API, 1 client (JSON ${size_ours} B, inside the VHDX) | $o1_rps | $o1_p50 | $o1_p95 |"
  echo "| nginx autoindex, 1 client (JSON ${size_peer} B, kernel mount) | $p1_rps | $p1_p50 | $p1_p95 |"
  echo "| diskferry API, 50 clients | $o50_rps | $o50_p50 | $o50_p95 |"
  echo "| nginx autoindex, 50 clients | $p50_rps | $p50_p50 | $p50_p95 |"
} | tee bench/out/web.md
