#!/usr/bin/env bash
# Queue groups against this host's raw limits, measured in the same run (issue 8's
# goals): throughput of receive + ack with 1% of messages failing every time (they are
# dead-lettered after 3 deliveries), and the single-message receive -> ack round trip
# against 2 x the TCP ping-pong p50 + one durable 4 KiB write (fio, write + fdatasync).
# Usage: scripts/bench-queue.sh [MESSAGES] [WORKERS]   (defaults 1000000 and 4)
# Needs a release build (cargo build --release). Bounded; the broker is stopped by its
# pid; the data directory is removed at the end.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shardq=$repo/target/release/shardq
messages=${1:-1000000}
workers=${2:-4}
work=$(mktemp -d "$repo/target/bench-queue.XXXXXX")
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$repo/scripts/bench-baseline.sh" --data-dir "$work" --seconds 3 --json "$work/baseline.json" >&2

"$shardq" serve --metrics-listen off --data-dir "$work/data" --listen 127.0.0.1:0 >/dev/null 2>"$work/serve.log" &
pid=$!
for _ in $(seq 1 100); do
    grep -q "serving on" "$work/serve.log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
    sleep 0.1
done
server=$(sed -n 's/.*serving on \([0-9.]*:[0-9]*\) .*/\1/p' "$work/serve.log" | head -n 1)
[ -n "$server" ] || { echo "the broker did not start" >&2; cat "$work/serve.log" >&2; exit 1; }

echo "throughput: $messages x 1 KiB, $workers workers, receive and ack batches of 1000, 1% failing" >&2
"$shardq" bench queue --server "$server" --topic throughput --partitions 4 \
    --messages "$messages" --workers "$workers" --receive-batch 1000 --ack-batch 1000 \
    --fail-rate 0.01 --quiet --json "$work/throughput.json" >&2
echo "single message: 20000 x 1 KiB, 1 worker, receive and ack one at a time" >&2
"$shardq" bench queue --server "$server" --topic single --partitions 1 \
    --messages 20000 --workers 1 --receive-batch 1 --ack-batch 1 \
    --quiet --json "$work/single.json" >&2

python3 - "$work" <<'PY'
import json, os, sys
work = sys.argv[1]
load = lambda name: json.load(open(os.path.join(work, name + ".json")))
base, tput, single = load("baseline"), load("throughput"), load("single")
durable_write_us = 1e6 / base["fio_4k_write_fdatasync_iops"]
floor_us = 2 * base["tcp_pingpong_64b_p50_us"] + durable_write_us
lat = single["receive_ack_latency_us"]
print(f'baseline: TCP ping-pong 64 B p50 {base["tcp_pingpong_64b_p50_us"]} us, '
      f'fio 4 KiB write + fdatasync {durable_write_us:.0f} us ({base["fio_4k_write_fdatasync_iops"]} IOPS)')
print(f'throughput: {tput["acked_msgs_per_s"]:.0f} msg/s acked, '
      f'{tput["dead_lettered_messages"]} dead-lettered, '
      f'receive->ack p50 {tput["receive_ack_latency_us"]["p50"]:.0f} us')
print(f'single message receive->ack: p50 {lat["p50"]:.0f} us, p99 {lat["p99"]:.0f} us; '
      f'goal p50 <= 2 x ping-pong p50 + one durable write = {floor_us:.0f} us; '
      f'ratio {lat["p50"] / floor_us:.2f}')
PY
