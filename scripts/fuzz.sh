#!/usr/bin/env bash
# Runs every cargo-fuzz (libFuzzer) target in fuzz/ for SECONDS each, one after another,
# and prints the executions each reached (libFuzzer's final stats).
# Usage: scripts/fuzz.sh SECONDS [TARGET...]   (default: every target)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a compiler that takes -Z flags: a
# nightly toolchain, or stable with RUSTC_BOOTSTRAP=1 (set here unless already set).
# Built with debug assertions and overflow checks (-a) and without a sanitizer (-s none):
# neither protocol/ nor the recovery scan (over in-memory files) has unsafe code, so
# AddressSanitizer would only halve the executions.
# Seeds: encoded example frames and batches from tests/protocol_properties.rs, and segment
# images from tests/recovery_properties.rs (each file's `dump_fuzz_seeds`), written to
# fuzz/corpus/<target>/ when that folder is missing.
# Crashes land in fuzz/artifacts/<target>/; each one found becomes a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frame_header request_decoders response_decoders batch_validation recovery_scan)
fi
export RUSTC_BOOTSTRAP=${RUSTC_BOOTSTRAP:-1}
flags=(-a -s none)

# The property test file that writes each target's seeds.
seeds_test() {
    case "$1" in
        recovery_scan) echo recovery_properties ;;
        *) echo protocol_properties ;;
    esac
}
dumped=()
for target in "${targets[@]}"; do
    test_name=$(seeds_test "$target")
    if [ ! -d "fuzz/corpus/$target" ] && [[ ! " ${dumped[*]} " =~ " $test_name " ]]; then
        cargo test -q --test "$test_name" -- --ignored dump_fuzz_seeds >/dev/null
        dumped+=("$test_name")
    fi
done
cargo fuzz build "${flags[@]}" >/dev/null

logs=$(mktemp -d "${TMPDIR:-/var/tmp}/shardq-fuzz.XXXXXX")
status=0
printf '%-20s %14s %10s %s\n' target executions exec/s result
for target in "${targets[@]}"; do
    log="$logs/$target.log"
    result=ok
    cargo fuzz run "${flags[@]}" "$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
        >"$log" 2>&1 || { result="CRASH (see $log and fuzz/artifacts/$target/)"; status=1; }
    executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    per_second=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    printf '%-20s %14s %10s %s\n' "$target" "${executions:-?}" "${per_second:-?}" "$result"
done
echo "logs: $logs"
exit $status
