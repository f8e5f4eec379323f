#!/usr/bin/env bash
# Raw limits of this host, measured in the same run as the broker benchmarks, so the
# broker's figures can be given as ratios of them:
#   - fio O_DIRECT sequential write and read, 1 MiB blocks, iodepth 32 (io_uring, else libaio)
#   - fio 4 KiB O_DIRECT write + fdatasync per write: the floor under a durable ack
#   - iperf3 loopback TCP throughput
#   - 64-byte TCP ping-pong round trip (examples/tcp_pingpong.rs)
# on the filesystem of the data dir (a temp dir beside it, removed afterwards).
#
# Usage: scripts/bench-baseline.sh [--data-dir DIR] [--json FILE] [--seconds S]
# Bounded: each fio job runs S seconds (default 8), iperf3 5 s, ping-pong 50,000 rounds.
# Installs fio and iperf3 with apt-get when missing. Every server it starts is stopped by pid.
set -euo pipefail

data_dir=${TMPDIR:-/tmp}
json_out=bench-baseline.json
seconds=8
while [ $# -gt 0 ]; do
    case "$1" in
        --data-dir) data_dir=$2; shift 2 ;;
        --json) json_out=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        *) echo "usage: $0 [--data-dir DIR] [--json FILE] [--seconds S]" >&2; exit 2 ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)

# shellcheck source=lib/tools.sh
. "$repo/scripts/lib/tools.sh"
install_missing fio iperf3

mkdir -p "$data_dir"
work=$(mktemp -d "$data_dir/shardq-baseline.XXXXXX")
iperf_pid=
cleanup() {
    if [ -n "$iperf_pid" ] && kill -0 "$iperf_pid" 2>/dev/null; then
        kill "$iperf_pid" 2>/dev/null || true
        wait "$iperf_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

fs_type=$(findmnt -no FSTYPE -T "$work" || echo unknown)
engine=io_uring
if ! fio --name=probe --directory="$work" --rw=write --bs=4k --size=64k --ioengine=io_uring \
        --direct=1 --output=/dev/null >/dev/null 2>&1; then
    engine=libaio
fi
echo "baseline: data dir $data_dir ($fs_type), fio engine $engine, $seconds s per fio job" >&2

fio_json() { # name, extra fio arguments...
    local name=$1; shift
    fio --name="$name" --directory="$work" --output-format=json --time_based \
        --runtime="$seconds" --ramp_time=1 "$@" > "$work/$name.json"
}
fio_json seqwrite --rw=write --bs=1M --iodepth=32 --ioengine="$engine" --direct=1 --size=1G
fio_json seqread --rw=read --bs=1M --iodepth=32 --ioengine="$engine" --direct=1 --size=1G
rm -f "$work"/seqwrite.0.* "$work"/seqread.0.*  # the 1 GiB data files
fio_json fdatasync --rw=write --bs=4k --iodepth=1 --ioengine=psync --direct=1 --fdatasync=1 --size=64M

port=$((20000 + RANDOM % 20000))
iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
iperf_pid=$!
sleep 0.5
iperf3 -c 127.0.0.1 -p "$port" -t 5 -J > "$work/iperf.json"
wait "$iperf_pid" 2>/dev/null || true
iperf_pid=

if [ ! -x "$repo/target/release/examples/tcp_pingpong" ]; then
    (cd "$repo" && cargo build --release --example tcp_pingpong >/dev/null 2>&1)
fi
"$repo/target/release/examples/tcp_pingpong" 50000 64 > "$work/pingpong.json"

python3 - "$work" "$json_out" "$fs_type" "$engine" "$data_dir" <<'PY'
import json, sys, os, datetime
work, out, fs_type, engine, data_dir = sys.argv[1:6]
def fio(name):
    return json.load(open(os.path.join(work, name + ".json")))["jobs"][0]
def pct(lat, q):
    return lat["percentile"].get(q, 0) / 1000.0
sw, sr, fs = fio("seqwrite"), fio("seqread"), fio("fdatasync")
iperf = json.load(open(os.path.join(work, "iperf.json")))
ping = json.load(open(os.path.join(work, "pingpong.json")))
result = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "host_cpus": os.cpu_count(),
    "data_dir": data_dir, "filesystem": fs_type, "fio_engine": engine,
    "fio_seq_write_mb_per_s": round(sw["write"]["bw_bytes"] / 1e6, 1),
    "fio_seq_read_mb_per_s": round(sr["read"]["bw_bytes"] / 1e6, 1),
    "fio_4k_write_fdatasync_iops": round(fs["write"]["iops"], 1),
    "fdatasync_p50_us": round(pct(fs["sync"]["lat_ns"], "50.000000"), 1),
    "fdatasync_p99_us": round(pct(fs["sync"]["lat_ns"], "99.000000"), 1),
    "write_4k_direct_p99_us": round(pct(fs["write"]["clat_ns"], "99.000000"), 1),
    "iperf3_loopback_gbit_per_s": round(iperf["end"]["sum_received"]["bits_per_second"] / 1e9, 2),
    "tcp_pingpong_64b_p50_us": ping["p50_us"],
    "tcp_pingpong_64b_p99_us": ping["p99_us"],
}
json.dump(result, open(out, "w"), indent=2)
rows = [
    ("fio seq write, 1 MiB O_DIRECT qd32", f'{result["fio_seq_write_mb_per_s"]} MB/s'),
    ("fio seq read, 1 MiB O_DIRECT qd32", f'{result["fio_seq_read_mb_per_s"]} MB/s'),
    ("4 KiB O_DIRECT write + fdatasync", f'{result["fio_4k_write_fdatasync_iops"]} /s'),
    ("  fdatasync p50 / p99", f'{result["fdatasync_p50_us"]} / {result["fdatasync_p99_us"]} us'),
    ("  4 KiB write p99", f'{result["write_4k_direct_p99_us"]} us'),
    ("iperf3 loopback", f'{result["iperf3_loopback_gbit_per_s"]} Gbit/s'),
    ("TCP ping-pong 64 B p50 / p99", f'{result["tcp_pingpong_64b_p50_us"]} / {result["tcp_pingpong_64b_p99_us"]} us'),
]
print(f"baseline on {data_dir} ({fs_type}), {os.cpu_count()} CPUs")
for name, value in rows:
    print(f"  {name:<40} {value:>24}")
PY
echo "wrote $json_out" >&2
