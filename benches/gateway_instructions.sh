#!/usr/bin/env bash
# Instructions per request over TCP (callgrind): the bare hyper server against a gateway hit
# (examples/gateway_probe.rs, client included; the client's share is the same in every mode, so
# the difference is what the gateway adds), with the in-memory store and, when redis-server is
# installed, with Redis and with Redis + the near cache. A count the machine's load does not move.
#
#   benches/gateway_instructions.sh
#
# Needs valgrind (Debian package); redis-server for the Redis rows (started on a free loopback
# port, without persistence, stopped at the end). Under valgrind SHA-256 runs its portable code
# (no SHA-NI).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind: apt-get install -y valgrind" >&2; exit 1; }
probe="${CARGO_TARGET_DIR:-target}/release/examples/gateway_probe"
# Cargo links a binary into release/ only when it builds it: one that another checkout's build
# left there (the same target dir) would be counted instead of this tree's.
rm -f "$probe"
cargo build -q --release --features gateway,redis --example gateway_probe
count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$probe" "$@" 2>&1 | grep -oE 'refs: +[0-9,]+' | tr -d ', ' | cut -d: -f2; }
# The fewer of two runs: the near cache's heartbeat (a PING every 100 ms, answered on a thread
# of its own) may miss its 1 s lease under valgrind, which runs one thread at a time; near hits
# then go to Redis for a moment, and that run counts more.
count2() { local a b; a=$(count "$@"); b=$(count "$@"); echo $(( a < b ? a : b )); }
# Per request: the difference between 3000 and 1000 requests, over 2000 (start-up cancels out).
per() { echo $(( ($(count2 3000 "$1") - $(count2 1000 "$1")) / 2000 )); }
bare=$(per bare)
row() { printf '%-34s %8d   %+8d over bare hyper\n' "$1" "$2" $(( $2 - bare )); }
printf '%-34s %8d\n' "bare hyper" "$bare"
row "gateway hit, in-memory store" "$(per memory)"
if command -v redis-server >/dev/null; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
  redis_pid=$!
  trap 'kill "$redis_pid" 2>/dev/null || true' EXIT
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  export REDIS_URL="redis://127.0.0.1:$port/"
  row "gateway hit, Redis + near cache" "$(per near)"
  row "gateway hit, Redis" "$(per redis)"
else
  echo "(no redis-server: Redis rows skipped)"
fi
