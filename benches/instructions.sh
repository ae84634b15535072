#!/usr/bin/env bash
# User-space instructions per request of idemproxy and of the bare hyper forwarder
# (examples/bench_floor.rs), and the difference: idemproxy's own per-request work, counted
# deterministically (valgrind --tool=callgrind), so it can be compared between builds on a noisy
# or shared machine where CPU time per request cannot. This machine's VM has no hardware
# counters (`perf stat -e instructions` is not supported), hence callgrind.
#
#     benches/instructions.sh                     # GET and keyless POST, 2,000 requests each
#     N=4000 KINDS="get" benches/instructions.sh
#     IDEMPROXY=/path/to/other/idemproxy benches/instructions.sh   # another build
#     KINDS="replay new" benches/instructions.sh  # keyed: memory store vs Redis store
#
# Each server runs alone under callgrind (one worker thread) in front of an nginx `return 200`
# upstream, as in benches/load.sh; a Python client sends 200 warm-up requests, the counters are
# zeroed (`callgrind_control -z`), N requests follow over CONNS keep-alive connections, and the
# counters are dumped (`callgrind_control -d`): start-up and shutdown are not counted. The dumps
# stay in OUT (callgrind_annotate them for the per-function breakdown). Needs valgrind, nginx and
# python3, and a release build (`cargo build --release --bin idemproxy --example bench_floor`).
#
# Keyed kinds (the 1 KiB POST with an Idempotency-Key, see benches/instructions_client.py):
# `replay` (one key: every measured request is a replay) and `new` (a new key on every request:
# first executions) run idemproxy on the memory store and on a fresh redis-server (no
# persistence; needs redis-server), and print the difference: the proxy's side of the Redis
# round trips. Under valgrind `sha2` runs its portable SHA-256 (valgrind hides SHA-NI), so the
# fingerprint's share of a keyed count is larger than on the native binary.
set -euo pipefail
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-2000}
CONNS=${CONNS:-4}
KINDS=${KINDS:-"get post"}
IDEMPROXY=${IDEMPROXY:-$ROOT/target/release/idemproxy}
FLOOR=${FLOOR:-$ROOT/target/release/examples/bench_floor}
OUT=${OUT:-$(mktemp -d)}
for tool in valgrind callgrind_control nginx python3; do
    command -v "$tool" >/dev/null || { echo "instructions: $tool is missing" >&2; exit 1; }
done
for bin in "$IDEMPROXY" "$FLOOR"; do
    [[ -x $bin ]] || { echo "instructions: $bin is missing (cargo build --release --bin idemproxy --example bench_floor)" >&2; exit 1; }
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

UP=$(free_port)
mkdir -p "$OUT/nginx"
cat >"$OUT/nginx/nginx.conf" <<CONF
worker_processes 1; daemon off; master_process off; pid $OUT/nginx/nginx.pid; error_log $OUT/nginx/error.log warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path $OUT/nginx/b; proxy_temp_path $OUT/nginx/p; fastcgi_temp_path $OUT/nginx/f;
  uwsgi_temp_path $OUT/nginx/u; scgi_temp_path $OUT/nginx/s;
  server { listen 127.0.0.1:$UP; location / { default_type application/json; return 200 '{"id":"ord_1","status":"created"}\n'; } } }
CONF
nginx -p "$OUT/nginx" -e "$OUT/nginx/error.log" -c "$OUT/nginx/nginx.conf" &
NGINX=$!
trap 'kill $NGINX 2>/dev/null || true' EXIT
wait_port "$UP"


REDIS_PID=
if [[ " $KINDS " == *" replay "* || " $KINDS " == *" new "* ]]; then
    command -v redis-server >/dev/null || { echo "instructions: redis-server is missing" >&2; exit 1; }
    REDIS_PORT=$(free_port)
    mkdir -p "$OUT/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$OUT/redis" \
        --daemonize no --logfile "$OUT/redis/redis.log" &
    REDIS_PID=$!
    wait_port "$REDIS_PORT"
fi
trap 'kill $NGINX 2>/dev/null || true; [[ -z $REDIS_PID ]] || kill $REDIS_PID 2>/dev/null || true' EXIT

# <label> <kind> -> instructions per request; label: floor, idemproxy (memory store) or redis
count() {
    local label=$1 kind=$2 port admin file pid store
    port=$(free_port); admin=$(free_port)
    file=$OUT/$label.$kind.callgrind
    if [[ $label == floor ]]; then
        valgrind --tool=callgrind --callgrind-out-file="$file" "$FLOOR" "127.0.0.1:$port" "127.0.0.1:$UP" 2>"$OUT/$label.$kind.log" &
    else
        store=(--embedded-store memory)
        [[ $label == redis ]] && store=(--redis "redis://127.0.0.1:$REDIS_PORT")
        valgrind --tool=callgrind --callgrind-out-file="$file" "$IDEMPROXY" --listen "127.0.0.1:$port" \
            --admin-listen "127.0.0.1:$admin" --upstream "http://127.0.0.1:$UP" "${store[@]}" \
            --log-filter warn --worker-threads 1 2>"$OUT/$label.$kind.log" &
    fi
    pid=$!
    wait_port "$port" || { echo "instructions: $label did not start (see $OUT/$label.$kind.log)" >&2; exit 1; }
    python3 "$ROOT/benches/instructions_client.py" "$port" 200 1 "$kind"
    callgrind_control -z "$pid" >/dev/null 2>&1
    python3 "$ROOT/benches/instructions_client.py" "$port" "$N" "$CONNS" "$kind"
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill -KILL "$pid"; wait "$pid" 2>/dev/null || true
    local total
    total=$(awk '/^(summary|totals):/ { print $2; exit }' "$file".1)
    echo $((total / N))
}

# One table: for each kind of KINDS among the table's own (the arguments after the sixth), the
# instructions per request of the servers $2 and $3 (columns $4 and $5) and the first's excess
# over the second; $1 heads the rows.
table() {
    local rows=$1 first=$2 second=$3 first_label=$4 second_label=$5 excess_label=$6 header="" kind
    shift 6
    for kind in $KINDS; do
        [[ " $* " == *" $kind "* ]] || continue
        [[ -n $header ]] || printf '%-14s %12s %12s %12s\n' "$rows" "$first_label" "$second_label" "$excess_label"
        header=1
        local a b
        a=$(count "$first" "$kind")
        b=$(count "$second" "$kind")
        printf '%-14s %12s %12s %12s\n' "$kind" "$a" "$b" "$((a - b))"
    done
}

table scenario idemproxy floor idemproxy floor "own work" get post
table keyed redis idemproxy Redis memory "Redis more" replay new
echo "(user-space instructions per request, callgrind, N=$N over $CONNS connections; dumps in $OUT)"
