#!/usr/bin/env bash
# Coverage-guided fuzzing of the readers of untrusted files (fuzz/, cargo-fuzz + libFuzzer):
# runs each target for SECONDS (default 600), one after another, at low priority, and prints
# one summary line per target. Exits non-zero if any target found a crash, timeout or OOM;
# the input is kept in fuzz/artifacts/<target>/ and the log in fuzz/artifacts/<target>.log.
#
#   scripts/fuzz.sh [SECONDS] [TARGET ...]      targets: safetensors gguf records config
#   cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...   (replays one input)
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors gguf records config)

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

# Longest input per target: room for the seeds to grow, small enough to stay fast.
max_len() {
    case $1 in
        gguf) echo 32768 ;;
        *) echo 8192 ;;
    esac
}

failed=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t.log"
    before=$(ls "fuzz/artifacts/$t" | wc -l)
    echo "== $t: ${secs}s (log: $log)" >&2
    # -malloc_limit_mb: a single allocation above 1 GiB (a length field believed without
    # checking it against the input) is reported as a crash, as is a process above 2 GiB.
    nice -n 10 cargo +nightly fuzz build "$t" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    status=0
    start=$(date +%s)
    nice -n 10 cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=20 \
        -rss_limit_mb=2048 -malloc_limit_mb=1024 -print_final_stats=1 >>"$log" 2>&1 || status=$?
    wall=$(($(date +%s) - start))
    after=$(ls "fuzz/artifacts/$t" | wc -l)
    crashes=$((after - before))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)
    # Fuzzing time as libFuzzer counts it; wall time (with corpus loading) if it stopped early.
    took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    took=${took:-$wall}
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes="? (exit $status, see $log)"
    fi
    [ "$status" -eq 0 ] && [ "$crashes" = 0 ] || failed=1
    summary+=("$(printf '%-12s executions %-10s seconds %-5s exec/s %-7s %-22s crashes %s' \
        "$t" "${execs:-?}" "${took:-?}" "${rate:-?}" "${cov:-cov: ?}" "$crashes")")
done
printf '%s\n' "${summary[@]}"
exit $failed
