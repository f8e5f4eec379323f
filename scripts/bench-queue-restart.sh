#!/usr/bin/env bash
# Restart time with a queue group holding MESSAGES pending messages (docs/queues.md §6:
# the goal is < 1 s added to a restart with 10 million pending). Fills one partition with
# MESSAGES small messages (acks memory), restarts once without any group (the baseline),
# then creates a queue group by receiving and leasing 1,000 of them (its window fills
# with the first 8,192), kill -9s the broker and restarts it: the difference between the
# two restarts is what the group's recovery costs (snapshot + journal + window metadata).
# Usage: scripts/bench-queue-restart.sh [MESSAGES]   (default 10000000)
# Bounded; the broker is stopped by its pid; the data directory is removed at the end.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shardq=$repo/target/release/shardq
messages=${1:-10000000}
work=$(mktemp -d "$repo/target/bench-queue-restart.XXXXXX")
pid=
cleanup() {
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start() { # sets pid, server, and elapsed to the seconds until "serving on"
    local begin end
    : > "$work/serve.log"
    begin=$(date +%s.%N)
    "$shardq" serve --metrics-listen off --data-dir "$work/data" --listen 127.0.0.1:0 --cores 1 >/dev/null 2>>"$work/serve.log" &
    pid=$!
    for _ in $(seq 1 6000); do
        grep -q "serving on" "$work/serve.log" && break
        kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
        sleep 0.005
    done
    end=$(date +%s.%N)
    grep -q "serving on" "$work/serve.log" || { echo "broker did not start" >&2; exit 1; }
    server=$(sed -n 's/.*serving on \([0-9.]*:[0-9]*\) .*/\1/p' "$work/serve.log" | head -n 1)
    elapsed=$(python3 -c "print(f'{$end - $begin:.3f}')")
}
stop() { kill -TERM "$pid"; wait "$pid" || true; pid=; }

start
"$shardq" bench produce --server "$server" --topic big --partitions 1 --message-size 36 \
    --batch-size 5000 --acks memory --messages "$messages" --quiet --json "$work/fill.json" >&2
du -sh "$work/data" >&2
stop
start; baseline=$elapsed
echo "restart, $messages messages, no group: $baseline s"
"$shardq" receive big --server "$server" --group workers --max 1000 --visibility-ms 3600000 \
    --wait-ms 5000 | wc -l | sed 's/^/leased: /' >&2
"$shardq" group describe big --server "$server" --group workers >&2
kill -9 "$pid"; wait "$pid" 2>/dev/null || true; pid=
start; with_group=$elapsed
echo "restart after kill -9, the same messages pending in a queue group: $with_group s"
"$shardq" group describe big --server "$server" --group workers >&2
python3 -c "print(f'the group added {($with_group - $baseline) * 1000:.0f} ms')"
stop
