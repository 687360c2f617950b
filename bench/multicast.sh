#!/usr/bin/env bash
# One image onto four machines: multicast once to all four, against a real unicast deploy to one
# and four unicast deploys in sequence. Topology: a hub namespace holding a bridge (multicast
# snooping off, so the group is flooded), a server namespace (10.78.0.1) and four receiver
# namespaces (10.78.0.10-13), each joined to the bridge by a veth pair with tbf at $LINK
# (default 1gbit) on both ends (lib.sh's burst and limit). Rows:
#   unicast      diskferry deploy IMAGE DISK@HOST:PORT from the server ns to a
#                `diskferry-client --allow-write --listen` in receiver ns 0 (its own verification
#                included, as always), then checked with cmp
#   unicast x4   the same to receivers 0-3 in sequence
#   multicast    the `mcast` driver (server/multicast/examples/mcast.rs): the sender in the server
#                ns, one receiver per receiver ns writing its disk file, receiver 1 dropping 2 % of
#                the data packets (its test-only knob: netem is not available here); each receiver
#                reads its disk back and compares its BLAKE3 with the image's (the verification a
#                deploy does) before it exits; timed until the last process exits; then cmp
#   multicast, one killed   the same, receiver 3 killed $KILL_AT s in: the others must finish
#                (the sender drops it after its 5 s silence timeout) and match the image
#   deploy --multicast   the product: `diskferry deploy IMAGE --multicast T0,…,T3` from the server
#                ns to four `diskferry-client --allow-write --listen` (client 1 dropping 2 % of
#                the data packets through DISKFERRY_TEST_MULTICAST_DROP): compatibility checks,
#                the image staged once on the server (in $work), each disk zeroed where it must
#                read as zeros, the session, each disk verified by its agent's hashes; then cmp
# Image: $SIZE_MIB MiB (default 1024): random data with a 64 MiB hole after the first 7/8 (zeros
# a deploy does not send), in /dev/shm like the disks.
#
# Usage: bench/multicast.sh   (root; env SIZE_MIB, LINK, KILL_AT). Needs iproute2, cmp, bc.
# Writes bench/out/multicast.md. Everything it starts stops on every exit.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench/multicast.sh must run as root: it creates network namespaces, a bridge and tbf" >&2
  exit 1
fi
for tool in ip tc cmp bc; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
size_mib=${SIZE_MIB:-1024}
link=${LINK:-1gbit}
kill_at=${KILL_AT:-3}

source bench/lib.sh
bench_init diskferry-mcast
work=$bench_work
prefix=dfmc$$
target=${CARGO_TARGET_DIR:-target}
diskferry=$target/release/diskferry
client=$target/release/diskferry-client
mcast=$target/release/examples/mcast
now() { date +%s.%N; }

echo "== building (release)" >&2
cargo build --release --quiet -p diskferry-cli -p diskferry-client
cargo build --release --quiet -p diskferry-multicast --example mcast
server_key=$("$diskferry" keygen "$work/key" 2>/dev/null)

# --- network -----------------------------------------------------------------------------------
ns_names=()
in_ns() { local n=$1; shift; ip netns exec "$prefix-$n" "$@"; }
mc_net() {
  ip netns add "$prefix-hub"
  ns_names+=("$prefix-hub")
  bench_on_exit 'for n in "${ns_names[@]}"; do ip netns del "$n"; done'
  ip -n "$prefix-hub" link add br0 type bridge mcast_snooping 0
  ip -n "$prefix-hub" link set br0 up
  local name ip4
  for name in s r0 r1 r2 r3; do
    ip netns add "$prefix-$name"
    ns_names+=("$prefix-$name")
    ip link add "v$name" netns "$prefix-$name" type veth peer name "h$name" netns "$prefix-hub"
    ip -n "$prefix-hub" link set "h$name" master br0 up
    if [ "$name" = s ]; then ip4=10.78.0.1; else ip4=10.78.0.$((10 + ${name#r})); fi
    ip -n "$prefix-$name" addr add "$ip4/24" dev "v$name"
    ip -n "$prefix-$name" link set lo up
    ip -n "$prefix-$name" link set "v$name" up
    ip -n "$prefix-$name" route add 224.0.0.0/4 dev "v$name"
    bench_rate "$prefix-$name" "v$name" "$link"
    bench_rate "$prefix-hub" "h$name" "$link"
  done
}
mc_net

# --- data --------------------------------------------------------------------------------------
image=$work/image.raw
head_mib=$((size_mib * 7 / 8))
head -c $((head_mib << 20)) /dev/urandom >"$image"
truncate -s $(((head_mib + 64) << 20)) "$image"
head -c $(((size_mib - head_mib - 64) << 20)) /dev/urandom >>"$image"
image_bytes=$(stat -c %s "$image")
b3=$("$mcast" hash --file "$image")
fresh_disks() {
  local i
  for i in 0 1 2 3; do
    rm -f "$work/d$i"
    truncate -s "$image_bytes" "$work/d$i"
  done
}
check_disks() { # indices…: cmp each disk with the image; prints failures
  local i bad=""
  for i in "$@"; do cmp -s "$image" "$work/d$i" || bad+="disk $i DIFFERS; "; done
  echo "$bad"
}

# --- rows --------------------------------------------------------------------------------------
unicast_one() { # receiver index: a listening agent there, one timed deploy onto its disk
  local i=$1 port
  bench_spawn "client$i" in_ns "r$i" "$client" --listen "10.78.0.$((10 + i)):0" \
    --server-key "$server_key" --disk "$work/d$i" --allow-write
  port=$(bench_wait_port "client$i" "10.78.0.$((10 + i))")
  bench_run in_ns s "$diskferry" deploy "$image" "$work/d$i@10.78.0.$((10 + i)):$port" \
    --key-file "$work/key" --progress none 2>"$work/deploy$i.err"
}

row_unicast() {
  fresh_disks
  local t0
  t0=$(now)
  unicast_one 0
  R_time=$(echo "$(now) - $t0" | bc -l)
  bench_stop_all
  R_note=$(check_disks 0)
}

row_unicast4() {
  fresh_disks
  local t0 i
  t0=$(now)
  for i in 0 1 2 3; do unicast_one "$i"; done
  R_time=$(echo "$(now) - $t0" | bc -l)
  bench_stop_all
  R_note=$(check_disks 0 1 2 3)
}

multicast_session() { # kill-after-seconds or "": runs one session, sets R_time and R_note
  fresh_disks
  rm -f "$work"/r*.cred "$work/ready"
  local t0 i drop pids=() sender
  t0=$(now)
  bench_spawn sender in_ns s "$mcast" send --image "$image" --group 239.255.78.1:5578 \
    --bind 10.78.0.1 --receivers 4 --dir "$work" --max-rate 125000000
  sender=$bench_last_pid
  while [ ! -e "$work/ready" ]; do sleep 0.01; done
  for i in 0 1 2 3; do
    drop=0
    [ "$i" = 1 ] && drop=2
    bench_spawn "recv$i" in_ns "r$i" "$mcast" recv --creds "$work/r$i.cred" --disk "$work/d$i" \
      --test-drop-percent "$drop" --expect-b3 "$b3"
    pids+=("$bench_last_pid")
  done
  if [ -n "$1" ]; then
    sleep "$1"
    # The spawned pid is a subshell running in_ns: kill it and what it started.
    bench_found=()
    bench_tree "${pids[3]}"
    kill "${pids[3]}" "${bench_found[@]}"
  fi
  local failed=""
  for i in 0 1 2 3; do
    wait "${pids[$i]}" || { [ -n "$1" ] && [ "$i" = 3 ] || failed+="receiver $i failed; "; }
  done
  wait "$sender" || { [ -n "$1" ] || failed+="sender reported a drop; "; }
  R_time=$(echo "$(now) - $t0" | bc -l)
  local check=(0 1 2 3)
  [ -n "$1" ] && check=(0 1 2)
  R_note="$failed$(check_disks "${check[@]}")"
  # The sender's report: repairs per receiver and the rate history.
  R_detail=$(cat "$work/sender.out")
}

row_multicast() { multicast_session ""; }

row_deploy_multicast() {
  fresh_disks
  local i drop port targets="" t0
  for i in 0 1 2 3; do
    drop=0
    [ "$i" = 1 ] && drop=2
    bench_spawn "client$i" in_ns "r$i" env DISKFERRY_TEST_MULTICAST_DROP="$drop" "$client" \
      --listen "10.78.0.$((10 + i)):0" --server-key "$server_key" --disk "$work/d$i" --allow-write
    port=$(bench_wait_port "client$i" "10.78.0.$((10 + i))")
    targets+="${targets:+,}$work/d$i@10.78.0.$((10 + i)):$port"
  done
  t0=$(now)
  bench_run in_ns s env TMPDIR="$work" "$diskferry" deploy "$image" --multicast "$targets" \
    --key-file "$work/key" --progress none 2>"$work/mdeploy.err" || R_note+="the deploy failed; "
  R_time=$(echo "$(now) - $t0" | bc -l)
  bench_stop_all
  R_note+=$(check_disks 0 1 2 3)
  R_detail=$(grep -v "warning:" "$work/mdeploy.err")
}
row_multicast_kill() {
  multicast_session "$kill_at"
  grep -q "receiver 3: Dropped" "$work/sender.out" || R_note+="receiver 3 not reported dropped; "
  R_note+="receiver 3 killed at ${kill_at} s"
}

# --- the run -----------------------------------------------------------------------------------
declare -A label=(
  [unicast]="unicast: diskferry deploy to 1 agent"
  [unicast4]="unicast: diskferry deploy to 4 agents in sequence"
  [multicast]="multicast to 4 receivers (one dropping 2 %)"
  [multicast_kill]="multicast to 4, receiver 3 killed mid-session"
  [deploy_multicast]="diskferry deploy --multicast to 4 agents (one dropping 2 %)"
)
declare -A times
rows=""
details=""
for row in unicast unicast4 multicast multicast_kill deploy_multicast; do
  echo "== $row" >&2
  R_time="" R_note="" R_detail=""
  "row_$row"
  bench_stop_all
  times[$row]=$R_time
  rows+="| ${label[$row]} | $(printf %.2f "$R_time") | RATIO_$row | ${R_note:-all disks equal the image (cmp)} |"$'\n'
  [ -n "$R_detail" ] && details+="#### ${label[$row]}: what it reported"$'\n\n```\n'"$R_detail"$'\n```\n\n'
done
for row in unicast unicast4 multicast multicast_kill deploy_multicast; do
  r1=$(echo "${times[$row]} / ${times[unicast]}" | bc -l)
  r4=$(echo "${times[$row]} / ${times[unicast4]}" | bc -l)
  rows=${rows/RATIO_$row/$(printf '%.2f× / %.2f×' "$r1" "$r4")}
done

mkdir -p bench/out
{
  echo "bench/multicast.sh, $(date -u '+%Y-%m-%d %H:%M') UTC, $(nproc) cores, kernel $(uname -r)," \
    "diskferry $(git rev-parse --short HEAD)"
  echo
  echo "Image: $((image_bytes >> 20)) MiB raw, $((image_bytes - (64 << 20))) bytes of random data" \
    "and a 64 MiB hole; link: $link (tbf on both ends of each of the five veth pairs)"
  echo
  echo "| row | s | / 1 unicast / 4 unicasts | check |"
  echo "|---|---:|---:|---|"
  printf %s "$rows"
  echo
  printf %s "$details"
  echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee bench/out/multicast.md
