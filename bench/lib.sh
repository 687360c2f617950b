# shellcheck shell=bash
# Sourced by every bench script: owns the run's private work directory, the processes a bench
# starts, and the one cleanup that runs on every exit — success, a `set -e` failure, Ctrl-C
# (SIGINT), SIGTERM or SIGHUP. The cleanup stops every process this shell started, with all of
# their own children (pipelines, `ip netns exec`, `taskset` and `sh -c` wrappers included), waits
# until they are gone (so deleted files in /dev/shm are really freed), runs the script's own
# teardown hooks (namespaces, loop devices, mounts), then removes the work directory.
#
# Why the old scripts leaked: they started `diskferry-client &` inside `port=$(start_client …)`;
# a command substitution is a subshell, so the pid went into the subshell's copy of `pids` and
# the trap killed nothing. Here processes are found by walking the process tree from this shell
# (/proc/PID/task/*/children), so nothing depends on where a pid was recorded.
#
# Rules for scripts: call `bench_init` once; start long-lived processes with `bench_spawn` (never
# inside `$(…)`: a process left behind by a finished subshell is reparented away from this shell
# and no cleanup can find it); run long foreground steps with `bench_run` so a signal is handled at once
# instead of when the step ends; register teardown with `bench_on_exit`.

bench_work=""
bench_hooks=()

# bench_init PREFIX [PARENT_DIR]: make the work directory (default under /dev/shm) and set traps.
bench_init() {
  bench_work=$(mktemp -d "${2:-/dev/shm}/$1.XXXXXX")
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
}

# bench_on_exit COMMAND: run COMMAND (a string, eval'd) during cleanup, after processes stopped.
bench_on_exit() { bench_hooks+=("$1"); }

# bench_spawn NAME COMMAND...: start COMMAND in the background; stdout and stderr go to
# $bench_work/NAME.out and NAME.err; its pid is left in $bench_last_pid.
bench_spawn() {
  local name=$1
  shift
  "$@" >"$bench_work/$name.out" 2>"$bench_work/$name.err" &
  # shellcheck disable=SC2034 # for the caller
  bench_last_pid=$!
}

# bench_run COMMAND...: run COMMAND to its end, but as a job this shell waits for, so SIGINT and
# SIGTERM reach the trap (and the cleanup) immediately. Returns COMMAND's status.
bench_run() {
  "$@" &
  wait "$!"
}

# bench_wait_port NAME ADDR: wait (10 s at most) until NAME.out says "listening … ADDR:PORT",
# print PORT. For diskferry-client, which prints the port it bound.
bench_wait_port() {
  local _
  for _ in $(seq 200); do
    grep -q listening "$bench_work/$1.out" 2>/dev/null && break
    sleep 0.05
  done
  sed -n "s/.*$2:\([0-9]*\).*/\1/p" "$bench_work/$1.out" | head -n1 | grep . ||
    { echo "$1 did not start listening: $(cat "$bench_work/$1.err")" >&2; return 1; }
}

# bench_tree PID: append PID's descendants (depth first, parents before children) to
# bench_found. Builtins only: a `$(…)` here would itself be a child of the shell being walked.
bench_tree() {
  local f kid kids
  for f in /proc/"$1"/task/*/children; do
    [ -r "$f" ] || continue
    read -r -a kids <"$f" || true
    for kid in "${kids[@]}"; do
      bench_found+=("$kid")
      bench_tree "$kid"
    done
  done
}

# bench_alive PID: true while PID exists and is not a zombie.
bench_alive() {
  local stat
  { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  stat=${stat##*) }
  [ "${stat:0:1}" != Z ]
}

# bench_stop_all: TERM every descendant of this shell, wait up to 5 s, KILL what is left, reap.
bench_stop_all() {
  local p alive _
  bench_found=()
  bench_tree "$$"
  [ ${#bench_found[@]} -gt 0 ] || return 0
  kill -TERM "${bench_found[@]}" 2>/dev/null
  for _ in $(seq 50); do
    alive=0
    for p in "${bench_found[@]}"; do bench_alive "$p" && alive=1; done
    [ "$alive" = 1 ] || break
    sleep 0.1
  done
  for p in "${bench_found[@]}"; do bench_alive "$p" && kill -KILL "$p" 2>/dev/null; done
  wait 2>/dev/null
  return 0
}

bench_cleanup() {
  local rc=$? hook
  trap - EXIT INT TERM HUP
  set +e
  bench_stop_all
  for hook in "${bench_hooks[@]}"; do eval "$hook" 2>/dev/null; done
  [ -n "$bench_work" ] && rm -rf "$bench_work"
  exit "$rc"
}

# --- network namespaces ------------------------------------------------------------------------
# bench_net NS_A NS_B IF_A IF_B IP_A IP_B: two network namespaces joined by a veth pair (IF_A in
# NS_A with IP_A/24, IF_B in NS_B with IP_B/24), loopback up in both; deleted at exit (after the
# processes stopped), and with them the veth and its qdiscs.
bench_net() {
  ip netns add "$1"
  ip netns add "$2"
  bench_on_exit "ip netns del $1; ip netns del $2"
  ip link add "$3" netns "$1" type veth peer name "$4" netns "$2"
  ip -n "$1" addr add "$5/24" dev "$3"
  ip -n "$2" addr add "$6/24" dev "$4"
  ip -n "$1" link set lo up
  ip -n "$2" link set lo up
  ip -n "$1" link set "$3" up
  ip -n "$2" link set "$4" up
}

# bench_rate NS IF RATE (1gbit, 10gbit, ...): tbf on IF in NS. The burst must hold at least one
# 64 KiB GSO packet and rate/HZ bytes, or tbf cannot reach its rate between timer ticks; the
# limit is the queue TCP may fill. Chosen by measuring dd | socat over the link at several
# values (bench/net.sh's raw row reports what the link carried): 1 MB / 8 MB up to 1 Gbit/s,
# 4 MB / 32 MB at 10 Gbit/s (10 MB bursts were no faster there).
bench_rate() {
  local burst=1mb limit=8mb
  [ "$3" = 10gbit ] && burst=4mb limit=32mb
  tc -n "$1" qdisc replace dev "$2" root tbf rate "$3" burst "$burst" limit "$limit"
}

# bench_wait_listen RUNNER PORT: wait (10 s at most) until something listens on PORT where
# RUNNER (a function prefixing `ip netns exec NS`, or `env`) runs commands.
bench_wait_listen() {
  local _
  for _ in $(seq 200); do
    [ -n "$("$1" ss -Hltn "sport = :$2")" ] && return 0
    sleep 0.05
  done
  echo "nothing listens on port $2" >&2
  return 1
}
