#!/usr/bin/env bash
# Proxy throughput: the inbound sidecar (activator-sidecar inbound) next to nginx as a reverse
# proxy and next to the same sidecar with its fast path off (SIDECAR_FAST_PATH=false: every
# request through hyper, under the same rules), all in front of the same upstream (nginx
# serving a static 200), loaded by the same wrk in the same run. Reports requests/s, latency p50/p99, CPU per request of the proxy, and
# the sidecar's idle RSS. The two alternate for several rounds (a shared VM drifts by tens of
# percent within a minute) and the ratio reported is the median of the per-round ratios; so is
# the ratio of requests per CPU-second of each proxy (what it would serve with cores of its own).
# Installs nginx and wrk from Debian when missing.
#
#   cargo build --release -p activator-sidecar && loadtests/proxy-throughput.sh [seconds] [connections] [rounds]
#
# `connections` may be a comma-separated list (`1,8,32,128`): every round then loads each proxy
# at each count. With JSON=PATH in the environment the rounds are also written there as JSON
# (`loadtests::results::ProxyThroughput`).
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10}"
connections="${2:-64}"
rounds="${3:-3}"
sidecar_bin="${SIDECAR:-target/release/activator-sidecar}"

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx wrk >/dev/null
fi
[ -x "$sidecar_bin" ] || { echo "build it first: cargo build --release -p activator-sidecar" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# Six distinct free ports, all held until all are picked (a released port can come back from
# the very next bind).
read -r upstream nginx_proxy serving admin hyper_serving hyper_admin < <(python3 -c '
import socket
held = [socket.socket() for _ in range(6)]
for s in held: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))')

nginx_conf() { # name workers server-block
  mkdir -p "$work/$1"
  cat > "$work/$1/nginx.conf" <<CONF
daemon off;
master_process on;
worker_processes $2;
pid $work/$1/nginx.pid;
error_log $work/$1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  $3
}
CONF
}
nginx_conf upstream 1 "server { listen 127.0.0.1:$upstream; location / { return 200 'ok'; } }"
nginx_conf proxy auto "upstream app { server 127.0.0.1:$upstream; keepalive 256; }
  server { listen 127.0.0.1:$nginx_proxy; location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"

nginx -c "$work/upstream/nginx.conf" -p "$work/upstream" & pids+=($!)
nginx -c "$work/proxy/nginx.conf" -p "$work/proxy" & proxy_master=$!; pids+=($proxy_master)
QUEUE_SERVING_PORT=$serving QUEUE_ADMIN_PORT=$admin USER_PORT=$upstream MECHA_LOG=warn \
  "$sidecar_bin" inbound & sidecar=$!; pids+=($sidecar)
QUEUE_SERVING_PORT=$hyper_serving QUEUE_ADMIN_PORT=$hyper_admin USER_PORT=$upstream MECHA_LOG=warn \
  SIDECAR_FAST_PATH=false "$sidecar_bin" inbound & hyper_sidecar=$!; pids+=($hyper_sidecar)

for _ in $(seq 200); do
  curl -sf "http://127.0.0.1:$admin/ready" >/dev/null && curl -sf "http://127.0.0.1:$hyper_admin/ready" >/dev/null \
    && curl -sf "http://127.0.0.1:$nginx_proxy/" >/dev/null && break
  sleep 0.05
done
sleep 0.5
idle_rss_kb=$(awk '/VmRSS/ {print $2}' /proc/$sidecar/status)

# CPU ticks (user+system) of a process and its children.
ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$(( total + $(awk '{print $14 + $15}' /proc/$p/stat) ))
  done
  echo "$total"
}
hz=$(getconf CLK_TCK)

IFS=',' read -r -a connection_counts <<<"$connections"
points=()
run() { # name port pid [connections round]
  local before after out rps p50 p99 requests c="${4:-${connection_counts[0]}}"
  local threads=$(( c < 2 ? c : 2 ))   # wrk needs at least one connection per thread
  before=$(ticks "$3")
  out=$(wrk -t"$threads" -c"$c" -d"${duration}s" --latency "http://127.0.0.1:$2/")
  after=$(ticks "$3")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  local cpu_us
  cpu_us=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN { printf "%.1f", t / hz / n * 1e6 }')
  printf '%-28s %6s %12s %10s %10s %14s\n' "$1" "$c" "$rps" "$p50" "$p99" "$cpu_us"
  points+=("$(printf '{"proxy":"%s","connections":%s,"round":%s,"requests_per_s":%s,"cpu_us_per_request":%s,"latency_p50":"%s","latency_p99":"%s"}' \
    "$1" "$c" "${5:-1}" "$rps" "$cpu_us" "$p50" "$p99")")
  echo "$rps" > "$work/$1.rps"
  echo "$cpu_us" > "$work/$1.cpu"
}

echo "wrk -c$connections -d${duration}s per round, $rounds rounds, upstream nginx returning a static 200"
for port in "$nginx_proxy" "$serving" "$hyper_serving"; do   # warm-up
  wrk -t2 -c"${connection_counts[-1]}" -d2s "http://127.0.0.1:$port/" >/dev/null
done
printf '%-28s %6s %12s %10s %10s %14s\n' "proxy" "conns" "requests/s" "p50" "p99" "CPU µs/request"
ratios=()
capacities=()
fast_savings=()
for round in $(seq "$rounds"); do
 for c in "${connection_counts[@]}"; do
  run nginx-reverse-proxy "$nginx_proxy" "$proxy_master" "$c" "$round"
  run mecha-inbound-sidecar "$serving" "$sidecar" "$c" "$round"
  run mecha-inbound-hyper-only "$hyper_serving" "$hyper_sidecar" "$c" "$round"
  # How much less CPU per request the fast path costs than hyper alone (the fast path stays
  # only while this is at least 25%).
  fast_savings+=("$(awk -v f="$(cat "$work/mecha-inbound-sidecar.cpu")" -v h="$(cat "$work/mecha-inbound-hyper-only.cpu")" \
    'BEGIN { printf "%.0f", (1 - f / h) * 100 }')")
  ratios+=("$(awk -v s="$(cat "$work/mecha-inbound-sidecar.rps")" -v n="$(cat "$work/nginx-reverse-proxy.rps")" \
    'BEGIN { printf "%.2f", s / n }')")
  # Requests per CPU-second of the proxy itself: the ratio a proxy with cores of its own sees.
  capacities+=("$(awk -v s="$(cat "$work/mecha-inbound-sidecar.cpu")" -v n="$(cat "$work/nginx-reverse-proxy.cpu")" \
    'BEGIN { printf "%.2f", n / s }')")
  echo "round $round, $c connections: sidecar/nginx ${ratios[-1]} (requests per proxy CPU-second: ${capacities[-1]}); fast path saves ${fast_savings[-1]}% CPU/request over hyper-only"
 done
done
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "throughput ratio sidecar/nginx: $(median "${ratios[@]}") (median of ${ratios[*]})"
echo "requests per proxy CPU-second, sidecar/nginx: $(median "${capacities[@]}") (median of ${capacities[*]})"
echo "CPU per request saved by the fast path over hyper-only: $(median "${fast_savings[@]}")% (median of ${fast_savings[*]}; the fast path earns its place at 25% or more)"
echo "sidecar idle RSS: $((idle_rss_kb / 1024)) MiB ($idle_rss_kb KiB)"
if [ -n "${JSON:-}" ]; then
  joined=$(IFS=,; echo "${points[*]}")
  printf '{"seconds":%s,"rounds":%s,"sidecar_idle_rss_kib":%s,"points":[%s]}\n' \
    "$duration" "$rounds" "$idle_rss_kb" "$joined" > "$JSON"
fi
