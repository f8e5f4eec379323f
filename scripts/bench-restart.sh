#!/usr/bin/env bash
# Restart time with a lot of data: fills a fresh broker with SIZE_GIB GiB in PARTITIONS
# partitions (16 KiB messages, acks memory, then a clean stop), restarts it on the same
# data and reports the time from exec to "serving on" (every partition recovered). Then
# the same after a kill -9 (no clean close: the last segments' indexes are not sealed).
# Usage: scripts/bench-restart.sh [SIZE_GIB] [PARTITIONS]   (defaults 10 and 16)
# Bounded; the broker is stopped by its pid; the data directory is removed at the end.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shardq=$repo/target/release/shardq
size_gib=${1:-10}
partitions=${2:-16}
work=$(mktemp -d "$repo/target/bench-restart.XXXXXX")
port=$((20000 + RANDOM % 20000))
server=127.0.0.1:$port
pid=
cleanup() {
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start() { # sets pid, and elapsed to the seconds until "serving on"
    local begin end
    # No waiting for ports after a kill -9: the broker retries its binds itself, and
    # that wait is part of the restart time a supervisor sees.
    : > "$work/serve.log"
    begin=$(date +%s.%N)
    "$shardq" serve --metrics-listen off --data-dir "$work/data" --listen "$server" >/dev/null 2>>"$work/serve.log" &
    pid=$!
    for _ in $(seq 1 6000); do
        grep -q "serving on" "$work/serve.log" && break
        kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
        sleep 0.005
    done
    end=$(date +%s.%N)
    grep -q "serving on" "$work/serve.log" || { echo "broker did not start" >&2; exit 1; }
    elapsed=$(python3 -c "print(f'{$end - $begin:.3f}')")
}

start; echo "empty start: $elapsed s"
messages=$(( size_gib * 1024 * 1024 / 16 ))
"$shardq" bench produce --server "$server" --topic big --partitions "$partitions" \
    --message-size 16384 --batch-size 60 --acks memory --messages "$messages" --quiet \
    --json "$work/fill.json" >&2
du -sh "$work/data" >&2
kill -TERM "$pid"; wait "$pid" || true; pid=
start; echo "restart after a clean stop, $size_gib GiB in $partitions partitions: $elapsed s"
kill -9 "$pid"; wait "$pid" 2>/dev/null || true; pid=
start; echo "restart after kill -9: $elapsed s"
kill -TERM "$pid"; wait "$pid" || true; pid=
