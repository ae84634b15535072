#!/usr/bin/env bash
# Runs idemproxy's cargo-fuzz targets one after another, each for a given time, at `nice -n 19`.
#
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
#   SECONDS  fuzzing time per target (default 600)
#   TARGET   key_parser, record_decode, config_load, config_structured, json_canonical,
#            json_pointer, disk_recovery (default: all, in that order)
# Environment:
#   FUZZ_SANITIZER  address (default) or none: no AddressSanitizer, faster; panics and integer
#                   overflows are still caught (debug assertions are always on)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). On a stable toolchain RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz pass its -Z flags. Each target's corpus grows in fuzz/corpus/<target>/ (git-ignored)
# and starts from the kept inputs in fuzz/regressions/<target>/; a crash is written to
# fuzz/artifacts/<target>/. Prints, per target, the executions, exec/s and whether it crashed;
# exits 1 if any target crashed. Logs: fuzz/artifacts/<target>/run.log.
# After a crash: `cargo fuzz tmin <target> <artifact>`, copy the minimised input to
# fuzz/regressions/<target>/ (tests/fuzz_regressions.rs replays it), then fix the code.
set -euo pipefail

cd "$(dirname "$0")"
seconds=${1:-600}
shift $(($# > 0 ? 1 : 0))
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(key_parser record_decode config_load config_structured json_canonical json_pointer disk_recovery)
fi
sanitizer=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
fi

# Inputs libFuzzer saved because they crashed, leaked, ran out of memory or timed out.
count_artifacts() {
    find "artifacts/$1" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'oom-*' -o -name 'timeout-*' \) | wc -l
}

crashed=0
summary=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log="artifacts/$target/run.log"
    before=$(count_artifacts "$target")
    echo "== $target: building, then fuzzing for ${seconds}s (sanitizer: $sanitizer) =="
    nice -n 19 cargo fuzz build --debug-assertions --sanitizer "$sanitizer" "$target"
    start=$(date +%s)
    status=0
    nice -n 19 cargo fuzz run --debug-assertions --sanitizer "$sanitizer" "$target" \
        "corpus/$target" "regressions/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    elapsed=$(($(date +%s) - start))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{n = $2} END {print n + 0}')
    rate=$((elapsed > 0 ? execs / elapsed : 0))
    after=$(count_artifacts "$target")
    corpus=$(find "corpus/$target" -type f | wc -l)
    if [ "$status" -ne 0 ] || [ "$after" -gt "$before" ]; then
        result="CRASH (exit $status), see $log and artifacts/$target/"
        crashed=1
    else
        result="no crash"
    fi
    line="$target: ${elapsed}s, $execs executions, $rate exec/s, corpus $corpus inputs, $result"
    echo "$line"
    summary+=("$line")
done

echo "== summary =="
printf '%s\n' "${summary[@]}"
exit "$crashed"
