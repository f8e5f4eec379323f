#!/usr/bin/env bash
# Single-message latency of shardq against baselines measured in the same run (issue 10):
#   1. 64 B TCP ping-pong (examples/tcp_pingpong): the network's floor, back to back
#      (neither CPU ever idle) and paced at the bench's 1,000/s (both CPUs idle between
#      round trips, as in every bench row: on a VM each wake-up from idle costs tens of
#      microseconds, so this is the floor the bench rows stand on)
#   2. fio, 4 KiB O_DIRECT writes one at a time (psync, as scripts/bench-baseline.sh):
#      write + fdatasync, and writes to a file opened O_DSYNC, each into fallocated
#      (unwritten) blocks and into blocks written before: the disk's floor
#   3. examples/durable_echo, the least a glommio server does for a durable round trip,
#      driven by `shardq bench produce --batch-size 1 --rate 1000` (the same client as
#      shardq's rows): memory, durable into fallocated blocks (a fresh segment), durable
#      into written blocks (a recycled one), and O_DSYNC into written blocks
#   4. shardq itself with the same bench command: acks memory and durable, `--cores 1`
#      and every core, each on a fresh broker
#   5. durable_echo's blocking client (one request at a time, no tokio) against
#      durable_echo and `shardq --cores 1`: the servers without the tokio client's cost,
#      back to back and paced at 1,000/s (`--rate`; the paced rows against the bench's
#      rows are the tokio client's own cost)
# It prints every figure (p50 / p99 in us) and shardq's overhead over durable_echo
# (difference and ratio), and writes everything to one JSON file.
#
# Usage: scripts/bench-latency.sh [--data-dir DIR] [--json FILE] [--seconds S]
# Bounded: each fio job and each bench run measures S seconds (default 10) after a 1 s
# warm-up; the blocking client sends 10,000 messages a run (10 s when paced), the
# paced ping-pong 10,000 round trips: about 4 minutes in all.
# Environment:
#   BENCH_LATENCY_SHORT=1   a quick pass for tests and CI (about 30 s): 1 s per fio job,
#                           0.5 s warm-up + 1 s per bench run, 300 blocking round trips,
#                           5,000 ping-pongs back to back, 300 paced. Its figures are for checking the script,
#                           not for the record.
#   SHARDQ, DURABLE_ECHO, TCP_PINGPONG
#                           the binaries to use; by default release builds of this
#                           checkout, built when missing (cargo build --release).
# Servers run on the first CPU this process may use (durable_echo `--cpu`; shardq
# `--cores 1` takes the lowest online CPU); clients on the others (`--client-cpus`,
# taskset), so a one-shard server and its client never share a CPU. Installs fio
# and python3 with apt-get when missing. Every server it starts is stopped by pid on exit.
set -euo pipefail

data_dir=${TMPDIR:-/tmp}
json_out=bench-latency.json
seconds=10
while [ $# -gt 0 ]; do
    case "$1" in
        --data-dir) data_dir=$2; shift 2 ;;
        --json) json_out=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        *) echo "usage: $0 [--data-dir DIR] [--json FILE] [--seconds S]" >&2; exit 2 ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
short=${BENCH_LATENCY_SHORT:-0}
if [ "$short" = 1 ]; then
    seconds=1 warmup_s=0.5 fio_ramp_s=0 pingpong_rounds=5000 blocking_messages=300 blocking_warmup=50
else
    warmup_s=1 fio_ramp_s=1 pingpong_rounds=50000 blocking_messages=10000 blocking_warmup=1000
fi
# The one rate every paced row runs at: the bench's, the paced ping-pong's and the paced
# blocking client's.
rate_per_s=1000

# shellcheck source=lib/tools.sh
. "$repo/scripts/lib/tools.sh"
install_missing fio python3

if [ -z "${SHARDQ:-}" ] || [ -z "${DURABLE_ECHO:-}" ] || [ -z "${TCP_PINGPONG:-}" ]; then
    release=${CARGO_TARGET_DIR:-$repo/target}/release
    (cd "$repo" && cargo build --release --bin shardq --example durable_echo --example tcp_pingpong) >&2
    SHARDQ=${SHARDQ:-$release/shardq}
    DURABLE_ECHO=${DURABLE_ECHO:-$release/examples/durable_echo}
    TCP_PINGPONG=${TCP_PINGPONG:-$release/examples/tcp_pingpong}
fi
# shellcheck source=lib/broker.sh
. "$repo/scripts/lib/broker.sh"

mkdir -p "$data_dir"
work=$(mktemp -d "$data_dir/shardq-latency.XXXXXX")
results=$work/results
mkdir -p "$results"
# Every measuring command runs in the background and is waited for, so a signal reaches
# the trap at once and the trap stops it too (bash defers a trap until a foreground
# command ends, and would leave a client or fio running against a removed directory).
measure_pid=
measure() { # output file, command...
    local out=$1 status=0
    shift
    "$@" > "$out" &
    measure_pid=$!
    wait "$measure_pid" || status=$?
    measure_pid=
    return "$status"
}
echo_pid=
stop_echo() {
    [ -z "$echo_pid" ] && return 0
    kill "$echo_pid" 2>/dev/null || true
    wait "$echo_pid" 2>/dev/null || true
    echo_pid=
}
cleanup() {
    if [ -n "$measure_pid" ]; then
        kill "$measure_pid" 2>/dev/null || true
        wait "$measure_pid" 2>/dev/null || true
    fi
    stop_echo
    stop_broker
    rm -rf "$work"
}
trap cleanup EXIT

cpu=$(python3 -c 'import os; print(min(os.sched_getaffinity(0)))')
# The clients run on the other CPUs: a blocking client that the scheduler puts on the
# server's CPU pays a context switch each way (10 us round trips became 55-75 us, at
# random, in unpinned runs). With one CPU there is nothing to choose.
client_cpus=$(python3 -c 'import os; print(",".join(str(c) for c in sorted(os.sched_getaffinity(0)) if c != '"$cpu"'))')
client_pin=()
bench_pin=()
if [ -n "$client_cpus" ]; then
    client_pin=(taskset -c "$client_cpus")
    bench_pin=(--client-cpus "$client_cpus")
fi
fs_type=$(findmnt -no FSTYPE -T "$work" || echo unknown)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "latency: data dir $data_dir ($fs_type), $seconds s a run, servers on CPU $cpu, clients on CPUs ${client_cpus:-$cpu}, load average $load_before" >&2

echo "== TCP ping-pong, 64 B, $pingpong_rounds round trips" >&2
# Between the servers' CPU and the clients', where the other rows' round trips cross.
pingpong_cpus=()
[ -n "$client_cpus" ] && pingpong_cpus=("$cpu" "${client_cpus%%,*}")
measure "$results/tcp_pingpong.json" "$TCP_PINGPONG" "$pingpong_rounds" 64 "${pingpong_cpus[@]}"
if [ ${#pingpong_cpus[@]} -gt 0 ]; then
    echo "== TCP ping-pong, 64 B, $blocking_messages round trips at $rate_per_s/s" >&2
    measure "$results/tcp_pingpong_paced.json" "$TCP_PINGPONG" "$blocking_messages" 64 \
        "${pingpong_cpus[@]}" "$rate_per_s"
else
    # Without a second CPU there is nothing to pin, and the paced form takes the CPUs.
    echo "== TCP ping-pong, 64 B, $blocking_messages round trips at $rate_per_s/s, both on CPU $cpu" >&2
    measure "$results/tcp_pingpong_paced.json" "$TCP_PINGPONG" "$blocking_messages" 64 \
        "$cpu" "$cpu" "$rate_per_s"
fi

# fio: one 4 KiB O_DIRECT write at a time, through io_uring like the broker's (its
# fdatasync is an io_uring request too), else psync where io_uring is refused. Under load
# the engine matters: a blocking fdatasync measured 3.8 ms p50 against 72 us through
# io_uring in the same minute on the 2-vCPU VM (docs/benchmarks.md, issue 10).
# Fallocated files are reserved big enough that the job never wraps into blocks it wrote
# itself (no time_based: it stops at the runtime).
engine=io_uring
if ! fio --name=probe --filename="$work/probe.fio" --rw=write --bs=4k --size=64k --ioengine=io_uring \
        --direct=1 --output=/dev/null >/dev/null 2>&1; then
    engine=psync
fi
rm -f "$work/probe.fio"
fio_job() { # name, blocks (written|fallocated), sync (fdatasync|dsync)
    local name=$1 blocks=$2 sync=$3 layout sync_options
    case "$blocks" in
        written) layout=(--overwrite=1 --size=64M --time_based) ;;
        fallocated) layout=(--fallocate=native --size=$(( (seconds + fio_ramp_s + 1) * 100 ))M) ;;
    esac
    case "$sync" in
        fdatasync) sync_options=(--fdatasync=1) ;;
        dsync) sync_options=(--sync=dsync) ;;
    esac
    echo "== fio $name" >&2
    measure "$results/$name.json" fio --name="$name" --filename="$work/$name.fio" \
        --output-format=json --rw=write --bs=4k --iodepth=1 --ioengine="$engine" --direct=1 \
        --runtime="$seconds" --ramp_time="$fio_ramp_s" "${layout[@]}" "${sync_options[@]}"
    rm -f "$work/$name.fio"
}
fio_job fio_fdatasync_fallocated fallocated fdatasync
fio_job fio_fdatasync_written written fdatasync
fio_job fio_dsync_fallocated fallocated dsync
fio_job fio_dsync_written written dsync

bench_command=(bench produce --topic latency --partitions 2 --message-size 1024 --batch-size 1
    --rate "$rate_per_s" --warmup-s "$warmup_s" --duration-s "$seconds" "${bench_pin[@]}" --quiet)
echo "${bench_command[*]} --acks ACKS --server ADDRESS --server-pid PID" > "$results/bench.command"

bench_run() { # name, acks, address, pid
    echo "== $1: shardq ${bench_command[*]} --acks $2" >&2
    measure "$results/$1.txt" "$SHARDQ" "${bench_command[@]}" --acks "$2" --server "$3" \
        --server-pid "$4" --json "$results/$1.json"
}
blocking_run() { # name, acks, address, client options...
    echo "== $1: durable_echo client --acks $2 ${*:4}" >&2
    measure "$results/$1.json" "${client_pin[@]}" "$DURABLE_ECHO" client "$3" --acks "$2" \
        --messages "$blocking_messages" --warmup "$blocking_warmup" "${@:4}"
}

echo_address=
start_echo() { # name, durable_echo serve options...
    local name=$1; shift
    : > "$work/$name.log"
    "$DURABLE_ECHO" serve --listen 127.0.0.1:0 --cpu "$cpu" --dir "$work/$name.data" "$@" \
        > "$work/$name.log" 2>&1 &
    echo_pid=$!
    for _ in $(seq 1 100); do
        echo_address=$(sed -n 's/^durable_echo serving on //p' "$work/$name.log")
        [ -n "$echo_address" ] && return 0
        if ! kill -0 "$echo_pid" 2>/dev/null; then
            echo "durable_echo exited at start:" >&2
            cat "$work/$name.log" >&2
            echo_pid=
            return 1
        fi
        sleep 0.1
    done
    echo "durable_echo did not start within 10 s" >&2
    return 1
}
echo_run() { # name, acks, durable_echo serve options...
    local name=$1 acks=$2; shift 2
    start_echo "$name" "$@"
    bench_run "$name" "$acks" "$echo_address" "$echo_pid"
    stop_echo
    rm -rf "${work:?}/$name.data"
}
echo_run echo_memory memory --memory
echo_run echo_durable_fallocated durable --blocks fallocated
echo_run echo_durable_written durable --blocks written
echo_run echo_dsync_written durable --blocks written --dsync

port=$((40000 + RANDOM % 10000))
shardq_run() { # name, acks, cores ("" for every core)
    start_broker "$work/$1" "$port" "$3"
    bench_run "$1" "$2" "127.0.0.1:$port" "$BROKER_PID"
    stop_broker
    rm -rf "${work:?}/$1" "$work/$1.log"
}
shardq_run shardq_memory_cores1 memory 1
shardq_run shardq_durable_cores1 durable 1
shardq_run shardq_memory memory ""
shardq_run shardq_durable durable ""

start_echo blocking_echo_memory --memory
blocking_run blocking_echo_memory memory "$echo_address"
blocking_run paced_blocking_echo_memory memory "$echo_address" --rate "$rate_per_s"
stop_echo
start_echo blocking_echo_durable_fallocated --blocks fallocated
blocking_run blocking_echo_durable_fallocated durable "$echo_address"
stop_echo
start_echo paced_blocking_echo_durable_fallocated --blocks fallocated
blocking_run paced_blocking_echo_durable_fallocated durable "$echo_address" --rate "$rate_per_s"
stop_echo
start_broker "$work/blocking_shardq" "$port" 1
blocking_run blocking_shardq_memory_cores1 memory "127.0.0.1:$port"
blocking_run paced_blocking_shardq_memory_cores1 memory "127.0.0.1:$port" --rate "$rate_per_s"
blocking_run blocking_shardq_durable_cores1 durable "127.0.0.1:$port"
blocking_run paced_blocking_shardq_durable_cores1 durable "127.0.0.1:$port" --rate "$rate_per_s"
stop_broker

load_after=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$results" "$json_out" "$data_dir" "$fs_type" "$seconds" "$short" "$cpu" \
    "$load_before" "$load_after" "$engine" "$client_cpus" <<'PY'
import datetime, json, os, sys
results, out, data_dir, fs_type, seconds, short, cpu, load_before, load_after, engine, client_cpus = sys.argv[1:12]

def load(name):
    return json.load(open(os.path.join(results, name + ".json")))

figures = {}
ping = load("tcp_pingpong")
figures["tcp_pingpong_64b"] = {
    "what": f"64 B TCP ping-pong, loopback (examples/tcp_pingpong), back to back, CPUs: {ping.get('cpus', 'not pinned')}",
    "p50_us": ping["p50_us"], "p99_us": ping["p99_us"],
}
paced = load("tcp_pingpong_paced")
figures["tcp_pingpong_64b_paced"] = {
    "what": f"64 B TCP ping-pong, loopback, {paced['rate_per_s']} round trips/s (idle CPUs between), CPUs: {paced['cpus']}",
    "p50_us": paced["p50_us"], "p99_us": paced["p99_us"],
}

def pct(lat, q):
    return round(lat["percentile"].get(q, 0) / 1000.0, 1)

for name, what in [
    ("fio_fdatasync_fallocated", "fio 4 KiB O_DIRECT write + fdatasync, fallocated blocks"),
    ("fio_fdatasync_written", "fio 4 KiB O_DIRECT write + fdatasync, written blocks"),
    ("fio_dsync_fallocated", "fio 4 KiB O_DIRECT write, O_DSYNC, fallocated blocks"),
    ("fio_dsync_written", "fio 4 KiB O_DIRECT write, O_DSYNC, written blocks"),
]:
    job = load(name)["jobs"][0]
    write, sync = job["write"]["clat_ns"], job.get("sync", {}).get("lat_ns", {"percentile": {}})
    figure = {
        "what": what,
        "iops": round(job["write"]["iops"], 1),
        "write_p50_us": pct(write, "50.000000"),
        "write_p99_us": pct(write, "99.000000"),
    }
    if "fdatasync" in name:
        figure["fdatasync_p50_us"] = pct(sync, "50.000000")
        figure["fdatasync_p99_us"] = pct(sync, "99.000000")
        # One durable write is a write then an fdatasync: the sum of their percentiles
        # (an upper bound on the percentile of the sum, close when they are independent).
        figure["p50_us"] = round(figure["write_p50_us"] + figure["fdatasync_p50_us"], 1)
        figure["p99_us"] = round(figure["write_p99_us"] + figure["fdatasync_p99_us"], 1)
    else:
        figure["p50_us"] = figure["write_p50_us"]
        figure["p99_us"] = figure["write_p99_us"]
    figures[name] = figure

bench_rows = [
    ("echo_memory", "durable_echo --memory, bench produce acks memory"),
    ("echo_durable_fallocated", "durable_echo write + fdatasync, fallocated blocks, bench produce acks durable"),
    ("echo_durable_written", "durable_echo write + fdatasync, written blocks, bench produce acks durable"),
    ("echo_dsync_written", "durable_echo O_DSYNC write, written blocks, bench produce acks durable"),
    ("shardq_memory_cores1", "shardq --cores 1, bench produce acks memory"),
    ("shardq_durable_cores1", "shardq --cores 1, bench produce acks durable"),
    ("shardq_memory", "shardq (every core), bench produce acks memory"),
    ("shardq_durable", "shardq (every core), bench produce acks durable"),
]
for name, what in bench_rows:
    bench = load(name)
    latency = bench["produce_latency_us"]
    figures[name] = {
        "what": what,
        "p50_us": round(latency["p50"], 1), "p99_us": round(latency["p99"], 1),
        "p999_us": round(latency["p999"], 1), "max_us": round(latency["max"], 1),
        "messages": bench["produced_messages"],
        "msgs_per_s": bench["produce_msgs_per_s"],
        "unsent_due_messages": bench["unsent_due_messages"],
        "server_cpu_percent": bench["server_cpu_percent"],
        "server_cpus": bench["server_cpus"],
    }
for name, what in [
    ("blocking_echo_memory", "blocking client, durable_echo --memory, acks memory"),
    ("blocking_echo_durable_fallocated", "blocking client, durable_echo fallocated blocks, acks durable"),
    ("blocking_shardq_memory_cores1", "blocking client, shardq --cores 1, acks memory"),
    ("blocking_shardq_durable_cores1", "blocking client, shardq --cores 1, acks durable"),
    ("paced_blocking_echo_memory", "blocking client at the bench's rate, durable_echo --memory, acks memory"),
    ("paced_blocking_echo_durable_fallocated", "blocking client at the bench's rate, durable_echo fallocated blocks, acks durable"),
    ("paced_blocking_shardq_memory_cores1", "blocking client at the bench's rate, shardq --cores 1, acks memory"),
    ("paced_blocking_shardq_durable_cores1", "blocking client at the bench's rate, shardq --cores 1, acks durable"),
]:
    run = load(name)
    figures[name] = {
        "what": what, "p50_us": run["p50_us"], "p99_us": run["p99_us"],
        "p999_us": run["p999_us"], "max_us": run["max_us"], "messages": run["messages"],
    }

# shardq against durable_echo with the same client and the same kind of blocks (a fresh
# broker writes into fallocated segments), and against written blocks (issue 10, step 3).
pairs = [
    ("shardq_memory_cores1", "echo_memory"),
    ("shardq_memory", "echo_memory"),
    ("shardq_durable_cores1", "echo_durable_fallocated"),
    ("shardq_durable", "echo_durable_fallocated"),
    ("shardq_durable_cores1", "echo_durable_written"),
    ("blocking_shardq_memory_cores1", "blocking_echo_memory"),
    ("blocking_shardq_durable_cores1", "blocking_echo_durable_fallocated"),
    ("paced_blocking_shardq_memory_cores1", "paced_blocking_echo_memory"),
    ("paced_blocking_shardq_durable_cores1", "paced_blocking_echo_durable_fallocated"),
    # The same server at the same rate, the tokio client against the blocking one: the
    # tokio client's own cost per round trip.
    ("shardq_memory_cores1", "paced_blocking_shardq_memory_cores1"),
    ("shardq_durable_cores1", "paced_blocking_shardq_durable_cores1"),
]
overhead = []
for ours, base in pairs:
    a, b = figures[ours], figures[base]
    overhead.append({
        "shardq": ours, "baseline": base,
        "p50_diff_us": round(a["p50_us"] - b["p50_us"], 1),
        "p99_diff_us": round(a["p99_us"] - b["p99_us"], 1),
        "p50_ratio": round(a["p50_us"] / b["p50_us"], 2) if b["p50_us"] else None,
        "p99_ratio": round(a["p99_us"] / b["p99_us"], 2) if b["p99_us"] else None,
    })

# Issue 10's goals, against the floors of this run: the back-to-back ping-pong the issue
# names, and the same ping-pong at the bench's rate (the floor a paced client stands on).
written = figures["fio_fdatasync_written"]["p50_us"]
goals = []
for floor in ["tcp_pingpong_64b", "tcp_pingpong_64b_paced"]:
    ping_p50 = figures[floor]["p50_us"]
    for row, limit, slack in [
        ("shardq_memory_cores1", ping_p50 + 25, "ping-pong p50 + 25 us"),
        ("shardq_durable_cores1", ping_p50 + written + 40, "ping-pong p50 + fio written write+fdatasync p50 + 40 us"),
    ]:
        p50 = figures[row]["p50_us"]
        goals.append({
            "figure": row, "floor": floor, "limit": slack,
            "limit_p50_us": round(limit, 1), "p50_us": p50,
            "over_limit_us": round(p50 - limit, 1), "met": p50 <= limit,
        })

result = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "host_cpus": os.cpu_count(),
    "server_cpu": int(cpu),
    "client_cpus": client_cpus or "not pinned (one CPU)",
    "load_average_before": load_before,
    "load_average_after": load_after,
    "short_mode": short == "1",
    "seconds": float(seconds),
    "data_dir": data_dir,
    "filesystem": fs_type,
    "fio_engine": engine,
    "bench_command": open(os.path.join(results, "bench.command")).read().strip(),
    "figures": figures,
    "overhead": overhead,
    "goals": goals,
}
json.dump(result, open(out, "w"), indent=2)

print(f"single-message latency, {result['date']}, {os.cpu_count()} CPUs, data on {fs_type}, fio {engine}, "
      f"load average {load_before} -> {load_after}{' (SHORT MODE)' if short == '1' else ''}")
print(f"  {'figure':<34} {'p50 us':>9} {'p99 us':>9}  what")
for name, figure in figures.items():
    print(f"  {name:<34} {figure['p50_us']:>9.1f} {figure['p99_us']:>9.1f}  {figure['what']}")
print("shardq over the baseline (same run; the client is the one each row names):")
print(f"  {'shardq':<31} {'baseline':<33} {'p50 +us':>8} {'p99 +us':>8} {'p50 x':>6} {'p99 x':>6}")
for row in overhead:
    print(f"  {row['shardq']:<31} {row['baseline']:<33} {row['p50_diff_us']:>8.1f} "
          f"{row['p99_diff_us']:>8.1f} {row['p50_ratio'] or 0:>6.2f} {row['p99_ratio'] or 0:>6.2f}")
print("issue 10's p50 goals against each floor:")
for goal in goals:
    print(f"  {goal['figure']:<24} over {goal['floor']:<24} p50 {goal['p50_us']:>7.1f} us, "
          f"limit {goal['limit_p50_us']:>7.1f} ({goal['limit']}): "
          f"{'met' if goal['met'] else 'missed by %.1f us' % goal['over_limit_us']}")
PY
echo "wrote $json_out" >&2
