#!/usr/bin/env bash
# Load benchmark of idemproxy against nginx, on loopback, in one command:
#
#     benches/load.sh              # full run: 3 interleaved rounds of 10 s per variant (~8 min)
#     QUICK=1 benches/load.sh      # smoke run: 2 s per variant (~2 min)
#
# It installs what is missing (wrk, nginx, redis-server, curl, python3, via apt-get), builds
# idemproxy in release, and starts on free loopback ports: a fast upstream (nginx `return 200`,
# or the hyper helper examples/bench_upstream.rs with UPSTREAM_KIND=hyper), a fresh redis-server
# (no persistence), idemproxy twice (Redis store, embedded store), nginx as a `proxy_pass`
# peer with upstream keepalive, and a bare hyper forwarder (examples/bench_floor.rs: what the
# HTTP stack alone costs, shown as the floor under idemproxy's own work). wrk runs on one core,
# every server on the other (taskset).
# Each scenario interleaves its variants A/B/A/B for ROUNDS rounds. Measured per run: requests/s,
# p50/p99 latency, server CPU µs per request (utime+stime from /proc/PID/stat, per process and
# total), Redis commands per request (INFO commandstats), peak RSS (VmHWM, reset before each run).
# Output: benches/results/latest.md (printed), latest.svg (chart) and latest.json (raw runs).
#
# Settings (environment):
#   QUICK=1            2 s runs, 1 s warm-up
#   DURATION=10        seconds per measured run         WARMUP=3   seconds of warm-up per variant
#   ROUNDS=3           interleaved rounds (at least 3)  CONNS=32   wrk connections
#   WRK_THREADS=1      wrk threads                      STORM_WAVE=320  storm: requests per key
#   LOAD_CPUS=0        cores of wrk                     SERVER_CPUS=1   cores of every server
#   UPSTREAM_KIND=nginx|hyper                           PROXY_LOG=warn  idemproxy --log-filter
#   ONLY="get post new replay storm"                    scenario groups to run
#   CALIBRATION_REQUESTS=100  sequential requests for the exact Redis command count (MONITOR)
#   MEMORY_MAX_ENTRIES=10000000  --memory-max-entries of the embedded-store idemproxy
#   OUT_DIR=benches/results   KEEP_TMP=1 keeps the temp dir (logs, raw data)
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
WRK_DIR=$ROOT/benches/wrk
OUT_DIR=${OUT_DIR:-$ROOT/benches/results}

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    DURATION=${DURATION:-2}
    WARMUP=${WARMUP:-1}
else
    DURATION=${DURATION:-10}
    WARMUP=${WARMUP:-3}
fi
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
WRK_THREADS=${WRK_THREADS:-1}
STORM_WAVE=${STORM_WAVE:-320}
PROXY_LOG=${PROXY_LOG:-warn}
UPSTREAM_KIND=${UPSTREAM_KIND:-nginx}
ONLY=${ONLY:-get post new replay storm}
CALIBRATION_REQUESTS=${CALIBRATION_REQUESTS:-100}
# The embedded store keeps every record of the run (key_ttl 24h): its default cap (1M) could fill
# up in a long run of a fast proxy, and a full store answers 503.
MEMORY_MAX_ENTRIES=${MEMORY_MAX_ENTRIES:-10000000}
KEEP_TMP=${KEEP_TMP:-0}

log() { printf '[load] %s\n' "$*" >&2; }
die() {
    printf '[load] ERROR: %s\n' "$*" >&2
    exit 1
}

[[ $DURATION =~ ^[0-9]+$ && $DURATION -ge 1 ]] || die "DURATION must be whole seconds >= 1 (got $DURATION)"
[[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP must be whole seconds (got $WARMUP)"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || die "ROUNDS must be >= 1 (got $ROUNDS)"
((ROUNDS >= 3)) || log "warning: ROUNDS=$ROUNDS; the benchmark wants at least 3 interleaved rounds"
[[ $UPSTREAM_KIND == nginx || $UPSTREAM_KIND == hyper ]] || die "UPSTREAM_KIND must be nginx or hyper"
for group in $ONLY; do
    [[ $group =~ ^(get|post|new|replay|storm)$ ]] || die "unknown group in ONLY: $group"
done

# --- tools ----------------------------------------------------------------------------------

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "missing $*, and there is no apt-get: install it by hand"
    local sudo=()
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "missing $*: installing needs root or sudo"
        sudo=(sudo)
    fi
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        "${sudo[@]}" apt-get update -qq || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" ||
        die "apt-get install $* failed"
}

# ensure COMMAND PACKAGE: installs PACKAGE when COMMAND is not found (also looks in /usr/sbin).
ensure() {
    if ! command -v "$1" >/dev/null 2>&1 && [[ ! -x /usr/sbin/$1 ]]; then
        apt_install "$2"
    fi
    command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 ]] || die "$1 is still missing after installing $2"
}

ensure wrk wrk
ensure nginx nginx
ensure redis-server redis-server
ensure redis-cli redis-tools
ensure curl curl
ensure taskset util-linux
ensure ps procps
ensure python3 python3
command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (https://rustup.rs)"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# --- cores ----------------------------------------------------------------------------------

NCPU=$(nproc)
if ((NCPU >= 2)); then
    LOAD_CPUS=${LOAD_CPUS:-0}
    SERVER_CPUS=${SERVER_CPUS:-1}
    PIN_LOAD=(taskset -c "$LOAD_CPUS")
    PIN_SERVER=(taskset -c "$SERVER_CPUS")
    taskset -c "$LOAD_CPUS" true || die "cannot pin to LOAD_CPUS=$LOAD_CPUS"
    taskset -c "$SERVER_CPUS" true || die "cannot pin to SERVER_CPUS=$SERVER_CPUS"
else
    log "warning: only $NCPU core available: wrk and the servers share it (no pinning)"
    LOAD_CPUS=all
    SERVER_CPUS=all
    PIN_LOAD=()
    PIN_SERVER=()
fi

# --- temp dir, processes, cleanup -----------------------------------------------------------

TMP=$(mktemp -d "${TMPDIR:-/tmp}/idemproxy-load.XXXXXX")
PIDS=()
declare -A PID=()         # role -> main pid
declare -A ROLE_PIDS=()   # role -> every pid of the role (nginx: master + workers)

cleanup() {
    local rc=$? pid i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if ((rc != 0)); then
        local f
        for f in "$TMP"/*.err "$TMP"/*/error.log; do
            [[ -s $f ]] || continue
            printf '[load] --- last lines of %s ---\n' "${f#"$TMP"/}" >&2
            tail -n 15 "$f" >&2 || true
        done
    fi
    if [[ $KEEP_TMP == 1 ]]; then
        log "kept $TMP"
    else
        rm -rf -- "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_server ROLE COMMAND...: starts COMMAND pinned to the server cores, logs in $TMP/ROLE.*
start_server() {
    local role=$1
    shift
    "${PIN_SERVER[@]}" "$@" >"$TMP/$role.out" 2>"$TMP/$role.err" &
    PID[$role]=$!
    ROLE_PIDS[$role]=$!
    PIDS+=("$!")
}

# wait_port ROLE PORT: waits until PORT accepts connections, failing if ROLE's process died.
wait_port() {
    local role=$1 port=$2 i
    for ((i = 0; i < 400; i++)); do
        kill -0 "${PID[$role]}" 2>/dev/null || die "$role exited at start-up (see its log below)"
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    die "$role did not listen on 127.0.0.1:$port within 20 s"
}

# check_alive: every server still runs (a crash is an error, never skipped).
check_alive() {
    local role pid
    for role in "${!ROLE_PIDS[@]}"; do
        for pid in ${ROLE_PIDS[$role]}; do
            kill -0 "$pid" 2>/dev/null || die "$role (pid $pid) died during the benchmark"
        done
    done
}

read -r P_UP P_NGINX P_REDIS P_IDEM P_IDEM_ADMIN P_MEM P_MEM_ADMIN P_FLOOR < <(
    python3 -c '
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
'
)
[[ -n ${P_FLOOR:-} ]] || die "could not pick free ports"

# --- build ----------------------------------------------------------------------------------

log "building idemproxy (release)"
build_args=(--release --bin idemproxy --example bench_floor)
[[ $UPSTREAM_KIND == hyper ]] && build_args+=(--example bench_upstream)
(cd "$ROOT" && cargo build "${build_args[@]}") || die "cargo build failed"
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
# Copies, so a rebuild during the run (a shared target dir) cannot change what is measured.
cp "$TARGET_DIR/release/idemproxy" "$TMP/idemproxy"
cp "$TARGET_DIR/release/examples/bench_floor" "$TMP/bench_floor"
[[ $UPSTREAM_KIND == hyper ]] && cp "$TARGET_DIR/release/examples/bench_upstream" "$TMP/bench_upstream"

# --- servers --------------------------------------------------------------------------------

NGINX_USER_LINE=""
[[ $EUID -eq 0 ]] && NGINX_USER_LINE="user root;"
NGINX_E=()
"$NGINX" -h 2>&1 | grep -q -- '-e filename' && NGINX_E=(-e stderr)
# Temp paths of the modules this nginx has (so nothing is written outside $TMP).
nginx_temp_paths() {
    local dir=$1 v
    v=$("$NGINX" -V 2>&1)
    echo "client_body_temp_path $dir/client_body; proxy_temp_path $dir/proxy;"
    [[ $v == *--without-http_fastcgi_module* ]] || echo "fastcgi_temp_path $dir/fastcgi;"
    [[ $v == *--without-http_uwsgi_module* ]] || echo "uwsgi_temp_path $dir/uwsgi;"
    [[ $v == *--without-http_scgi_module* ]] || echo "scgi_temp_path $dir/scgi;"
}

# start_nginx ROLE SERVER_BLOCK: one nginx (master + 1 worker), own prefix dir, no access log.
start_nginx() {
    local role=$1 server=$2 dir=$TMP/$1
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
$NGINX_USER_LINE
worker_processes 1;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    $(nginx_temp_paths "$dir")
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    $server
}
EOF
    "$NGINX" -t -q -p "$dir" "${NGINX_E[@]}" -c "$dir/nginx.conf" 2>"$TMP/$role.conftest" ||
        die "nginx config of $role is invalid: $(cat "$TMP/$role.conftest")"
    start_server "$role" "$NGINX" -p "$dir" "${NGINX_E[@]}" -c "$dir/nginx.conf"
}

# nginx_workers ROLE: records the master's children (the worker) as part of the role.
nginx_workers() {
    local role=$1 workers i
    for ((i = 0; i < 100; i++)); do
        workers=$(ps -o pid= --ppid "${PID[$role]}" | tr -s ' \n' ' ' || true)
        [[ -n ${workers// /} ]] && break
        sleep 0.05
    done
    [[ -n ${workers// /} ]] || die "$role has no worker process"
    ROLE_PIDS[$role]="${PID[$role]} $workers"
    local w
    for w in $workers; do PIDS+=("$w"); done
}

UPSTREAM_BODY='{"id":"ord_1","status":"created"}'
if [[ $UPSTREAM_KIND == nginx ]]; then
    log "upstream: nginx return 200 on 127.0.0.1:$P_UP"
    start_nginx upstream "server {
        listen 127.0.0.1:$P_UP backlog=4096;
        location / { default_type application/json; return 200 '$UPSTREAM_BODY\n'; }
    }"
    wait_port upstream "$P_UP"
    nginx_workers upstream
else
    log "upstream: examples/bench_upstream (hyper) on 127.0.0.1:$P_UP"
    start_server upstream "$TMP/bench_upstream" "127.0.0.1:$P_UP"
    wait_port upstream "$P_UP"
fi

log "redis-server on 127.0.0.1:$P_REDIS"
mkdir -p "$TMP/redis"
start_server redis redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$TMP/redis" --daemonize no --logfile ""
wait_port redis "$P_REDIS"
REDIS=(redis-cli -h 127.0.0.1 -p "$P_REDIS")
for _ in {1..100}; do
    [[ $("${REDIS[@]}" ping 2>/dev/null) == PONG ]] && break
    sleep 0.05
done
[[ $("${REDIS[@]}" ping) == PONG ]] || die "redis-server does not answer PING"

log "nginx proxy_pass peer on 127.0.0.1:$P_NGINX"
start_nginx nginx "upstream backend {
        server 127.0.0.1:$P_UP;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$P_NGINX backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$host;
        }
    }"
wait_port nginx "$P_NGINX"
nginx_workers nginx

# idemproxy never reads the caller's IDEMPROXY_* or RUST_LOG: only the flags below count.
IDEM_ENV=(env)
while IFS= read -r name; do IDEM_ENV+=(-u "$name"); done < <(compgen -e | grep -E '^(IDEMPROXY_|RUST_LOG$)' || true)

log "idemproxy (Redis store) on 127.0.0.1:$P_IDEM"
start_server idem_redis "${IDEM_ENV[@]}" "$TMP/idemproxy" --listen "127.0.0.1:$P_IDEM" \
    --admin-listen "127.0.0.1:$P_IDEM_ADMIN" --upstream "http://127.0.0.1:$P_UP" \
    --redis "redis://127.0.0.1:$P_REDIS" --log-filter "$PROXY_LOG"
log "idemproxy (embedded store) on 127.0.0.1:$P_MEM"
start_server idem_mem "${IDEM_ENV[@]}" "$TMP/idemproxy" --listen "127.0.0.1:$P_MEM" \
    --admin-listen "127.0.0.1:$P_MEM_ADMIN" --upstream "http://127.0.0.1:$P_UP" \
    --memory-max-entries "$MEMORY_MAX_ENTRIES" --log-filter "$PROXY_LOG"
log "hyper floor (examples/bench_floor.rs) on 127.0.0.1:$P_FLOOR"
start_server floor "$TMP/bench_floor" "127.0.0.1:$P_FLOOR" "127.0.0.1:$P_UP"
wait_port floor "$P_FLOOR"
wait_port idem_redis "$P_IDEM"
wait_port idem_mem "$P_MEM"
for admin in "$P_IDEM_ADMIN" "$P_MEM_ADMIN"; do
    for _ in {1..100}; do
        [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin/readyz") == 200 ]] && break
        sleep 0.1
    done
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin/readyz") == 200 ]] ||
        die "idemproxy admin 127.0.0.1:$admin/readyz is not ready"
done

# --- pre-flight: every path answers as expected -----------------------------------------------

BODY_FILE=$TMP/body.json
python3 -c '
import sys
head, tail = "{\"sku\":\"bench\",\"qty\":1,\"pad\":\"", "\"}"
sys.stdout.write(head + "x" * (1024 - len(head) - len(tail)) + tail)
' >"$BODY_FILE"
[[ $(stat -c %s "$BODY_FILE") == 1024 ]] || die "body file is not 1024 bytes"

URL_DIRECT=http://127.0.0.1:$P_UP/orders
URL_NGINX=http://127.0.0.1:$P_NGINX/orders
URL_IDEM=http://127.0.0.1:$P_IDEM/orders
URL_MEM=http://127.0.0.1:$P_MEM/orders
URL_FLOOR=http://127.0.0.1:$P_FLOOR/orders

# keyed_post URL KEY: prints "<status> <replayed:0|1>"
keyed_post() {
    local headers
    headers=$(curl -s -D - -o /dev/null -X POST -H 'Content-Type: application/json' \
        -H "Idempotency-Key: $2" --data-binary "@$BODY_FILE" "$1") || die "curl $1 failed"
    local status replayed=0
    status=$(head -n 1 <<<"$headers" | awk '{print $2}')
    grep -qi '^idempotent-replayed: *true' <<<"$headers" && replayed=1
    echo "$status $replayed"
}

RUN_SEED=$(date +%s)$(printf '%04x' $RANDOM)
for url in "$URL_DIRECT" "$URL_NGINX" "$URL_FLOOR" "$URL_IDEM" "$URL_MEM"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$url") || die "GET $url failed"
    [[ $code == 200 ]] || die "GET $url answered $code, expected 200"
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
        --data-binary "@$BODY_FILE" "$url") || die "POST $url failed"
    [[ $code == 200 ]] || die "keyless POST $url answered $code, expected 200"
done
for url in "$URL_IDEM" "$URL_MEM"; do
    first=$(keyed_post "$url" "preflight-$RUN_SEED")
    again=$(keyed_post "$url" "preflight-$RUN_SEED")
    [[ $first == "200 0" && $again == "200 1" ]] ||
        die "keyed POST to $url: first '$first', retry '$again'; expected '200 0' then '200 1' (replayed)"
done
log "pre-flight OK (GET, keyless POST, keyed POST + replay on every endpoint)"

# --- measurement ----------------------------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)
RUNS=$TMP/runs
mkdir -p "$RUNS"
RUN_N=0

# ticks ROLE: sets TICKS to utime + stime of the role's processes, in clock ticks.
ticks() {
    local pid stat rest f
    TICKS=0
    for pid in ${ROLE_PIDS[$1]}; do
        stat=$(<"/proc/$pid/stat") || die "$1 (pid $pid) died during the benchmark"
        rest=${stat##*) }
        read -r -a f <<<"$rest"
        TICKS=$((TICKS + f[11] + f[12]))
    done
}

snapshot() {
    local role
    {
        for role in "${!ROLE_PIDS[@]}"; do
            ticks "$role"
            echo "ticks $role $TICKS"
        done
        grep '^cpu[0-9]' /proc/stat | sed 's/^/stat /'
        "${REDIS[@]}" info commandstats | tr -d '\r' |
            sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\).*/redis \1 \2/p'
        echo "time $(date +%s.%N)"
    } >"$1"
}

# Peak RSS is per run: VmHWM is reset (clear_refs 5) before, read after.
PEAK_ROLES=(idem_redis idem_mem nginx)
reset_peaks() {
    local role pid
    for role in "${PEAK_ROLES[@]}"; do
        for pid in ${ROLE_PIDS[$role]}; do
            echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true
        done
    done
}
read_peaks() {
    local role pid kb total
    for role in "${PEAK_ROLES[@]}"; do
        total=0
        for pid in ${ROLE_PIDS[$role]}; do
            kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
            total=$((total + kb))
        done
        echo "peak_kb $role $total"
    done
}

# run_wrk OUT URL SCRIPT ARGS...: wrk on the load cores; fails loudly.
run_wrk() {
    local out=$1 url=$2 script=$3 secs=$4
    shift 4
    if ! WRK_LIB=$WRK_DIR/common.lua "${PIN_LOAD[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${secs}s" \
        --timeout 10s --latency -s "$WRK_DIR/$script" "$url" -- "$@" >"$out" 2>"$out.err"; then
        cat "$out" "$out.err" >&2
        check_alive
        die "wrk failed on $url ($script)"
    fi
    grep -q '^BENCH ' "$out" || {
        cat "$out" "$out.err" >&2
        die "wrk printed no result line ($script)"
    }
}

# A variant: "name|url|wrk script|args|roles"; in args, @SEED becomes a seed unique to the run.
# roles: which processes serve it, as kind:role (kind = proxy, redis or upstream).
expand_args() { sed "s/@SEED/k$RUN_SEED-$RUN_N/g" <<<"$1"; }

measure() {
    local group=$1 round=$2 spec=$3 name url script args roles d
    IFS='|' read -r name url script args roles <<<"$spec"
    RUN_N=$((RUN_N + 1))
    d=$RUNS/$(printf '%03d' "$RUN_N")
    mkdir -p "$d"
    args=$(expand_args "$args")
    printf 'group %s\nvariant %s\nround %s\nscript %s\nroles %s\nurl %s\n' \
        "$group" "$name" "$round" "$script" "$roles" "$url" >"$d/meta"
    check_alive
    reset_peaks
    snapshot "$d/pre"
    # shellcheck disable=SC2086
    run_wrk "$d/wrk.out" "$url" "$script" "$DURATION" $args
    sleep 0.2 # let executions that outlived their client finish
    check_alive
    snapshot "$d/post"
    read_peaks >"$d/peaks"
    local line
    line=$(grep '^BENCH ' "$d/wrk.out")
    python3 - "$line" "$group" "$name" "$round" <<'PY' >&2
import sys
f = dict(kv.split("=") for kv in sys.argv[1].split()[1:])
req, us = int(f["requests"]), int(f["duration_us"])
extra = ""
if f["status_counted"] == "1":
    extra = f"  2xx {f['s2xx']} 409 {f['s409']} 4xx {f['s4xx']} 5xx {f['s5xx']}"
print(f"[load]   {sys.argv[2]:6} {sys.argv[3]:19} round {sys.argv[4]}: {req / (us / 1e6):9.0f} req/s"
      f"  p50 {int(f['p50_us']) / 1000:.2f} ms  p99 {int(f['p99_us']) / 1000:.2f} ms"
      f"  non-2xx {f['non2xx3xx']}{extra}")
PY
}

# run_group GROUP SPEC...: warm-up of every variant, then ROUNDS interleaved rounds.
run_group() {
    local group=$1 spec name url script args roles r
    shift
    log "group $group: warm-up ${WARMUP}s per variant"
    if ((WARMUP > 0)); then
        for spec in "$@"; do
            IFS='|' read -r name url script args roles <<<"$spec"
            RUN_N=$((RUN_N + 1))
            args=$(expand_args "$args")
            # shellcheck disable=SC2086
            run_wrk "$TMP/warmup-$RUN_N.out" "$url" "$script" "$WARMUP" $args
        done
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
        for spec in "$@"; do
            measure "$group" "$r" "$spec"
        done
    done
}

# calibrate NAME KEY_MODE: the exact number of top-level Redis commands per keyed request,
# counted with MONITOR over CALIBRATION_REQUESTS sequential requests (not under load: MONITOR
# is expensive). In-script commands (MONITOR's "lua" source) are not counted.
calibrate() {
    local name=$1 mode=$2 out=$TMP/monitor-$1.txt key i result ok=0 replayed=0 mpid
    if [[ $mode == replay ]]; then
        result=$(keyed_post "$URL_IDEM" "calibrate-replay-$RUN_SEED")
        [[ $result == 200* ]] || die "calibration: creating the replay key answered $result"
    fi
    "${REDIS[@]}" monitor >"$out" &
    mpid=$!
    for _ in {1..100}; do
        [[ -s $out ]] && break
        sleep 0.02
    done
    for ((i = 1; i <= CALIBRATION_REQUESTS; i++)); do
        if [[ $mode == new ]]; then key="calibrate-new-$RUN_SEED-$i"; else key="calibrate-replay-$RUN_SEED"; fi
        result=$(keyed_post "$URL_IDEM" "$key")
        [[ $result == 200* ]] && ok=$((ok + 1))
        [[ $result == *" 1" ]] && replayed=$((replayed + 1))
    done
    sleep 0.3
    kill -TERM "$mpid" 2>/dev/null || true
    wait "$mpid" 2>/dev/null || true
    local top nested
    top=$(grep -E '^[0-9]+\.[0-9]+ \[' "$out" | grep -vc ' lua\]' || true)
    nested=$(grep -E '^[0-9]+\.[0-9]+ \[' "$out" | grep -c ' lua\]' || true)
    local commands
    commands=$(grep -E '^[0-9]+\.[0-9]+ \[' "$out" | grep -v ' lua\]' | awk '{print toupper($4)}' |
        tr -d '"' | sort | uniq -c | awk '{printf "%s%s=%s", (NR>1?",":""), $2, $1}')
    echo "calibration $name requests=$CALIBRATION_REQUESTS ok=$ok replayed=$replayed top=$top nested=$nested commands=$commands" \
        >>"$TMP/calibration"
    log "calibration $name: $top top-level Redis commands over $CALIBRATION_REQUESTS requests ($commands), $nested in scripts"
}

{
    echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "quick $QUICK"
    echo "duration $DURATION"
    echo "warmup $WARMUP"
    echo "rounds $ROUNDS"
    echo "conns $CONNS"
    echo "wrk_threads $WRK_THREADS"
    echo "storm_wave $STORM_WAVE"
    echo "proxy_log $PROXY_LOG"
    echo "upstream_kind $UPSTREAM_KIND"
    echo "load_cpus $LOAD_CPUS"
    echo "server_cpus $SERVER_CPUS"
    echo "clk_tck $CLK_TCK"
    echo "ncpu $NCPU"
    echo "cpu_model $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "kernel $(uname -r)"
    echo "nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///')"
    echo "redis $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')"
    echo "wrk $(wrk -v 2>&1 | head -n 1 | awk '{print $2}')"
    echo "rustc $(rustc --version 2>/dev/null | awk '{print $2}')"
    echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "dirty $(git -C "$ROOT" status --porcelain 2>/dev/null | grep -c . || true)"
    echo "loadavg_start $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$TMP/env"

R=redis:redis
U=upstream:upstream
for group in $ONLY; do
    case $group in
    get)
        run_group get \
            "direct|$URL_DIRECT|get.lua||$U" \
            "nginx|$URL_NGINX|get.lua||proxy:nginx,$U" \
            "hyper-floor|$URL_FLOOR|get.lua||proxy:floor,$U" \
            "idemproxy|$URL_IDEM|get.lua||proxy:idem_redis,$R,$U"
        ;;
    post)
        run_group post \
            "nginx|$URL_NGINX|post.lua||proxy:nginx,$U" \
            "hyper-floor|$URL_FLOOR|post.lua||proxy:floor,$U" \
            "idemproxy|$URL_IDEM|post.lua||proxy:idem_redis,$R,$U"
        ;;
    new)
        run_group new \
            "idemproxy-redis|$URL_IDEM|keyed_new.lua|@SEED|proxy:idem_redis,$R,$U" \
            "idemproxy-embedded|$URL_MEM|keyed_new.lua|@SEED|proxy:idem_mem,$U"
        ;;
    replay)
        for url in "$URL_IDEM" "$URL_MEM"; do
            result=$(keyed_post "$url" "replay-$RUN_SEED")
            [[ $result == "200 0" ]] || die "creating the replay key on $url answered '$result'"
        done
        run_group replay \
            "idemproxy-redis|$URL_IDEM|keyed_same.lua|replay-$RUN_SEED|proxy:idem_redis,$R,$U" \
            "idemproxy-embedded|$URL_MEM|keyed_same.lua|replay-$RUN_SEED|proxy:idem_mem,$U"
        ;;
    storm)
        run_group storm \
            "idemproxy-redis|$URL_IDEM|storm.lua|@SEED $STORM_WAVE|proxy:idem_redis,$R,$U" \
            "idemproxy-embedded|$URL_MEM|storm.lua|@SEED $STORM_WAVE|proxy:idem_mem,$U"
        ;;
    esac
done

: >"$TMP/calibration"
if [[ " $ONLY " == *" new "* ]]; then calibrate first-execution new; fi
if [[ " $ONLY " == *" replay "* ]]; then calibrate replay replay; fi
echo "loadavg_end $(cut -d' ' -f1-3 /proc/loadavg)" >>"$TMP/env"
check_alive
cp "$TMP/idem_redis.err" "$TMP/log-idem_redis.txt"
cp "$TMP/idem_mem.err" "$TMP/log-idem_mem.txt"

# --- report ---------------------------------------------------------------------------------

mkdir -p "$OUT_DIR"
python3 - "$TMP" "$OUT_DIR" <<'PY'
import glob
import json
import os
import statistics
import sys
from html import escape

tmp, out_dir = sys.argv[1], sys.argv[2]


def read_pairs(path):
    out = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                k, _, v = line.partition(" ")
                out[k] = v
    return out


env = read_pairs(os.path.join(tmp, "env"))
clk = int(env["clk_tck"])
server_cpus = env["server_cpus"]


def cpu_ids(spec):
    if spec == "all":
        return None
    ids = set()
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            ids.update(range(int(a), int(b) + 1))
        else:
            ids.add(int(part))
    return ids


server_ids = cpu_ids(server_cpus)


def read_snapshot(path):
    snap = {"ticks": {}, "redis": {}, "stat": {}, "time": 0.0}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "ticks":
                snap["ticks"][parts[1]] = int(parts[2])
            elif parts[0] == "redis":
                snap["redis"][parts[1]] = int(parts[2])
            elif parts[0] == "stat":
                vals = [int(x) for x in parts[2:]]
                # user nice system idle iowait irq softirq steal
                busy = vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + vals[7]
                snap["stat"][int(parts[1][3:])] = (busy, busy + vals[3] + vals[4])
            elif parts[0] == "time":
                snap["time"] = float(parts[1])
    return snap


runs = []
for d in sorted(glob.glob(os.path.join(tmp, "runs", "*"))):
    meta = read_pairs(os.path.join(d, "meta"))
    pre = read_snapshot(os.path.join(d, "pre"))
    post = read_snapshot(os.path.join(d, "post"))
    bench = {}
    with open(os.path.join(d, "wrk.out")) as f:
        for line in f:
            if line.startswith("BENCH "):
                bench = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    peaks = {}
    with open(os.path.join(d, "peaks")) as f:
        for line in f:
            _, role, kb = line.split()
            peaks[role] = int(kb)
    requests = bench["requests"]
    roles = dict(item.split(":")[::-1] for item in meta["roles"].split(","))  # role -> kind
    ticks = {r: post["ticks"][r] - pre["ticks"][r] for r in post["ticks"]}
    per_req = lambda t: t * 1e6 / clk / requests if requests else float("nan")
    cpu = {kind: per_req(ticks[role]) for role, kind in roles.items()}
    redis_delta = {c: post["redis"].get(c, 0) - pre["redis"].get(c, 0) for c in post["redis"]}
    redis_delta.pop("info", None)
    redis_delta = {c: n for c, n in redis_delta.items() if n}
    scripts = sum(n for c, n in redis_delta.items() if c in ("evalsha", "eval", "evalsha_ro", "eval_ro"))
    foreign = None
    if server_ids is not None:
        busy = sum(post["stat"][i][0] - pre["stat"][i][0] for i in server_ids if i in post["stat"])
        total = sum(post["stat"][i][1] - pre["stat"][i][1] for i in server_ids if i in post["stat"])
        ours = sum(ticks.values())
        foreign = max(0.0, (busy - ours) / total) if total else None
        server_busy = busy / total if total else None
    else:
        server_busy = None
    proxy_role = next((r for r, k in roles.items() if k == "proxy"), None)
    runs.append({
        "group": meta["group"], "variant": meta["variant"], "round": int(meta["round"]),
        "requests": requests, "seconds": bench["duration_us"] / 1e6,
        "rps": requests / (bench["duration_us"] / 1e6),
        "p50_ms": bench["p50_us"] / 1000, "p90_ms": bench["p90_us"] / 1000, "p99_ms": bench["p99_us"] / 1000,
        "max_ms": bench["max_us"] / 1000,
        "errors": {k: bench["err_" + k] for k in ("connect", "read", "write", "timeout")},
        "non2xx": bench["non2xx3xx"], "status_counted": bool(bench["status_counted"]),
        "status": {k: bench["s" + k] for k in ("2xx", "3xx", "409", "4xx", "5xx", "other")},
        "cpu_us_per_req": cpu, "cpu_us_per_req_total": sum(cpu.values()),
        "ticks": ticks, "roles": roles,
        "redis_calls": redis_delta, "redis_scripts_per_req": scripts / requests if requests else 0,
        "redis_by_command": {c: n / requests for c, n in redis_delta.items()} if requests else {},
        "redis_calls_per_req": sum(redis_delta.values()) / requests if requests else 0,
        "peak_rss_mib": peaks.get(proxy_role, 0) / 1024 if proxy_role in peaks else None,
        "peaks_kib": peaks, "server_core_busy": server_busy, "server_core_foreign": foreign,
    })

calibration = {}
with open(os.path.join(tmp, "calibration")) as f:
    for line in f:
        parts = line.split()
        if parts and parts[0] == "calibration":
            calibration[parts[1]] = dict(kv.split("=", 1) for kv in parts[2:])

LABELS = {
    ("get", "direct"): ("1", "GET pass-through, small body", "direct to upstream"),
    ("get", "nginx"): ("1", "GET pass-through, small body", "nginx"),
    ("get", "hyper-floor"): ("1", "GET pass-through, small body", "hyper floor (bare forwarder)"),
    ("get", "idemproxy"): ("1", "GET pass-through, small body", "idemproxy"),
    ("post", "nginx"): ("2", "keyless POST 1 KiB", "nginx"),
    ("post", "hyper-floor"): ("2", "keyless POST 1 KiB", "hyper floor (bare forwarder)"),
    ("post", "idemproxy"): ("2", "keyless POST 1 KiB", "idemproxy"),
    ("new", "idemproxy-redis"): ("3", "keyed POST 1 KiB, every key new", "idemproxy, Redis"),
    ("replay", "idemproxy-redis"): ("4", "keyed POST 1 KiB, same key (replay)", "idemproxy, Redis"),
    ("new", "idemproxy-embedded"): ("5", "keyed POST 1 KiB, every key new", "idemproxy, embedded"),
    ("replay", "idemproxy-embedded"): ("5", "keyed POST 1 KiB, same key (replay)", "idemproxy, embedded"),
    ("storm", "idemproxy-redis"): ("6", "retry storm (32 conns, one key per wave)", "idemproxy, Redis"),
    ("storm", "idemproxy-embedded"): ("6", "retry storm (32 conns, one key per wave)", "idemproxy, embedded"),
}
ORDER = list(LABELS)

med = statistics.median
agg = {}
for key in ORDER:
    rs = [r for r in runs if (r["group"], r["variant"]) == key]
    if not rs:
        continue
    kinds = sorted({k for r in rs for k in r["cpu_us_per_req"]}, key=["proxy", "redis", "upstream"].index)
    rss = [r["peak_rss_mib"] for r in rs if r["peak_rss_mib"] is not None]
    foreign = [r["server_core_foreign"] for r in rs if r["server_core_foreign"] is not None]
    agg[key] = {
        "rounds": len(rs),
        "rps": med(r["rps"] for r in rs), "rps_rounds": [r["rps"] for r in rs],
        "p50_ms": med(r["p50_ms"] for r in rs), "p99_ms": med(r["p99_ms"] for r in rs),
        "cpu": {k: med(r["cpu_us_per_req"][k] for r in rs) for k in kinds},
        "cpu_total": med(r["cpu_us_per_req_total"] for r in rs),
        "cpu_total_rounds": [r["cpu_us_per_req_total"] for r in rs],
        "redis_scripts_per_req": med(r["redis_scripts_per_req"] for r in rs),
        "redis_by_command": {c: med(r["redis_by_command"].get(c, 0) for r in rs)
                             for c in sorted({c for r in rs for c in r["redis_by_command"]})},
        "redis_calls_per_req": med(r["redis_calls_per_req"] for r in rs),
        "uses_redis": "redis" in kinds,
        "peak_rss_mib": max(rss) if rss else None,
        "non2xx": sum(r["non2xx"] for r in rs),
        "status_counted": all(r["status_counted"] for r in rs),
        "status": {k: sum(r["status"][k] for r in rs) for k in rs[0]["status"]},
        "socket_errors": sum(sum(r["errors"].values()) for r in rs),
        "requests": sum(r["requests"] for r in rs),
        "foreign": med(foreign) if foreign else None,
    }


def by_command(calls):
    """`SET 1.00 · EVALSHA 1.00 · GET 1.00`: Redis calls per request, most frequent first."""
    shown = sorted(((n, c) for c, n in calls.items() if n >= 0.005), reverse=True)
    return " · ".join(f"{c.upper()} {n:.2f}" for n, c in shown) or "none"


def fmt(x, digits=1):
    if x is None:
        return "—"
    if x >= 1000 and digits <= 1:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


lines = []
w = lines.append
quick = env.get("quick") == "1"
w("# idemproxy load benchmark" + (" (QUICK smoke run: numbers are indicative only)" if quick else ""))
w("")
w(f"Run {env['date']} · commit `{env['commit']}`" + (f" (+{env['dirty']} uncommitted files)" if env["dirty"] != "0" else "")
  + f" · {env['ncpu']} × {env['cpu_model']} · Linux {env['kernel']}")
w(f"nginx {env['nginx']} · redis {env['redis']} · wrk {env['wrk']} · rustc {env['rustc']} · "
  f"upstream: {'nginx `return 200`' if env['upstream_kind'] == 'nginx' else 'examples/bench_upstream (hyper)'}")
w(f"wrk -t{env['wrk_threads']} -c{env['conns']} on core(s) {env['load_cpus']}; every server on core(s) "
  f"{env['server_cpus']}; {env['rounds']} interleaved rounds × {env['duration']} s per variant "
  f"(after {env['warmup']} s warm-up); idemproxy `--log-filter {env['proxy_log']}`, nginx `access_log off`; "
  f"load average {env['loadavg_start']} → {env.get('loadavg_end', '?')}.")
w("")
w("Medians over the rounds. CPU: server utime+stime per completed request, from /proc/PID/stat "
  "(proxy = idemproxy or nginx master+worker). Redis: calls per request by command, from INFO "
  "commandstats, which also counts the commands Lua scripts run inside Redis (no round trip): "
  "the exact round trips per request are the MONITOR calibration under the targets. "
  "RSS: proxy peak (VmHWM, reset before each run), max over rounds.")
w("")
w("| # | scenario | variant | req/s | p50 ms | p99 ms | CPU µs/req proxy | Redis | upstream | **total** "
  "| Redis calls/req by command | Redis cmds/req (all) | peak RSS MiB | non-2xx | req/s per round |")
w("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|")
for key in ORDER:
    if key not in agg:
        continue
    a = agg[key]
    num, scen, variant = LABELS[key]
    c = a["cpu"]
    non2xx = str(a["non2xx"])
    if a["status_counted"]:
        s = a["status"]
        non2xx += f" (409: {s['409']}, 5xx: {s['5xx']})"
    if a["socket_errors"]:
        non2xx += f", socket errors: {a['socket_errors']}"
    w(f"| {num} | {scen} | {variant} | {a['rps']:,.0f} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} "
      f"| {fmt(c.get('proxy'))} | {fmt(c.get('redis'))} | {fmt(c.get('upstream'))} | **{fmt(a['cpu_total'])}** "
      f"| {by_command(a['redis_by_command']) if a['uses_redis'] else '—'} "
      f"| {fmt(a['redis_calls_per_req'], 2) if a['uses_redis'] else '—'} "
      f"| {fmt(a['peak_rss_mib'])} | {non2xx} | {' / '.join(f'{x:,.0f}' for x in a['rps_rounds'])} |")
w("")

# --- targets ---
def get(group, variant):
    return agg.get((group, variant))


targets = []  # (target, measured, result)


def check(name, ok, measured):
    targets.append((name, measured, "n/a" if ok is None else ("PASS" if ok else "FAIL")))


g_i, g_n = get("get", "idemproxy"), get("get", "nginx")
p_i, p_n = get("post", "idemproxy"), get("post", "nginx")
new_r, rep_r, storm_r = get("new", "idemproxy-redis"), get("replay", "idemproxy-redis"), get("storm", "idemproxy-redis")
new_m, rep_m, storm_m = get("new", "idemproxy-embedded"), get("replay", "idemproxy-embedded"), get("storm", "idemproxy-embedded")

if g_i and g_n:
    ratio = g_i["cpu"]["proxy"] / g_n["cpu"]["proxy"]
    check("GET pass-through: idemproxy CPU µs/req ≤ nginx's", ratio <= 1.0,
          f"{g_i['cpu']['proxy']:.1f} vs {g_n['cpu']['proxy']:.1f} µs = **{ratio:.2f}×** "
          f"(totals with upstream: {g_i['cpu_total']:.1f} vs {g_n['cpu_total']:.1f} µs)")
else:
    check("GET pass-through: idemproxy CPU µs/req ≤ nginx's", None, "not run")


def vs(name, a, b, factor, label_a, label_b):
    if a and b:
        limit = factor * b["cpu_total"]
        check(name, a["cpu_total"] <= limit,
              f"{a['cpu_total']:.1f} µs vs {factor} × {b['cpu_total']:.1f} = {limit:.1f} µs "
              f"(**{a['cpu_total'] / b['cpu_total']:.2f}×** {label_b})")
    else:
        check(name, None, "not run")


vs("keyed first execution (Redis): total CPU ≤ 1.5 × nginx keyless POST total", new_r, p_n, 1.5, "", "nginx POST")
vs("replay (Redis): total CPU ≤ 0.6 × nginx GET total", rep_r, g_n, 0.6, "", "nginx GET")


def storm_check(name, storm, replay):
    if storm and replay:
        ratio = storm["rps"] / replay["rps"]
        s = storm["status"]
        fivexx = s["5xx"] + (0 if storm["status_counted"] else storm["non2xx"])
        check(name, ratio >= 0.5 and fivexx == 0 and storm["socket_errors"] == 0,
              f"{storm['rps']:,.0f} vs {replay['rps']:,.0f} req/s = **{ratio:.2f}×**; "
              f"2xx {s['2xx']}, 409 {s['409']}, other 4xx {s['4xx']}, 5xx {s['5xx']}, socket errors {storm['socket_errors']}")
    else:
        check(name, None, "not run")


storm_check("retry storm (Redis): ≥ 0.5 × replay throughput, no 5xx", storm_r, rep_r)


def calib(name, expected, load):
    c = calibration.get(name)
    label = f"Redis commands: exactly {expected} per {name.replace('-', ' ')}"
    if not c:
        check(label, None, "not run")
        return
    n = int(c["requests"])
    per = int(c["top"]) / n
    under_load = (f"; under load (commandstats, script-internal calls included): "
                  f"{by_command(load['redis_by_command'])}" if load else "")
    ok = int(c["ok"]) == n and abs(per - expected) < 1e-9
    check(label, ok, f"**{per:.2f}**/req top-level over {n} sequential requests ({c['commands'] or 'none'}; "
          f"{int(c['nested']) / n:.2f}/req inside scripts; {c['ok']}/{n} answered 200, {c['replayed']} replayed)"
          + under_load)


calib("first-execution", 2, new_r)
calib("replay", 1, rep_r)

redis_proxy = [a["peak_rss_mib"] for k, a in agg.items() if k[1] in ("idemproxy", "idemproxy-redis")]
if redis_proxy:
    peak = max(redis_proxy)
    check("peak RSS < 64 MiB under load (idemproxy, Redis store)", peak < 64, f"**{peak:.1f} MiB**")
else:
    check("peak RSS < 64 MiB under load (idemproxy, Redis store)", None, "not run")

w("## Targets (issue 5)")
w("")
w("| target | measured | result |")
w("|---|---|---|")
for name, measured, result in targets:
    w(f"| {name} | {measured} | **{result}** |")
w("")

# --- floors: what the targets leave for idemproxy's own work ---
floors = []
g_f, p_f = get("get", "hyper-floor"), get("post", "hyper-floor")
if g_f and g_n and g_i:
    floors.append(
        f"GET: a bare hyper forwarder ([examples/bench_floor.rs](../../examples/bench_floor.rs): hyper's "
        f"HTTP/1.1 server and client, nothing else) costs {g_f['cpu']['proxy']:.1f} µs = "
        f"{g_f['cpu']['proxy'] / g_n['cpu']['proxy']:.2f}× nginx; idemproxy's own per-request work "
        f"(routing, RFC 9110 header rewriting, timeouts, pooling, metrics) adds "
        f"{g_i['cpu']['proxy'] - g_f['cpu']['proxy']:.1f} µs on top of it. The target leaves it "
        f"{g_n['cpu']['proxy'] - g_f['cpu']['proxy']:.1f} µs.")
if p_f and p_n and p_i:
    floors.append(
        f"keyless POST: bare hyper forwarder {p_f['cpu']['proxy']:.1f} µs = "
        f"{p_f['cpu']['proxy'] / p_n['cpu']['proxy']:.2f}× nginx; idemproxy {p_i['cpu']['proxy']:.1f} µs.")
if rep_r and rep_m and g_n:
    least = rep_m["cpu_total"] + rep_r["cpu"].get("redis", 0)
    floors.append(
        f"replay (Redis) cannot cost less than the embedded-store replay (the same HTTP and fingerprint "
        f"work, no round trip) plus Redis' own CPU for its one command: {rep_m['cpu_total']:.1f} + "
        f"{rep_r['cpu'].get('redis', 0):.1f} = {least:.1f} µs = **{least / g_n['cpu_total']:.2f}×** nginx GET "
        f"(target ≤ 0.6× = {0.6 * g_n['cpu_total']:.1f} µs), before the proxy's side of the round trip.")
if new_r and p_i and p_n:
    least = p_i["cpu"]["proxy"] + new_r["cpu"].get("redis", 0) + new_r["cpu"].get("upstream", 0)
    floors.append(
        f"first execution (Redis) cannot cost less than a keyless POST through idemproxy plus Redis' CPU "
        f"for its two commands plus the upstream's: {p_i['cpu']['proxy']:.1f} + {new_r['cpu'].get('redis', 0):.1f} + "
        f"{new_r['cpu'].get('upstream', 0):.1f} = {least:.1f} µs = **{least / p_n['cpu_total']:.2f}×** nginx "
        f"keyless POST (target ≤ 1.5× = {1.5 * p_n['cpu_total']:.1f} µs), before fingerprinting and the "
        f"proxy's side of two round trips.")


def bullets(title, items):
    """`title`, then `items` as a list; nothing when there are none."""
    if items:
        w(title)
        w("")
        for item in items:
            w(f"- {item}")
        w("")


bullets("Floors (information: what the HTTP stack and Redis cost before any idemproxy work):", floors)

info = []
if new_m and p_n:
    info.append(f"keyed first execution, embedded: {new_m['cpu_total']:.1f} µs total = "
                f"{new_m['cpu_total'] / p_n['cpu_total']:.2f}× nginx keyless POST (target ≤ 1.5×)")
if rep_m and g_n:
    info.append(f"replay, embedded: {rep_m['cpu_total']:.1f} µs total = "
                f"{rep_m['cpu_total'] / g_n['cpu_total']:.2f}× nginx GET (target ≤ 0.6×)")
if storm_m and rep_m:
    info.append(f"retry storm, embedded: {storm_m['rps'] / rep_m['rps']:.2f}× replay throughput, "
                f"5xx {storm_m['status']['5xx']}, 409 {storm_m['status']['409']}")
mem_rss = [a["peak_rss_mib"] for k, a in agg.items() if k[1] == "idemproxy-embedded" and a["peak_rss_mib"]]
if mem_rss:
    # RSS growth of the embedded store per record: its peak after each first-execution run minus
    # its peak in the run before (where it was idle), over that run's new keys.
    grown, keys = 0, 0
    for prev, run in zip(runs, runs[1:]):
        if (run["group"], run["variant"]) == ("new", "idemproxy-embedded"):
            grown += run["peaks_kib"]["idem_mem"] - prev["peaks_kib"]["idem_mem"]
            keys += run["status"]["2xx"]
    per_record = f"; it grew ≈ {grown / keys:.1f} KiB per stored record in scenario 5" if keys else ""
    info.append(f"peak RSS, embedded store: {max(mem_rss):.1f} MiB (it holds every record of the run in memory"
                f"{per_record})")
if g_i and g_n:
    info.append(f"GET vs nginx: {g_i['rps'] / g_n['rps']:.2f}× throughput, p99 {g_i['p99_ms']:.2f} vs {g_n['p99_ms']:.2f} ms, "
                f"proxy CPU {g_i['cpu']['proxy'] / g_n['cpu']['proxy']:.2f}×, total CPU {g_i['cpu_total'] / g_n['cpu_total']:.2f}×")
if p_i and p_n:
    info.append(f"keyless POST vs nginx: {p_i['rps'] / p_n['rps']:.2f}× throughput, p99 {p_i['p99_ms']:.2f} vs {p_n['p99_ms']:.2f} ms, "
                f"proxy CPU {p_i['cpu']['proxy'] / p_n['cpu']['proxy']:.2f}×, total CPU {p_i['cpu_total'] / p_n['cpu_total']:.2f}×")
bullets("Also (information, no target):", info)

foreign = [a["foreign"] for a in agg.values() if a["foreign"] is not None]
if foreign:
    worst = max(foreign)
    w(f"Noise: CPU time of other processes on the server core(s) during the runs: median per variant up to "
      f"{worst * 100:.0f}%" + (" — the machine was busy; throughput and latency are unreliable, CPU µs/req less so."
                                if worst > 0.05 else "."))
    w("")

# proxy logs: warnings and errors
def log_summary(path):
    counts = {}
    if not os.path.exists(path):
        return counts
    with open(path, errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            level = str(rec.get("level", "")).upper()
            if level in ("WARN", "ERROR"):
                msg = rec.get("fields", {}).get("message") or rec.get("message") or "?"
                counts[(level, msg)] = counts.get((level, msg), 0) + 1
    return counts


log_lines = []
for role, label in (("idem_redis", "idemproxy (Redis store)"), ("idem_mem", "idemproxy (embedded store)")):
    counts = log_summary(os.path.join(tmp, f"log-{role}.txt"))
    if counts:
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
        log_lines.append(f"- {label}: " + "; ".join(f"{n} × {lvl} \"{msg}\"" for (lvl, msg), n in top))
w("Proxy logs (warn and error lines): " + ("none." if not log_lines else ""))
w("")
lines.extend(log_lines)
if log_lines:
    w("")
w("Chart: [latest.svg](latest.svg) · raw runs: [latest.json](latest.json) · re-run: `benches/load.sh`"
  " (`QUICK=1` for a smoke run).")

md = "\n".join(lines) + "\n"
with open(os.path.join(out_dir, "latest.md"), "w") as f:
    f.write(md)
with open(os.path.join(out_dir, "latest.json"), "w") as f:
    json.dump({"env": env, "calibration": calibration, "runs": runs,
               "aggregate": [{"group": k[0], "variant": k[1], **v} for k, v in agg.items()],
               "targets": [{"target": t, "measured": m, "result": r} for t, m, r in targets]}, f, indent=1)

# --- chart (SVG): stacked CPU µs/req per process, and req/s ---
rows = [(k, agg[k]) for k in ORDER if k in agg]
row_h, top, label_w, panel_w, gap = 26, 70, 300, 330, 70
height = top + row_h * len(rows) + 40
width = label_w + 2 * panel_w + gap + 80
colors = {"proxy": "#4e79a7", "redis": "#e15759", "upstream": "#9c9c9c"}
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
       f'font-family="sans-serif" font-size="12">',
       f'<rect width="{width}" height="{height}" fill="white"/>',
       f'<text x="10" y="22" font-size="16" font-weight="bold">idemproxy load benchmark'
       f'{" (QUICK)" if quick else ""} — {escape(env["date"])}, commit {escape(env["commit"])}</text>']
x1 = label_w
x2 = label_w + panel_w + gap
svg.append(f'<text x="{x1}" y="{top - 28}" font-weight="bold">server CPU µs per request (median)</text>')
svg.append(f'<text x="{x2}" y="{top - 28}" font-weight="bold">requests/s (median)</text>')
lx = x1
for kind in ("proxy", "redis", "upstream"):
    svg.append(f'<rect x="{lx}" y="{top - 20}" width="10" height="10" fill="{colors[kind]}"/>'
               f'<text x="{lx + 14}" y="{top - 11}">{kind}</text>')
    lx += 80
max_cpu = max((a["cpu_total"] for _, a in rows), default=1) or 1
max_rps = max((a["rps"] for _, a in rows), default=1) or 1
for i, (key, a) in enumerate(rows):
    y = top + i * row_h
    num, scen, variant = LABELS[key]
    short = {"get": "GET", "post": "keyless POST", "new": "keyed, new key", "replay": "keyed, replay",
             "storm": "retry storm"}[key[0]]
    svg.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(f"{num}. {short} · {variant}")}</text>')
    x = x1
    for kind in ("proxy", "redis", "upstream"):
        v = a["cpu"].get(kind, 0) or 0
        bw = panel_w * v / max_cpu
        if bw > 0:
            svg.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{bw:.1f}" height="{row_h - 8}" fill="{colors[kind]}">'
                       f'<title>{kind}: {v:.1f} µs</title></rect>')
        x += bw
    svg.append(f'<text x="{x + 4:.1f}" y="{y + 15}">{a["cpu_total"]:.1f}</text>')
    bw = panel_w * a["rps"] / max_rps
    svg.append(f'<rect x="{x2}" y="{y + 3}" width="{bw:.1f}" height="{row_h - 8}" fill="#59a14f"/>')
    svg.append(f'<text x="{x2 + bw + 4:.1f}" y="{y + 15}">{a["rps"]:,.0f}</text>')
svg.append(f'<text x="10" y="{height - 12}" fill="#555">{escape(env["ncpu"])} cores; wrk -c{escape(env["conns"])} '
           f'on core {escape(env["load_cpus"])}, servers on core {escape(env["server_cpus"])}; '
           f'{escape(env["rounds"])} rounds × {escape(env["duration"])} s; see latest.md</text>')
svg.append("</svg>")
with open(os.path.join(out_dir, "latest.svg"), "w") as f:
    f.write("\n".join(svg) + "\n")
print(md, end="")
PY
log "wrote $OUT_DIR/latest.md, latest.svg, latest.json"
