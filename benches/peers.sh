#!/usr/bin/env bash
# Cache-hit throughput and latency of cachecore next to tower-http-cache and hitbox, on the same
# axum route, MemoryStore / in-memory backends and then Redis (a redis-server of its own on a
# free loopback port, when `redis-server` is installed). Prints a Markdown table.
#
#   benches/peers.sh                 # ~3 s per cell, 2 tokio workers
#   PEERS_SECONDS=5 benches/peers.sh # longer cells
#   PEERS_REDIS=0 benches/peers.sh   # memory rows only
#
# The peers are dependencies of benches/peers only, never of cachecore itself. It builds into
# target/peers so it never holds the lock of the main target directory.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/peers}"
cargo build --release --manifest-path benches/peers/Cargo.toml
exec "$CARGO_TARGET_DIR/release/cachecore-peers-bench"
