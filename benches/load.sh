#!/usr/bin/env bash
# Load benchmark of idemproxy against nginx, on loopback, in one command:
#
#     benches/load.sh              # full run: 3 interleaved rounds of 10 s per variant (~8 min)
#     QUICK=1 benches/load.sh      # smoke run: 2 s per variant (~2 min)
#
# It installs what is missing (wrk, nginx, redis-server, redis-cli, taskset, python3, via
# apt-get), builds idemproxy in release, and starts on free loopback ports: a fast upstream (nginx
# `return 200`, or the hyper helper examples/bench_upstream.rs with UPSTREAM_KIND=hyper), a fresh
# redis-server (no persistence), idemproxy three times (Redis store, embedded memory store, disk
# store on a fresh directory in the temp dir), nginx as a
# `proxy_pass` peer with upstream keepalive, and a bare hyper forwarder (examples/bench_floor.rs:
# what the HTTP stack alone costs, shown as the floor under idemproxy's own work). wrk runs on
# one core, every server on the other (taskset).
# Each scenario interleaves its variants A/B/A/B for ROUNDS rounds. Measured per run: requests/s,
# p50/p99 latency, server CPU µs per request (utime+stime from /proc/PID/stat, per process and
# total), Redis commands per request (INFO commandstats), peak RSS (VmHWM, reset before each run).
# Output: benches/results/latest.md (printed), latest.svg (chart) and latest.json (raw runs).
#
# The benchmark is the Python program benches/load/ (standard library only; its report is
# tested by benches/test_load_report.py). This script only makes sure python3 exists and runs it.
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

BENCHES=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)

if ! command -v python3 >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || { echo "[load] ERROR: python3 is missing and there is no apt-get" >&2; exit 1; }
    sudo=()
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || { echo "[load] ERROR: installing python3 needs root or sudo" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo "[load] apt-get install python3" >&2
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3
fi

if (($# > 0)); then
    echo "[load] ERROR: benches/load.sh takes no arguments; settings are environment variables (see its header)" >&2
    exit 2
fi

# Isolated (-I: neither the current directory nor PYTHONPATH can shadow the package).
exec python3 -I -c 'import sys; sys.path.insert(0, sys.argv[1]); from load.__main__ import main; sys.exit(main())' "$BENCHES"
