#!/usr/bin/env bash
# Instructions per request over TCP (callgrind): the bare hyper server against a gateway hit
# (examples/gateway_probe.rs, client included; the client's share is the same in both, so the
# difference is what the gateway adds). A count the machine's load does not move.
#
#   benches/gateway_instructions.sh
#
# Needs valgrind (Debian package). Under valgrind SHA-256 runs its portable code (no SHA-NI).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind: apt-get install -y valgrind" >&2; exit 1; }
cargo build -q --release --features gateway,redis --example gateway_probe
probe="${CARGO_TARGET_DIR:-target}/release/examples/gateway_probe"
count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$probe" "$@" 2>&1 | grep -oE 'refs: +[0-9,]+' | tr -d ', ' | cut -d: -f2; }
# Per request: the difference between 3000 and 1000 requests, over 2000 (start-up cancels out).
per() { echo $(( ($(count 3000 "$1") - $(count 1000 "$1")) / 2000 )); }
bare=$(per bare); memory=$(per memory)
printf '%-30s %8d\n' "bare hyper" "$bare" "gateway hit, in-memory store" "$memory"
printf '%-30s %8d\n' "the gateway's own share" $(( memory - bare ))
