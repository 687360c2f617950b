#!/usr/bin/env bash
# Captures over an emulated network, against the peers, in one run: two network namespaces
# (source and server) joined by a veth pair, 10.77.0.1/24 (source) and 10.77.0.2/24 (server),
# each veth end rate-limited with tbf (1 Gbit/s, then 10 Gbit/s). Per link and per source disk,
# every row moves the disk from the source namespace to the server namespace:
#   diskferry   diskferry-client --listen in the source ns; diskferry capture into qcow2 in the
#               server ns (encrypted, the default mode), checked with `diskferry verify`
#   clonezilla  partclone.ext4 -c | zstd -3 -T0 | socat -> socat TCP-LISTEN > file
#   fog         partclone.ext4 -c | pigz -6 | socat -> socat TCP-LISTEN > file
#   nbd         qemu-nbd --read-only in the source ns; qemu-img convert -O qcow2 nbd:// in the
#               server ns (virt-p2v's path), checked with `qemu-img compare`
#   incremental diskferry capture --base: a base capture of the disk with its chunk map
#               (untimed; its time is in the note), then the timed incremental capture of a
#               copy of the disk with a 1 % change (the Debian: a line appended to every 100th
#               file by the kernel, through a loop mount; random: 20 MiB rewritten in 20
#               places), checked with `diskferry verify --follow-backing`
#   deploy      diskferry deploy of the base capture onto a zeroed disk served by
#               `diskferry-client --allow-write` in the source ns, checked with `diskferry verify`
#   delta_deploy  diskferry deploy of the incremental capture onto that disk (it holds the base
#               now): only chunks that differ are sent; checked with `diskferry verify`
# Source disks: (a) a Debian 12 install (the e2e tests' cached debootstrap tarball as an ext4
# root on an MBR disk with swap in a logical partition), (b) 2 GiB of random data (the
# incompressible control; partclone.dd stands in for partclone.ext4 there, as Clonezilla does
# for a partition it has no filesystem module for). Disks are written in full (no holes), as
# a real disk is: no tool may skip unallocated ranges by asking the file system for holes.
# Per row: seconds, bytes on the wire both ways (veth counters), wire MB/s, time / diskferry's.
# Before the rows, a raw TCP transfer (dd | socat) measures what the tbf link really carries.
#
# Usage: bench/net.sh            (root; both links; env LINKS="1gbit" for one, SOURCES="random")
# Needs iproute2, socat, partclone, zstd, pigz, qemu-utils, e2fsprogs, fdisk, bc; the Debian
# tarball in /var/cache/diskferry-tests (made by the e2e test `real_machine`, see
# tests/src/debian.rs). Writes bench/out/net.md. Everything it starts stops on every exit.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench/net.sh must run as root: it creates network namespaces, a veth pair and tbf" \
    "qdiscs (try: sudo bench/net.sh)" >&2
  exit 1
fi
for tool in ip tc socat partclone.ext4 partclone.dd zstd pigz qemu-nbd qemu-img sfdisk mke2fs \
  mkswap bc ss; do
  command -v "$tool" >/dev/null || {
    echo "missing $tool (apt-get install iproute2 socat partclone zstd pigz qemu-utils e2fsprogs fdisk bc)" >&2
    exit 1
  }
done
tarball=$(ls -t "${DISKFERRY_TEST_CACHE:-/var/cache/diskferry-tests}"/debian-*.tar 2>/dev/null | head -n1 || true)
[ -n "$tarball" ] || {
  echo "no Debian tarball in /var/cache/diskferry-tests: run the e2e test real_machine once" \
    "(cargo nextest run -p diskferry-e2e -E 'test(/real_machine/)')" >&2
  exit 1
}
links=${LINKS:-1gbit 10gbit}
sources=${SOURCES:-debian random}
rows=(diskferry clonezilla fog nbd incremental deploy delta_deploy)

source bench/lib.sh
bench_init diskferry-net
work=$bench_work
src=dfsrc$$
srv=dfsrv$$
src_ip=10.77.0.1
srv_ip=10.77.0.2

diskferry=${CARGO_TARGET_DIR:-target}/release/diskferry
client=$work/bin/diskferry-client
now() { date +%s.%N; }
in_src() { ip netns exec "$src" "$@"; }
in_srv() { ip netns exec "$srv" "$@"; }

echo "== building (release, static client)" >&2
cargo build --release --quiet -p diskferry-cli
deploy/build-client.sh "$work/bin" >&2
server_key=$("$diskferry" keygen "$work/key" 2>/dev/null) # the public half, for the clients

# --- network -----------------------------------------------------------------------------------
make_net() { bench_net "$src" "$srv" vsrc vsrv "$src_ip" "$srv_ip"; }

# set_link RATE (1gbit, 10gbit): tbf on both veth ends (lib.sh's bench_rate).
set_link() {
  bench_rate "$src" vsrc "$1"
  bench_rate "$srv" vsrv "$1"
}

# wire_bytes: source→server and server→source bytes so far (the source veth's counters).
wire_bytes() {
  in_src cat /sys/class/net/vsrc/statistics/tx_bytes /sys/class/net/vsrc/statistics/rx_bytes |
    paste -sd' '
}

# --- source disks ------------------------------------------------------------------------------
# make_debian: the installer's layout (tests/src/debian.rs): ext4 root from 1 MiB (2815 MiB),
# an extended partition from 2816 MiB holding swap (255 MiB) 1 MiB into it; 3 GiB disk.
make_debian() {
  local tree=$work/tree
  mkdir -p "$tree"
  tar --numeric-owner --xattrs -C "$tree" -xf "$tarball"
  mke2fs -q -t ext4 -b 4096 -d "$tree" -L debian-root "$work/root.ext4" 2815M >/dev/null
  rm -rf "$tree"
  truncate -s 255M "$work/swap.img"
  mkswap -q -L debian-swap "$work/swap.img"
  dd if=/dev/zero of="$work/debian.img" bs=1M count=3072 status=none
  sfdisk -q "$work/debian.img" <<EOF
label: dos
unit: sectors
start=2048, size=$((2815 * 2048)), type=83, bootable
start=$((2816 * 2048)), type=5
start=$((2817 * 2048)), size=$((255 * 2048)), type=82
EOF
  dd if="$work/root.ext4" of="$work/debian.img" bs=1M seek=1 conv=notrunc status=none
  dd if="$work/swap.img" of="$work/debian.img" bs=1M seek=2817 conv=notrunc status=none
  rm -f "$work/root.ext4" "$work/swap.img"
  # The partition as its own file, cut out of the disk, for partclone.
  dd if="$work/debian.img" of="$work/debian.part" bs=1M skip=1 count=2815 conv=sparse status=none
  local used
  used=$(dumpe2fs -h "$work/debian.part" 2>/dev/null |
    awk -F: '/^Block count/{b=$2} /^Free blocks/{f=$2} END{print (b-f)*4096}')
  echo "== Debian disk: 3072 MiB, root ext4 2815 MiB with $((used >> 20)) MiB used (journal included), swap 255 MiB" >&2
  echo "Debian 12 minbase install ($(basename "$tarball")): 3 GiB MBR disk, ext4 root 2815 MiB, $((used >> 20)) MiB used incl. journal; swap 255 MiB" >"$work/debian.desc"
}
make_random() {
  head -c $((2048 << 20)) /dev/urandom >"$work/random.img"
  echo "2 GiB of random data, no partition table (incompressible control)" >"$work/random.desc"
}

# The same disks after a 1 % change, for the incremental capture and the delta deploy.
change_debian() {
  cp "$work/debian.img" "$work/debian.changed.img"
  local mnt=$work/mnt n
  mkdir -p "$mnt"
  mount -o loop,offset=$((1 << 20)),sizelimit=$((2815 << 20)) "$work/debian.changed.img" "$mnt"
  n=$(find "$mnt" -xdev -type f | sort | awk 'NR % 100 == 0' | while read -r f; do
    echo "changed by bench/net.sh" >>"$f"
    echo x
  done | wc -l)
  umount "$mnt"
  echo "a line appended to $n files (every 100th)" >"$work/debian.change"
}
change_random() {
  cp "$work/random.img" "$work/random.changed.img"
  local i
  for i in $(seq 0 19); do
    dd if=/dev/urandom of="$work/random.changed.img" bs=1M count=1 seek=$((i * 100 + 7)) \
      conv=notrunc status=none
  done
  echo "20 MiB rewritten in 20 places" >"$work/random.change"
}

# --- rows --------------------------------------------------------------------------------------
# A row gets the source name ($1), disk ($2) and partition or "" ($3). It starts what it needs
# with bench_spawn, calls `measure COMMAND…` once around the transfer (or `not_yet`), checks the
# result, and may set R_note. The harness stops whatever a row started when it returns.
declare -A label=(
  [raw]="raw TCP: dd /dev/zero \\| socat (the link)"
  [diskferry]="diskferry capture → qcow2 (encrypted)"
  [clonezilla]="Clonezilla: partclone \\| zstd -3 -T0 \\| socat"
  [fog]="FOG: partclone \\| pigz -6 \\| socat"
  [nbd]="virt-p2v: qemu-nbd → qemu-img convert -O qcow2"
  [incremental]="diskferry incremental capture after a 1 % change"
  [deploy]="diskferry deploy"
  [delta_deploy]="diskferry delta re-deploy after a 1 % change"
)

# measure COMMAND…: time COMMAND and count the bytes it moved over the veth.
measure() {
  local t0 t1 tx0 rx0 tx1 rx1
  read -r tx0 rx0 < <(wire_bytes)
  t0=$(now)
  bench_run "$@"
  t1=$(now)
  read -r tx1 rx1 < <(wire_bytes)
  R_time=$(echo "$t1 - $t0" | bc -l)
  R_tx=$((tx1 - tx0))
  R_rx=$((rx1 - rx0))
}

row_raw() {
  local mib
  mib=$([ "$LINK" = 10gbit ] && echo 4096 || echo 1024)
  bench_spawn raw-recv in_srv socat -b 1048576 -u "TCP-LISTEN:9001,bind=$srv_ip,reuseaddr" OPEN:/dev/null
  bench_wait_listen in_srv 9001
  measure in_src sh -c "dd if=/dev/zero bs=1M count=$mib status=none | socat -b 1048576 -u - TCP:$srv_ip:9001"
  R_note="$mib MiB of zeros"
}

row_diskferry() {
  bench_spawn df-client in_src "$client" --listen "$src_ip:0" --server-key "$server_key" --disk "$2"
  local port
  port=$(bench_wait_port df-client "$src_ip")
  measure in_srv "$diskferry" capture "$2@$src_ip:$port" "$work/out.qcow2" --key-file "$work/key" \
    --force --progress none
  R_out=$(stat -c %s "$work/out.qcow2")
  "$diskferry" verify "$2" "$work/out.qcow2" >/dev/null 2>&1 || R_note="VERIFY FAILED"
  rm -f "$work/out.qcow2"
}

# partclone_pipe COMPRESSOR DISK PART-OR-"": the source side of Clonezilla and FOG, into a
# socat receiver in the server ns; timed until the receiver has written the last byte.
partclone_pipe() {
  local pc="partclone.ext4 -c"
  [ -n "$3" ] || pc="partclone.dd"
  bench_spawn pc-recv in_srv socat -b 1048576 -u "TCP-LISTEN:9000,bind=$srv_ip,reuseaddr" \
    "OPEN:$work/out.pc,creat,trunc"
  local recv=$bench_last_pid
  bench_wait_listen in_srv 9000
  measure send_and_wait "$recv" \
    "$pc -q -s '${3:-$2}' -o - 2>/dev/null | $1 | socat -b 1048576 -u - TCP:$srv_ip:9000"
  R_out=$(stat -c %s "$work/out.pc")
}
send_and_wait() { # receiver pid, pipeline
  in_src bash -o pipefail -c "$2"
  while bench_alive "$1"; do sleep 0.01; done
}
row_clonezilla() {
  partclone_pipe "zstd -3 -T0 -q" "$2" "$3"
  zstd -t -q "$work/out.pc" || R_note="zstd -t FAILED"
  rm -f "$work/out.pc"
}
row_fog() {
  partclone_pipe "pigz -6" "$2" "$3"
  pigz -t "$work/out.pc" || R_note="pigz -t FAILED"
  rm -f "$work/out.pc"
}

row_nbd() {
  bench_spawn nbd in_src qemu-nbd --read-only --persistent --format raw --export-name disk \
    --bind "$src_ip" --port 10809 "$2"
  bench_wait_listen in_src 10809
  measure in_srv qemu-img convert -f raw -O qcow2 "nbd://$src_ip:10809/disk" "$work/out.qcow2"
  R_out=$(stat -c %s "$work/out.qcow2")
  qemu-img compare -q -f raw -F qcow2 "$2" "$work/out.qcow2" || R_note="COMPARE FAILED"
  rm -f "$work/out.qcow2"
}

# start_client DISK [EXTRA…]: a diskferry-client serving DISK in the source ns; sets $port.
start_client() {
  local disk=$1
  shift
  bench_spawn df-client in_src "$client" --listen "$src_ip:0" --server-key "$server_key" \
    --disk "$disk" "$@"
  port=$(bench_wait_port df-client "$src_ip")
}

row_incremental() {
  local port t0 changed=${2%.img}.changed.img base_t
  start_client "$2"
  t0=$(now)
  bench_run in_srv "$diskferry" capture "$2@$src_ip:$port" "$work/base.qcow2" --key-file \
    "$work/key" --force --progress none --chunk-map
  base_t=$(echo "$(now) - $t0" | bc -l)
  bench_stop_all
  start_client "$changed"
  measure in_srv "$diskferry" capture "$changed@$src_ip:$port" "$work/inc.qcow2" --key-file \
    "$work/key" --force --progress none --base "$work/base.qcow2"
  R_out=$(stat -c %s "$work/inc.qcow2")
  "$diskferry" verify --follow-backing "$changed" "$work/inc.qcow2" >/dev/null 2>&1 ||
    R_note="VERIFY FAILED; "
  R_note+="$(cat "$work/$1.change"); the base capture with --chunk-map took $(printf %.2f "$base_t") s"
}

# deploy_onto_target IMAGE: deploys IMAGE onto $work/target.img through a client in the source
# ns, timed, then verifies the target against the image.
deploy_onto_target() {
  local port
  start_client "$work/target.img" --allow-write
  measure in_srv "$diskferry" deploy --follow-backing "$1" "$work/target.img@$src_ip:$port" \
    --key-file "$work/key" --progress none
  bench_stop_all
  "$diskferry" verify --follow-backing "$1" "$work/target.img" >/dev/null 2>&1 ||
    R_note="VERIFY FAILED; "
}
row_deploy() {
  dd if=/dev/zero of="$work/target.img" bs=1M count=$(($(stat -c %s "$2") >> 20)) status=none
  deploy_onto_target "$work/base.qcow2"
  R_note+="the base capture onto a zeroed disk"
}
row_delta_deploy() {
  deploy_onto_target "$work/inc.qcow2"
  R_note+="the incremental capture onto the disk holding the base"
}

# --- the run -----------------------------------------------------------------------------------
results=()
run_row() { # link, source, row
  R_time="" R_tx="" R_rx="" R_out="" R_note=""
  local part=""
  [ "$2" = debian ] && part=$work/debian.part
  "row_$3" "$2" "$work/$2.img" "$part"
  bench_stop_all
  results+=("$1|$2|$3|$R_time|$R_tx|$R_rx|$R_out|$R_note")
  if [ -n "$R_time" ]; then
    printf '   %s %s %-12s %6.2f s  %5d MiB src→srv  %s\n' "$1" "$2" "$3" "$R_time" \
      $((R_tx >> 20)) "$R_note" >&2
  else
    printf '   %s %s %-12s %s\n' "$1" "$2" "$3" "$R_note" >&2
  fi
}

make_net
for s in $sources; do
  echo "== making the $s source disk" >&2
  "make_$s"
  "change_$s"
done
cat "$work"/*.img >/dev/null # every tool reads the disk from the page cache
declare -A load
for LINK in $links; do
  set_link "$LINK"
  load[$LINK]=$(uptime | sed 's/.*load average: //')
  echo "== link $LINK (load ${load[$LINK]})" >&2
  run_row "$LINK" - raw
  for s in $sources; do
    for r in "${rows[@]}"; do run_row "$LINK" "$s" "$r"; done
  done
done

# --- report ------------------------------------------------------------------------------------
field() { # link source row index
  local r l s w
  local -a f
  for r in "${results[@]}"; do
    IFS='|' read -r l s w _ <<<"$r"
    if [ "$l" = "$1" ] && [ "$s" = "$2" ] && [ "$w" = "$3" ]; then
      IFS='|' read -r -a f <<<"$r"
      echo "${f[$4]:-}"
    fi
  done
}
mib() { [ -n "$1" ] && printf '%.0f' "$(echo "$1 / 1048576" | bc -l)"; }
mkdir -p bench/out
{
  echo "bench/net.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, kernel $(uname -r)," \
    "diskferry $(git rev-parse --short HEAD), $(qemu-img --version | head -n1)," \
    "partclone $(partclone.ext4 -v 2>&1 | sed -n 's/.* v\([0-9.]*\).*/\1/p' | head -n1)," \
    "zstd $(zstd -V | sed 's/.* v\([0-9.]*\).*/\1/'), $(pigz -V 2>&1), $(socat -V | sed -n 's/^socat version \([^ ]*\).*/socat \1/p')"
  echo
  for LINK in $links; do
    raw_t=$(field "$LINK" - raw 3)
    raw_b=$(field "$LINK" - raw 4)
    printf '### %s link (tbf on both veth ends; load average at start: %s)\n\n' "$LINK" "${load[$LINK]}"
    printf 'Raw TCP over the link: %.0f MB/s (%s bytes in %.2f s; nominal %s MB/s)\n\n' \
      "$(echo "$raw_b / $raw_t / 1000000" | bc -l)" "$raw_b" "$raw_t" \
      "$(($(sed 's/gbit//' <<<"$LINK") * 125))"
    for s in $sources; do
      echo "$(cat "$work/$s.desc")"
      echo
      echo "| $LINK, $s | s | MiB src→srv | MiB srv→src | wire MB/s | output MiB | diskferry / this | note |"
      echo "|---|---:|---:|---:|---:|---:|---:|---|"
      dft=$(field "$LINK" "$s" diskferry 3)
      for r in "${rows[@]}"; do
        t=$(field "$LINK" "$s" "$r" 3)
        note=$(field "$LINK" "$s" "$r" 7)
        if [ -z "$t" ]; then
          echo "| ${label[$r]} | | | | | | | $note |"
          continue
        fi
        tx=$(field "$LINK" "$s" "$r" 4)
        printf '| %s | %.2f | %s | %s | %.0f | %s | %.2f× | %s |\n' "${label[$r]}" "$t" "$(mib "$tx")" \
          "$(mib "$(field "$LINK" "$s" "$r" 5)")" "$(echo "$tx / $t / 1000000" | bc -l)" \
          "$(mib "$(field "$LINK" "$s" "$r" 6)")" "$(echo "$dft / $t" | bc -l)" "$note"
      done
      echo
    done
  done
  echo "load average at the end: $(uptime | sed 's/.*load average: //')"
} | tee bench/out/net.md
