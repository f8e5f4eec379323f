#!/usr/bin/env bash
# Crash torture (issue 7): a real broker under durable produce load is killed with
# SIGKILL at random moments and restarted at once, CYCLES times; after every restart a
# verifier checks that every acknowledged message is there exactly once at its offset,
# offsets are dense and never reused, and nothing appears that was not sent.
#
# Usage: scripts/crash-torture.sh CYCLES [--seed S] [--json FILE] [more options]
# (`target/release/examples/crash_torture --help` lists them). Builds the release broker
# and the torture driver (examples/crash_torture.rs), then runs it. Exit status 0 only
# if every cycle passed. Each cycle takes about 0.5-1.5 s. See docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 CYCLES [--seed S] [--json FILE] [options of examples/crash_torture.rs]" >&2
    exit 2
fi
target=${CARGO_TARGET_DIR:-target}
# One build for both: the example pulls dev-dependency features, and building the two
# separately would build the library twice.
cargo build --release --bin shardq --example crash_torture
# exec: signals reach the driver, which kills its broker on the way out.
exec "$target/release/examples/crash_torture" --broker "$target/release/shardq" "$@"
