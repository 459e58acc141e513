#!/usr/bin/env bash
# Instructions per cache hit (callgrind), this tree against a baseline commit, so a change to the
# hit path is judged on a count that the machine's load does not move.
#
#   benches/hit_instructions.sh [BASE_REV]      # default BASE_REV: 71d0ffb (before issue 8)
#   HIT_MODES="redis redis-dep" benches/hit_instructions.sh 57e0fdc
#
# Modes: bare (the inner service alone), hit, dep (a hit with one dep) on the MemoryStore, and
# redis, redis-dep: the same hits on a RedisStore (the client's instructions only; the probe
# starts no server: this script starts a redis-server on a free loopback port, no persistence).
# Needs valgrind (Debian package). The baseline is built in a throwaway worktree with its own
# target dir; examples/hit_probe.rs is copied into it (it uses only the public API).
set -euo pipefail
cd "$(dirname "$0")/.."
base="${1:-71d0ffb}"
command -v valgrind >/dev/null || { echo "needs valgrind: apt-get install -y valgrind" >&2; exit 1; }

work="$(mktemp -d)"
trap 'git worktree remove --force "$work/tree" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
# Cargo links a binary into release/ only when it builds it, so one that another checkout's
# build left there (BASE_TARGET_DIR the same as CARGO_TARGET_DIR) would stay: each probe is
# removed before its build and copied out after it.
rm -f "${CARGO_TARGET_DIR:-target}/release/examples/hit_probe"
cargo build -q --release --features redis --example hit_probe
cp "${CARGO_TARGET_DIR:-target}/release/examples/hit_probe" "$work/probe-here"
git worktree add -f "$work/tree" "$base" >/dev/null 2>&1
cp examples/hit_probe.rs "$work/tree/examples/hit_probe.rs"
rm -f "${BASE_TARGET_DIR:-$work/target}/release/examples/hit_probe"
(cd "$work/tree" && CARGO_TARGET_DIR="${BASE_TARGET_DIR:-$work/target}" cargo build -q --release --features redis --example hit_probe)
cp "${BASE_TARGET_DIR:-$work/target}/release/examples/hit_probe" "$work/probe-base"
here="$work/probe-here"
there="$work/probe-base"

count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" 2>&1 | grep -oE 'refs: +[0-9,]+' | tr -d ', ' | cut -d: -f2; }
# Per request: the difference between 3000 and 1000 requests, over 2000 (start-up cancels out).
per() { echo $(( ($(count "$1" 3000 "$2") - $(count "$1" 1000 "$2")) / 2000 )); }

modes="${HIT_MODES:-bare hit dep}"
case "$modes" in
  *redis*)
    command -v redis-server >/dev/null || { echo "needs redis-server: apt-get install -y redis-server" >&2; exit 1; }
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
    redis_pid=$!
    trap 'kill "$redis_pid" 2>/dev/null; git worktree remove --force "$work/tree" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    export HIT_PROBE_REDIS="redis://127.0.0.1:$port/"
    ;;
esac

printf '%-9s %10s %10s %8s\n' mode "$base" here change
for mode in $modes; do
  a=$(per "$there" "$mode"); b=$(per "$here" "$mode")
  printf '%-9s %10d %10d %+7.1f%%\n' "$mode" "$a" "$b" "$(awk "BEGIN { print ($b - $a) * 100 / $a }")"
done
