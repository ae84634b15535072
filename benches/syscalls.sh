#!/usr/bin/env bash
# System calls and context switches per request of one idemproxy under a wrk load, counted by
# `perf stat` on its tracepoints (`syscalls:sys_enter_*`): which waits, wake-ups and reads a
# store adds to a request. Counts do not depend on the machine's speed, so builds can be
# compared on a busy machine where CPU time cannot.
#
#     benches/syscalls.sh                                    # disk store, new keys
#     STORE=memory benches/syscalls.sh
#     SCRIPT=keyed_same.lua IDEMPROXY=/path/to/other/idemproxy benches/syscalls.sh
#
# As in benches/load.sh: the proxy and an nginx `return 200` upstream on core 1, wrk (one
# thread, CONNS connections, benches/wrk/SCRIPT) on core 0, DURATION seconds of load after 1.5 s of
# start-up; the disk store on a fresh directory. Needs perf (linux-perf), nginx and wrk, and a
# release build (`cargo build --release --bin idemproxy`).
set -euo pipefail
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
IDEMPROXY=${IDEMPROXY:-$ROOT/target/release/idemproxy}
STORE=${STORE:-disk}
SCRIPT=${SCRIPT:-keyed_new.lua}
CONNS=${CONNS:-32}
DURATION=${DURATION:-4}
for tool in perf nginx wrk taskset; do
    command -v "$tool" >/dev/null || { echo "syscalls: $tool is missing" >&2; exit 1; }
done
[[ -x $IDEMPROXY ]] || { echo "syscalls: $IDEMPROXY is missing (cargo build --release --bin idemproxy)" >&2; exit 1; }
TMP=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); PROXY=$(free_port); ADMIN=$(free_port)
cat > "$TMP/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $TMP/nginx.pid; error_log $TMP/nginx.err;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$UP; location / { return 200 "ok"; } } }
NGINX
taskset -c 1 nginx -p "$TMP" -c "$TMP/nginx.conf" & pids+=($!)
taskset -c 1 "$IDEMPROXY" --listen "127.0.0.1:$PROXY" --admin-listen "127.0.0.1:$ADMIN" \
    --upstream "http://127.0.0.1:$UP" --embedded-store "$STORE" --data-dir "$TMP/data" \
    --log-filter warn > "$TMP/proxy.log" 2>&1 &
proxy=$!
pids+=($proxy)
sleep 1.5
perf stat -x, -p "$proxy" -e 'context-switches,syscalls:sys_enter_*' -o "$TMP/perf.csv" -- sleep "$DURATION" &
perf=$!
out=$(WRK_LIB="$ROOT/benches/wrk/common.lua" taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" \
    -s "$ROOT/benches/wrk/$SCRIPT" "http://127.0.0.1:$PROXY/orders" -- "syscalls-$RANDOM")
wait "$perf"
requests=$(awk '/requests in/ {print $1}' <<<"$out")
echo "$STORE store, $SCRIPT, $CONNS connections: $requests requests in ${DURATION} s"
awk -F, -v n="$requests" '$1 ~ /^[0-9.]+$/ && $1 > 0 { printf "%-40s %8.3f per request\n", $3, $1 / n }' \
    "$TMP/perf.csv" | sort -k2 -n -r
