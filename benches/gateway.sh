#!/usr/bin/env bash
# Gateway cache hits against the physical ceilings, in one run on one machine: a bare hyper
# server that reads the same request and answers the same bytes (examples/completion_server.rs),
# the cachecore-gateway binary with the in-memory store, with Redis, with Redis and the near cache,
# and Redis itself (redis-benchmark GET of the same payload). The same wrk load goes to each HTTP
# target: -t2 -c32, POST of a 564-byte chat request with a tenant JWT, answered by a 1194-byte
# cached completion. Every measured gateway request must be a hit: the gateway's /metrics are read
# before and after, and a single non-hit fails the run. Prints req/s, and each row as a share of
# bare hyper (the ratios survive a noisy machine; the absolute numbers do not), and the CPU time
# the whole machine spent per request (busy ticks of /proc/stat over the requests served, steal
# left out) with bare hyper's as a share of each row's: the share each row would get if the two
# cores did nothing else, which moves much less with the VM's moments than req/s.
#
#   benches/gateway.sh                      # 3 rounds of 5 s cells, interleaved; medians
#   GATEWAY_SECONDS=10 GATEWAY_ROUNDS=5 benches/gateway.sh
#   GATEWAY_REDIS=0 benches/gateway.sh      # bare hyper and the in-memory gateway only
#   RUST_LOG=info benches/gateway.sh        # the gateway with its per-request log line on
#   GATEWAY_BASELINE=394d3ae benches/gateway.sh   # adds that commit's gateway binary, same load
#   GATEWAY_CELLS="bare redis base_redis" GATEWAY_ROUNDS=15 GATEWAY_SECONDS=3 \
#     GATEWAY_BASELINE=f1ee82d benches/gateway.sh   # only those cells: a tighter A/B
#
# Each round runs its cells in the opposite order of the round before (ABBA), and with a
# baseline the script also prints the median of the per-round ratios of each row to its
# baseline row (adjacent cells of one round share the machine's load).
#
# Needs wrk (`apt-get install -y wrk`; benches are not run in CI) and, for the Redis rows,
# redis-server and redis-benchmark (the Debian package redis-server). Servers listen on free
# loopback ports only; Redis runs without persistence and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${GATEWAY_SECONDS:-5}"
rounds="${GATEWAY_ROUNDS:-3}"
with_redis="${GATEWAY_REDIS:-1}"
export RUST_LOG="${RUST_LOG:-warn}"
target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"

command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }
if [ "$with_redis" = 1 ] && ! command -v redis-server >/dev/null; then
  echo "no redis-server (apt-get install -y redis-server): Redis rows skipped" >&2
  with_redis=0
fi
features=gateway
[ "$with_redis" = 1 ] && features=gateway,redis
# Cargo links a binary into release/ only when it builds it: one left there by a build of
# another checkout in the same target dir would stay. Removed first, the build links its own.
rm -f "$target/release/cachecore-gateway"
cargo build -q --release --features "$features" --bin cachecore-gateway --example completion_server
server_bin="$target/release/examples/completion_server"

work="$(mktemp -d)"
# This tree's binary, copied out.
cp "$target/release/cachecore-gateway" "$work/gateway-here"
gateway_bin="$work/gateway-here"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -d "$work/base" ] && git worktree remove --force "$work/base" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

# The baseline binary: built from its commit in a throwaway worktree, in a target dir of its
# own (kept for the next run). Not this tree's: cargo names a workspace's artifacts the same
# whichever checkout builds them, so a baseline built there would leave artifacts newer than
# this tree's sources, which the next build here would take as up to date.
baseline="${GATEWAY_BASELINE:-}"
if [ -n "$baseline" ]; then
  base_target="$target/gateway-baseline"
  git worktree add -f "$work/base" "$baseline" >/dev/null 2>&1
  rm -f "$base_target/release/cachecore-gateway"
  (cd "$work/base" && CARGO_TARGET_DIR="$base_target" cargo build -q --release --features "$features" --bin cachecore-gateway)
  cp "$base_target/release/cachecore-gateway" "$work/gateway-baseline"
  if cmp -s "$work/gateway-baseline" "$gateway_bin"; then
    echo "the baseline and this tree built the same binary" >&2
    exit 1
  fi
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

# The tenant token: HS256 over the gateway's secret, valid for a day.
secret="benches-gateway-sh-secret-of-at-least-32-bytes"
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
jwt_head=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
jwt_claims=$(printf '{"tenant_id":"bench","exp":%d}' $(( $(date +%s) + 86400 )) | b64url)
jwt_sig=$(printf '%s.%s' "$jwt_head" "$jwt_claims" | openssl dgst -sha256 -hmac "$secret" -binary | b64url)
token="$jwt_head.$jwt_claims.$jwt_sig"

# The request: a chat completion of exactly 564 bytes.
question="Summarise the renewal, price and termination terms of contract 123 for the account team"
request="{\"model\":\"gpt-4o-mini\",\"temperature\":0,\"messages\":[{\"role\":\"system\",\"content\":\"You are a careful assistant for a legal operations team. Answer in three short sentences, cite clause numbers, and say so plainly when the contract is silent.\"},{\"role\":\"user\",\"content\":\"$question\"}],\"max_tokens\":256,\"user\":\"\"}"
pad=$(( 564 - ${#request} ))
[ "$pad" -ge 0 ] || { echo "request longer than 564 bytes" >&2; exit 1; }
request="${request/\"user\":\"\"/\"user\":\"$(printf "%${pad}s" | tr ' ' u)\"}"
[ "${#request}" -eq 564 ] || { echo "request is ${#request} bytes" >&2; exit 1; }
printf '%s' "$request" > "$work/request.json"
cat > "$work/post.lua" <<EOF
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $token"
wrk.body = [[$request]]
EOF

# The bare server: the baseline, and the gateways' upstream.
"$server_bin" 127.0.0.1:0 > "$work/server.addr" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/server.addr" ] && break; sleep 0.1; done
upstream="$(head -n1 "$work/server.addr")"

start_gateway() { # NAME ARGS...: starts a gateway, fills its cache with one miss
  local name="$1"; shift
  local port; port=$(free_port)
  local bin="$gateway_bin"
  case "$name" in base_*) bin="$work/gateway-baseline" ;; esac
  "$bin" --listen "127.0.0.1:$port" --upstream "http://$upstream" --jwt-secret "$secret" "$@" \
    > "$work/$name.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$port/health"
  curl -fs -o /dev/null -X POST "http://127.0.0.1:$port/v1/chat/completions" \
    -H "Authorization: Bearer $token" -H 'Content-Type: application/json' --data-binary "@$work/request.json"
  local status
  status=$(curl -fs -D - -o /dev/null -X POST "http://127.0.0.1:$port/v1/chat/completions" \
    -H "Authorization: Bearer $token" -H 'Content-Type: application/json' --data-binary "@$work/request.json" \
    | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache" {print $2}')
  [ "$status" = HIT_L1 ] || { echo "$name: the second request was ${status:-no X-Cache}, not HIT_L1" >&2; cat "$work/$name.log" >&2; exit 1; }
  echo "http://127.0.0.1:$port" > "$work/$name.url"
}

counts() { # URL: "hits others" from the gateway's cachecore_requests_total
  curl -fs "$1/metrics" | awk '/^cachecore_requests_total\{/ { if ($1 ~ /"HIT_L1"/) h += $2; else o += $2 } END { printf "%d %d\n", h, o }'
}

names=(bare memory)
start_gateway memory
if [ -n "$baseline" ]; then start_gateway base_memory; names+=(base_memory); fi
if [ "$with_redis" = 1 ]; then
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no > "$work/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  start_gateway redis --redis "redis://127.0.0.1:$redis_port/"
  names+=(redis)
  if [ -n "$baseline" ]; then
    start_gateway base_redis --redis "redis://127.0.0.1:$redis_port/"
    names+=(base_redis)
  fi
  # The near cache (issue 12 item 1) is a RedisStore option; its row appears once the binary has
  # a flag for it. GATEWAY_NEAR_ARGS overrides the detected flag.
  near_flag=$("$gateway_bin" --help | grep -oE -- '--[a-z-]*near[a-z-]*' | head -n1 || true)
  near_args="${GATEWAY_NEAR_ARGS:-${near_flag:+$near_flag 64MiB}}"
  if [ -n "$near_args" ]; then
    # shellcheck disable=SC2086 # the flag and its value, split on purpose
    start_gateway near --redis "redis://127.0.0.1:$redis_port/" $near_args
    names+=(near)
    if [ -n "$baseline" ]; then
      # shellcheck disable=SC2086
      start_gateway base_near --redis "redis://127.0.0.1:$redis_port/" $near_args
      names+=(base_near)
    fi
  fi
  # Redis itself: GET of the cached completion's bytes.
  head -c 1194 /dev/zero | tr '\0' x | redis-cli -p "$redis_port" -x SET cachecore:bench:payload >/dev/null
  names+=(redis_get)
fi

# The whole machine's busy CPU time in ticks (/proc/stat: user, nice, system, irq and softirq;
# idle, I/O wait and the time the hypervisor took, steal, left out): read around each measured
# cell, divided by the requests it served, it is the CPU a request costs everything on the
# machine (the load generator, the servers, Redis and the kernel's loopback), a figure that a
# slower moment of the VM moves much less than req/s.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }
tick_us=$(( 1000000 / $(getconf CLK_TCK) ))

run_cell() { # NAME: prints "req/s CPU-µs-per-request"
  local name="$1" out url before after t0 t1
  if [ "$name" = redis_get ]; then
    local n=$(( seconds * 100000 ))
    t0=$(busy_ticks)
    out=$(redis-benchmark -p "$redis_port" -c 32 --threads 2 -n "$n" -q --csv \
      GET cachecore:bench:payload)
    t1=$(busy_ticks)
    echo "$(echo "$out" | awk -F'","' 'NR==2 { print $2 }' | tr -d '"') $(awk "BEGIN { print ($t1 - $t0) * $tick_us / $n }")"
    return
  fi
  if [ "$name" = bare ]; then url="http://$upstream"; else url=$(cat "$work/$name.url"); fi
  wrk -t2 -c32 -d1s -s "$work/post.lua" "$url" > /dev/null # warm-up: connections, allocator
  [ "$name" = bare ] || before=$(counts "$url")
  t0=$(busy_ticks)
  out=$(wrk -t2 -c32 -d"${seconds}s" -s "$work/post.lua" "$url")
  t1=$(busy_ticks)
  if echo "$out" | grep -qE 'Non-2xx|Socket errors'; then
    echo "$name: errors under load:" >&2; echo "$out" >&2; exit 1
  fi
  if [ "$name" != bare ]; then
    after=$(counts "$url")
    local done hits others
    done=$(echo "$out" | awk '/requests in/ { print $1 }')
    hits=$(( ${after% *} - ${before% *} ))
    others=$(( ${after#* } - ${before#* } ))
    if [ "$others" -ne 0 ] || [ "$hits" -lt "$done" ]; then
      echo "$name: $done requests measured, $hits hits and $others others in /metrics" >&2; exit 1
    fi
  fi
  local served
  served=$(echo "$out" | awk '/requests in/ { print $1 }')
  echo "$(echo "$out" | awk '/^Requests\/sec/ { print $2 }') $(awk "BEGIN { print ($t1 - $t0) * $tick_us / $served }")"
}

if [ -n "${GATEWAY_CELLS:-}" ]; then
  kept=()
  for name in "${names[@]}"; do
    case " $GATEWAY_CELLS " in *" $name "*) kept+=("$name") ;; esac
  done
  names=("${kept[@]}")
  case " ${names[*]} " in *" bare "*) ;; *) echo "GATEWAY_CELLS must include bare" >&2; exit 1 ;; esac
fi

declare -A results cpus
for round in $(seq "$rounds"); do
  order=("${names[@]}")
  if [ $(( round % 2 )) -eq 0 ]; then
    order=()
    for (( i = ${#names[@]} - 1; i >= 0; i-- )); do order+=("${names[$i]}"); done
  fi
  for name in "${order[@]}"; do
    read -r rps cpu <<< "$(run_cell "$name")"
    results[$name]="${results[$name]:-} $rps"
    cpus[$name]="${cpus[$name]:-} $cpu"
    printf 'round %d %-10s %10.0f req/s %8.1f µs CPU/request\n' "$round" "$name" "$rps" "$cpu" >&2
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
label() {
  case "$1" in
    bare) echo "bare hyper (same request, same bytes)" ;;
    memory) echo "gateway, in-memory store" ;;
    redis) echo "gateway, Redis" ;;
    near) echo "gateway, Redis + near cache" ;;
    redis_get) echo "Redis GET of the payload (redis-benchmark -c 32)" ;;
    base_memory) echo "gateway at $baseline, in-memory store" ;;
    base_redis) echo "gateway at $baseline, Redis" ;;
    base_near) echo "gateway at $baseline, Redis + near cache" ;;
  esac
}
bare=$(echo "${results[bare]}" | median)
echo
echo "wrk -t2 -c32 -d${seconds}s, median of $rounds rounds, RUST_LOG=$RUST_LOG, $(nproc) cores"
echo
bare_cpu=$(echo "${cpus[bare]}" | median)
# Per-round shares: each row's req/s over bare hyper's in the same round (the cells of one
# round are minutes apart at most, so they share more of the VM's moment than the medians do).
shares() { # NAME: the median of the row's per-round shares of bare hyper, in percent
  paste -d' ' <(echo "${results[$1]}" | tr ' ' '\n' | grep -v '^$') \
    <(echo "${results[bare]}" | tr ' ' '\n' | grep -v '^$') | awk '{ printf "%.4f\n", $1 * 100 / $2 }' | median
}
echo "| target | req/s | of bare hyper | median of per-round shares | CPU per request (whole machine) | bare hyper's CPU per request / this row's |"
echo "|---|---:|---:|---:|---:|---:|"
for name in "${names[@]}"; do
  m=$(echo "${results[$name]}" | median)
  c=$(echo "${cpus[$name]}" | median)
  printf '| %s | %.0f | %.0f%% | %.0f%% | %.1f µs | %.0f%% |\n' "$(label "$name")" "$m" \
    "$(awk "BEGIN { print $m * 100 / $bare }")" "$(shares "$name")" "$c" "$(awk "BEGIN { print $bare_cpu * 100 / $c }")"
done
for name in memory redis near; do
  [ -n "${results[$name]:-}" ] && [ -n "${results[base_$name]:-}" ] || continue
  ratios=$(paste -d' ' <(echo "${results[$name]}" | tr ' ' '\n' | grep -v '^$') \
    <(echo "${results[base_$name]}" | tr ' ' '\n' | grep -v '^$') | awk '{ printf "%.2f ", $1 / $2 }')
  printf '\n%s against %s, per round: %s(median %sx)\n' "$(label "$name")" "$baseline" "$ratios" \
    "$(echo "$ratios" | median)"
done
if [ "$with_redis" = 1 ] && [ -z "${near_args:-}" ]; then
  echo "| gateway, Redis + near cache | (slot: the binary has no near-cache flag yet) | |"
fi
