#!/usr/bin/env bash
# Load benchmark of idemproxy against nginx, on loopback, in one command:
#
#     benches/load.sh              # full run: 3 interleaved rounds of 10 s per variant (~8 min)
#     QUICK=1 benches/load.sh      # smoke run: 2 s per variant (~2 min)
#     BASELINE=f6430ef ONLY="get new replay" benches/load.sh   # A/B of this tree against f6430ef
#
# It installs what is missing (wrk, nginx, redis-server, redis-cli, taskset, python3, via
# apt-get), builds idemproxy in release, and starts on free loopback ports: a fast upstream (nginx
# `return 200`, or the hyper helper examples/bench_upstream.rs with UPSTREAM_KIND=hyper), a fresh
# redis-server (no persistence), idemproxy twice (Redis store, embedded memory store), nginx as a
# `proxy_pass` peer with upstream keepalive, and a bare hyper forwarder (examples/bench_floor.rs:
# what the HTTP stack alone costs, shown as the floor under idemproxy's own work). wrk runs on
# one core, every server on the other (taskset).
# Each scenario interleaves its variants A/B/A/B for ROUNDS rounds. Measured per run: requests/s,
# p50/p99 latency, server CPU µs per request (utime+stime from /proc/PID/stat, per process and
# total), Redis commands per request (INFO commandstats), peak RSS (VmHWM, reset before each run).
# Output: benches/results/latest.md (printed), latest.svg (chart) and latest.json (raw runs).
#
# Replica acknowledgements (issue 14), in the keyed groups `new` and `replay`: a second,
# replicated redis-server (a primary and one replica on loopback, started only when one of those
# groups runs) with two more idemproxies on its primary, `--redis-min-replicas 0` and `1` (each
# in its own database), measured as the variants `replicated-min0` and `replicated-min1` after
# the other keyed variants (scenarios 7 and 8). Their Redis commands are counted on the
# replicated primary, their Redis CPU is primary + replica, their peak RSS is recorded. Target:
# first executions with min_replicas=1 >= 0.7x the throughput with 0; replays unchanged (>= 0.9x).
# They have no baseline twin and no A/B row (an older build may lack --redis-min-replicas).
#
# JSON fingerprint (issue 15), in the keyed group `new`: one more idemproxy on the embedded store
# (the same flags as the embedded one) with `--fingerprint-body json`, measured as the variant
# `embedded-json-fingerprint` right after `idemproxy-embedded`, with the same wrk script and 1 KiB
# JSON body. The pre-flight checks that the canonical path runs (a retry with the body's members
# reordered replays there, and gets 422 from the byte fingerprint). Target: its proxy CPU µs/req
# <= 1.2x the embedded (bytes fingerprint) variant's; listed only when both ran. No baseline twin
# and no A/B row (an older build may lack --fingerprint-body).
#
# Disk store (issue 13), in the keyed groups `new`, `replay` and `storm`: one more idemproxy with
# `--embedded-store disk` on a fresh directory in the temp dir, measured as the variant
# `idemproxy-disk` (scenario 9) against the memory store of `idemproxy-embedded`, its peak RSS
# recorded. Targets (in the report's ratios): first executions >= 0.5x the memory store's
# throughput; replay proxy CPU <= 1.2x the memory store's. No baseline twin and no A/B row (an
# older build lacks --embedded-store and --data-dir). The embedded-store idemproxies of this build
# ask for the memory store explicitly (the default without Redis is now the disk store); a
# baseline's gets IDEMPROXY_EMBEDDED_STORE=memory, which an older build ignores.
#
# With BASELINE=<git revision>, it also builds that revision in release, with the same cargo
# command as this build (the examples it builds change the dependencies' features) (once: in a
# detached git worktree in the temp dir, CARGO_TARGET_DIR target/bench-baseline/cargo, the binary kept as
# target/bench-baseline/<sha>/idemproxy+<examples> for the next runs), starts a baseline idemproxy next to the
# Redis-store and the embedded-store idemproxy with the same flags (its Redis store on database 1 of
# the same redis-server), and runs
# a `…-baseline` variant right after each idemproxy variant in every round. The report's A/B
# section gives, per idemproxy variant, this build vs the baseline: req/s, p99, proxy and total CPU
# µs/req, peak RSS, the ratio, the per-round values, and whether the rounds of the two builds overlap
# (within noise) or not (better/worse). A baseline that refuses this build's flags is an error.
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
#   MEMORY_MAX_ENTRIES=10000000  --memory-max-entries of the embedded-store idemproxies
#   OUT_DIR=benches/results   KEEP_TMP=1 keeps the temp dir (logs, raw data)
#   BASELINE=<git revision>    also measure that revision's idemproxy, interleaved (A/B section)
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
