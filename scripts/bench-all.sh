#!/usr/bin/env bash
# The whole benchmark suite in one run, so every figure has its baseline beside it:
#   1. scripts/bench-baseline.sh  (fio, fdatasync, iperf3, TCP ping-pong)
#   2. shardq W1 durable firehose, W2 single-message latency at a fixed rate, W3 idle
#      (each on a fresh broker in a temp dir on the data dir's filesystem)
#   3. scripts/bench-peers.sh     (NATS JetStream, Redis Streams, RabbitMQ, shardq)
#   4. writes the generated section of docs/benchmarks.md from the JSON
#
# Usage: scripts/bench-all.sh [--data-dir DIR] [--out DIR] [--w1-s S] [--w2-s S]
#                             [--w3-s S] [--peers-s S] [--no-peers] [--perf] [--no-docs]
# Bounded: about 3 minutes with the defaults (W1 10 s, W2 10 s, W3 30 s, peers 5 s
# a phase). --perf samples the whole host with `perf record -e cpu-clock -g` during W1.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
data_dir=${TMPDIR:-/tmp}
out=
w1_s=10 w2_s=10 w3_s=30 peers_s=5
peers=1 perf=0 docs=1
while [ $# -gt 0 ]; do
    case "$1" in
        --data-dir) data_dir=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --w1-s) w1_s=$2; shift 2 ;;
        --w2-s) w2_s=$2; shift 2 ;;
        --w3-s) w3_s=$2; shift 2 ;;
        --peers-s) peers_s=$2; shift 2 ;;
        --no-peers) peers=0; shift ;;
        --perf) perf=1; shift ;;
        --no-docs) docs=0; shift ;;
        *) sed -n '2,14p' "$0" >&2; exit 2 ;;
    esac
done
out=${out:-$repo/target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

(cd "$repo" && cargo build --release --bin shardq --example tcp_pingpong) >&2
SHARDQ=$repo/target/release/shardq
# shellcheck source=lib/broker.sh
. "$repo/scripts/lib/broker.sh"
work=$(mktemp -d "$data_dir/shardq-bench-all.XXXXXX")
perf_pid=
cleanup() {
    if [ -n "$perf_pid" ]; then kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" 2>/dev/null || true; fi
    stop_broker
    rm -rf "$work"
}
trap cleanup EXIT
port=$((40000 + RANDOM % 10000))

echo "== baseline" >&2
"$repo/scripts/bench-baseline.sh" --data-dir "$work" --json "$out/baseline.json" | tee "$out/baseline.txt"

run_workload() { # name, bench arguments...
    local name=$1; shift
    start_broker "$work/$name" "$port"
    echo "== $name: shardq bench $*" >&2
    echo "shardq bench $* --server 127.0.0.1:PORT --server-pid PID --json $name.json --plot $name.svg" > "$out/$name.command"
    "$SHARDQ" bench "$@" --server "127.0.0.1:$port" --server-pid "$BROKER_PID" \
        --json "$out/$name.json" --plot "$out/$name.svg" | tee "$out/$name.txt"
    stop_broker
    rm -rf "$work/$name" "$work/$name.log"
}

if [ "$perf" = 1 ] && command -v perf >/dev/null; then
    # Sample the whole host (broker and client) during W1, after its warm-up.
    ( sleep 4; exec perf record -e cpu-clock -g -a -o "$out/w1.perf.data" -- sleep 5 ) \
        > "$out/w1.perf.log" 2>&1 &
    perf_pid=$!
fi
run_workload w1 e2e --topic w1 --partitions 2 --producers 1 --consumers 1 \
    --message-size 1024 --batch-size 1000 --acks durable --warmup-s 2 --duration-s "$w1_s"
if [ -n "$perf_pid" ]; then
    wait "$perf_pid" 2>/dev/null || true
    perf_pid=
    perf report -i "$out/w1.perf.data" --no-children --sort comm,dso,symbol --stdio 2>/dev/null \
        | grep -E '^ +[0-9]' | head -40 > "$out/w1.perf.txt" || true
    perf report -i "$out/w1.perf.data" --no-children --sort comm --stdio 2>/dev/null \
        | grep -E '^ +[0-9]' | head -10 > "$out/w1.perf-comm.txt" || true
    rm -f "$out/w1.perf.data"
fi
run_workload w2 e2e --topic w2 --partitions 2 --producers 1 --consumers 1 \
    --message-size 1024 --batch-size 1 --acks durable --rate 10000 --warmup-s 1 --duration-s "$w2_s"
# W2 at a rate the broker sustains, so its latency is service time, not a growing queue.
run_workload w2-sustainable e2e --topic w2s --partitions 2 --producers 1 --consumers 1 \
    --message-size 1024 --batch-size 1 --acks durable --rate 1000 --warmup-s 1 --duration-s "$w2_s"
run_workload w3 idle --connections 100 --duration-s "$w3_s"

if [ "$peers" = 1 ]; then
    echo "== peers" >&2
    SHARDQ=$SHARDQ "$repo/scripts/bench-peers.sh" --json "$out/peers.json" --seconds "$peers_s" \
        --data-dir "$work" | tee "$out/peers.txt"
fi

if [ "$docs" = 1 ]; then
    python3 "$repo/scripts/lib/render_benchmarks.py" "$out" "$repo/docs/benchmarks.md"
    echo "updated docs/benchmarks.md from $out" >&2
fi
echo "results in $out" >&2
