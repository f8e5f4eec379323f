#!/usr/bin/env bash
# Storage engine benchmarks against the raw disk, in the same run:
#   1. scripts/bench-baseline.sh: fio O_DIRECT sequential write/read (1 MiB, qd 32) and
#      4 KiB write + fdatasync latency, on this repository's filesystem;
#   2. cargo bench --bench storage (criterion): durable append throughput (1 and 8
#      partitions, 1000 x 1 KiB batches), one 4 KiB durable batch per round on a fresh
#      vs a recycled segment, fresh segments reserved in 4 MiB steps vs whole (firehose
#      and 4 KiB durable batches), 1 MiB reads from the tail cache vs the disk;
#   3. a table of ratios (ours / raw disk).
# Usage: scripts/bench-storage.sh [--seconds S]   (fio seconds per job, default 5)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
seconds=5
[ "${1:-}" = "--seconds" ] && seconds=$2
out=$(mktemp -d "$repo/target/bench-storage.XXXXXX")
trap 'rm -rf "$out/data"' EXIT
mkdir -p "$out/data"

scripts/bench-baseline.sh --data-dir "$out/data" --json "$out/baseline.json" --seconds "$seconds" >&2
cargo bench --bench storage -- --warm-up-time 1 --measurement-time 4 >&2

python3 - "$out/baseline.json" "$repo/target/criterion" <<'PY'
import json, sys, os
baseline = json.load(open(sys.argv[1]))
root = sys.argv[2]
def mean_ns(group, bench):
    path = os.path.join(root, group, bench, "new", "estimates.json")
    return json.load(open(path))["mean"]["point_estimate"]
batch = 1000 * (1024 + 22) + 48          # bytes of one 1000 x 1 KiB batch
rows = []
seq_write = baseline["fio_seq_write_mb_per_s"]
for partitions in (1, 8):
    per_iteration = batch * 16 if partitions == 1 else batch * 2 * 8
    ns = mean_ns("durable_append_1000x1KiB", f"{partitions}_partitions")
    mb_s = per_iteration / ns * 1e3
    rows.append((f"durable append, {partitions} partition(s)", f"{mb_s:,.0f} MB/s", f"fio seq write {seq_write:,.0f} MB/s", mb_s / seq_write))
fdatasync_p50 = baseline["fdatasync_p50_us"]
for variant in ("fresh_segment", "recycled_segment"):
    us = mean_ns("durable_4KiB_batch", variant) / 1e3
    rows.append((f"4 KiB durable batch, {variant.replace('_', ' ')}", f"{us:,.0f} us mean", f"fdatasync p50 {fdatasync_p50:,.0f} us", us / fdatasync_p50))
firehose = batch * 48
for variant in ("steps", "whole_segment"):
    mb_s = firehose / mean_ns("preallocation", f"firehose_{variant}") * 1e3
    rows.append((f"durable append, fresh segments, reserved {variant.replace('_', ' ')}", f"{mb_s:,.0f} MB/s", f"fio seq write {seq_write:,.0f} MB/s", mb_s / seq_write))
for variant in ("steps", "whole_segment"):
    us = mean_ns("preallocation", f"durable_4KiB_{variant}") / 1e3
    rows.append((f"4 KiB durable batch, fresh segment reserved {variant.replace('_', ' ')}", f"{us:,.0f} us mean", f"fdatasync p50 {fdatasync_p50:,.0f} us", us / fdatasync_p50))
seq_read = baseline["fio_seq_read_mb_per_s"]
for variant in ("tail_cache", "cold_disk"):
    mb_s = (1 << 20) / mean_ns("read_1MiB", variant) * 1e3
    rows.append((f"1 MiB read, {variant.replace('_', ' ')}", f"{mb_s:,.0f} MB/s", f"fio seq read {seq_read:,.0f} MB/s", mb_s / seq_read))
print(f"| what | shardq | raw disk, same run | ratio |")
print(f"|---|---|---|---|")
for what, ours, raw, ratio in rows:
    print(f"| {what} | {ours} | {raw} | {ratio:.2f} |")
PY
