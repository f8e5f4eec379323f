#!/usr/bin/env bash
# The same two workloads against peers installed from Debian, on loopback, then shardq:
#   throughput: 1 KiB messages, ~1000 in flight, acked only once the server has them
#               (durable where the peer can be made so), one producer;
#   latency:    one 1 KiB message at a time, its round trip p50 / p99.
# Peers: NATS JetStream (nats-server -js, file storage), Redis Streams (XADD, with
# appendfsync always and with everysec), RabbitMQ (quorum queue, publisher confirms).
# Clients: redis-benchmark for Redis (Debian's own); for NATS and RabbitMQ Debian has no
# bench client, so scripts/peers/peer_client.py (nats-py, pika from PyPI, in a venv).
#
# Usage: scripts/bench-peers.sh [--json FILE] [--seconds S] [--data-dir DIR]
# Bounded (each phase S seconds, default 5), loopback only, every server stopped by pid.
# The Python venv for the peer clients is kept in DIR/shardq-peers-venv as a cache.
# A peer that cannot be installed or started is reported as skipped, not a failure.
set -uo pipefail

json_out=bench-peers.json
seconds=5
data_dir=${TMPDIR:-/tmp}
while [ $# -gt 0 ]; do
    case "$1" in
        --json) json_out=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --data-dir) data_dir=$2; shift 2 ;;
        *) echo "usage: $0 [--json FILE] [--seconds S] [--data-dir DIR]" >&2; exit 2 ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
SHARDQ=${SHARDQ:-$repo/target/release/shardq}
# shellcheck source=lib/broker.sh
. "$repo/scripts/lib/broker.sh"
work=$(mktemp -d "$data_dir/shardq-peers.XXXXXX")
results="$work/results.jsonl"
: > "$results"
server_pid=
epmd_started=
rabbit_dir=
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$server_pid" 2>/dev/null || true
    fi
    [ -n "$server_pid" ] && wait "$server_pid" 2>/dev/null
    server_pid=
}
descendants() { # pid: every descendant pid, deepest last
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}
kill_tree() { # pid: the process and everything under it (RabbitMQ's wrapper -> su -> beam.smp)
    local pids
    pids="$1 $(descendants "$1" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    for _ in $(seq 1 100); do
        # shellcheck disable=SC2086
        kill -0 $pids 2>/dev/null || break
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
}
cleanup() {
    stop_server
    stop_broker
    if [ -n "$epmd_started" ]; then kill "$epmd_started" 2>/dev/null || true; fi
    rm -rf "$work" 2>/dev/null || true
    [ -n "${rabbit_dir:-}" ] && rm -rf "$rabbit_dir"
}
trap cleanup EXIT

record() { # peer, variant, json fragment
    printf '{"peer": "%s", "variant": "%s", %s}\n' "$1" "$2" "${3#\{}" | sed 's/}}$/}/' >> "$results"
}
skip() { # peer, reason
    local reason
    reason=$(printf '%s' "$2" | tr -d '\000-\037"\\' | cut -c1-200)
    echo "SKIP $1: $reason" >&2
    printf '{"peer": "%s", "variant": "skipped", "skipped": "%s"}\n' "$1" "$reason" >> "$results"
}
ensure_packages() { # packages... ; returns non-zero if any cannot be installed
    local missing=()
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    apt-cache policy "${missing[@]}" 2>/dev/null | grep -q "Candidate: (none)" && return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1
}
wait_port() { # port
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

python_env() {
    local venv="$data_dir/shardq-peers-venv"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" >/dev/null 2>&1 || return 1
    fi
    "$venv/bin/python" -c "import nats, pika" 2>/dev/null \
        || "$venv/bin/pip" install -q nats-py pika >/dev/null 2>&1 || return 1
    PEER_PYTHON="$venv/bin/python"
}

# --- Redis Streams ----------------------------------------------------------------
redis_run() { # variant appendfsync
    local variant=$1 fsync=$2 port=$((30000 + RANDOM % 10000))
    mkdir -p "$work/redis-$variant"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$work/redis-$variant" --save "" \
        --appendonly yes --appendfsync "$fsync" --daemonize no --logfile "$work/redis-$variant.log" &
    server_pid=$!
    if ! wait_port "$port"; then skip "redis-$variant" "server did not start"; stop_server; return; fi
    local value
    value=$(head -c 1024 /dev/zero | tr '\0' 'x')
    local n_tp=$((seconds * 60000)) n_lat=$((seconds * 4000))
    local tp lat
    tp=$(timeout $((seconds * 6)) redis-benchmark -p "$port" -c 1 -P 1000 -n "$n_tp" --csv \
        XADD bench '*' v "$value" 2>/dev/null | tail -1)
    lat=$(timeout $((seconds * 6)) redis-benchmark -p "$port" -c 1 -P 1 -n "$n_lat" --csv \
        XADD bench '*' v "$value" 2>/dev/null | tail -1)
    stop_server
    python3 - "$tp" "$lat" "$variant" "$fsync" >> "$results" <<'PY'
import csv, io, json, sys
def row(text):
    fields = next(csv.reader(io.StringIO(text)))
    return [float(x) for x in fields[1:]]  # rps, avg, min, p50, p95, p99, max (ms)
try:
    tp, lat = row(sys.argv[1]), row(sys.argv[2])
    print(json.dumps({"peer": "redis-streams", "variant": f"appendfsync {sys.argv[4]}",
        "produce_msgs_per_s": tp[0], "consume_msgs_per_s": 0.0,
        "single_p50_us": lat[3] * 1000, "single_p99_us": lat[5] * 1000,
        "client": "redis-benchmark -c 1: -P 1000 for throughput, -P 1 for latency"}))
except Exception as error:
    print(json.dumps({"peer": "redis-streams", "variant": "skipped", "skipped": f"no result: {error}"}))
PY
}
if ensure_packages redis-server redis-tools; then
    redis_run always always
    redis_run everysec everysec
else
    skip redis-streams "redis-server cannot be installed from Debian here"
fi

# --- NATS JetStream -----------------------------------------------------------------
if ensure_packages nats-server && python_env; then
    port=$((30000 + RANDOM % 10000))
    mkdir -p "$work/nats"
    nats-server -js -sd "$work/nats" -a 127.0.0.1 -p "$port" > "$work/nats.log" 2>&1 &
    server_pid=$!
    if wait_port "$port"; then
        out=$(timeout $((seconds * 5)) "$PEER_PYTHON" "$repo/scripts/peers/peer_client.py" nats \
            --port "$port" --seconds "$seconds" 2>"$work/nats-client.err")
        if [ -n "$out" ]; then record nats-jetstream "file storage" "$out"; else skip nats-jetstream "client failed: $(tail -1 "$work/nats-client.err")"; fi
    else
        skip nats-jetstream "server did not start"
    fi
    stop_server
else
    skip nats-jetstream "nats-server or nats-py cannot be installed here"
fi

# --- RabbitMQ -----------------------------------------------------------------------
if ensure_packages rabbitmq-server && python_env; then
    port=$((30000 + RANDOM % 10000))
    epmd_before=$(pgrep -x epmd || true)
    # The Debian wrapper runs the node as user rabbitmq: its directories must be theirs.
    # (its own temp dir: $work may sit under a private 0700 folder)
    rabbit_dir=$(mktemp -d "${TMPDIR:-/tmp}/shardq-rabbit.XXXXXX")
    mkdir -p "$rabbit_dir/mnesia" "$rabbit_dir/log"
    chmod 755 "$rabbit_dir"
    chown -R rabbitmq: "$rabbit_dir" 2>/dev/null || true
    export RABBITMQ_NODE_PORT=$port RABBITMQ_NODENAME="shardqbench$port@localhost" \
        RABBITMQ_MNESIA_BASE="$rabbit_dir/mnesia" RABBITMQ_LOG_BASE="$rabbit_dir/log" \
        RABBITMQ_FEATURE_FLAGS_FILE="$rabbit_dir/feature_flags" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$rabbit_dir/enabled_plugins" \
        RABBITMQ_DIST_PORT=$((port + 20000)) HOME="$rabbit_dir"
    rabbitmq-server > "$work/rabbit.log" 2>&1 &
    server_pid=$!
    if wait_port "$port"; then
        sleep 2
        out=$(timeout $((seconds * 5)) "$PEER_PYTHON" "$repo/scripts/peers/peer_client.py" rabbit \
            --port "$port" --seconds "$seconds" 2>"$work/rabbit-client.err")
        if [ -n "$out" ]; then record rabbitmq "quorum queue, confirms" "$out"; else skip rabbitmq "client failed: $(tail -1 "$work/rabbit-client.err")"; fi
    else
        skip rabbitmq "server did not start within 20 s: $(tail -1 "$work/rabbit.log")"
    fi
    # rabbitmq-server is a shell wrapper: stop the Erlang VM under it too, and the epmd
    # daemon it started (if none ran before).
    [ -z "$epmd_before" ] && epmd_started=$(pgrep -x epmd || true)
    kill_tree "$server_pid"
    wait "$server_pid" 2>/dev/null
    server_pid=
    if [ -n "$epmd_started" ]; then kill "$epmd_started" 2>/dev/null || true; epmd_started=; fi
    unset RABBITMQ_NODE_PORT RABBITMQ_NODENAME RABBITMQ_MNESIA_BASE RABBITMQ_LOG_BASE \
        RABBITMQ_DIST_PORT RABBITMQ_FEATURE_FLAGS_FILE RABBITMQ_ENABLED_PLUGINS_FILE
else
    skip rabbitmq "rabbitmq-server cannot be installed here"
fi

# --- shardq -------------------------------------------------------------------------
if [ -x "$SHARDQ" ]; then
    port=$((30000 + RANDOM % 10000))
    start_broker "$work/shardq" "$port"
    "$SHARDQ" bench produce --server "127.0.0.1:$port" --topic peers-tp --partitions 2 \
        --message-size 1024 --batch-size 1000 --acks durable --duration-s "$seconds" --quiet \
        --json "$work/shardq-tp.json" > /dev/null
    "$SHARDQ" bench produce --server "127.0.0.1:$port" --topic peers-lat --partitions 1 \
        --message-size 1024 --batch-size 1 --acks durable --duration-s "$seconds" \
        --buffer-bytes-max 1100 --quiet --json "$work/shardq-lat.json" > /dev/null
    stop_broker
    python3 - "$work/shardq-tp.json" "$work/shardq-lat.json" >> "$results" <<'PY'
import json, sys
tp, lat = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
print(json.dumps({"peer": "shardq", "variant": "acks durable",
    "produce_msgs_per_s": tp["produce_msgs_per_s"], "consume_msgs_per_s": 0.0,
    "single_p50_us": lat["produce_latency_us"]["p50"], "single_p99_us": lat["produce_latency_us"]["p99"],
    "client": "shardq bench produce: batch 1000 for throughput; batch 1, one message in flight, for latency"}))
PY
else
    skip shardq "no release binary at $SHARDQ (cargo build --release)"
fi

python3 - "$results" "$json_out" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
json.dump(rows, open(sys.argv[2], "w"), indent=2)
ours = next((r for r in rows if r["peer"] == "shardq"), None)
print(f'{"peer":<16} {"variant":<24} {"durable msg/s":>14} {"vs shardq":>9} {"1-msg p50 us":>13} {"p99 us":>9} {"p99 vs shardq":>13}')
for r in rows:
    if r["variant"] == "skipped":
        print(f'{r["peer"]:<16} skipped: {r["skipped"]}')
        continue
    ratio = r["produce_msgs_per_s"] / ours["produce_msgs_per_s"] if ours and ours["produce_msgs_per_s"] else 0
    lat_ratio = r["single_p99_us"] / ours["single_p99_us"] if ours and ours["single_p99_us"] else 0
    print(f'{r["peer"]:<16} {r["variant"]:<24} {r["produce_msgs_per_s"]:>14.0f} {ratio:>9.2f} {r["single_p50_us"]:>13.1f} {r["single_p99_us"]:>9.1f} {lat_ratio:>13.2f}')
PY
echo "wrote $json_out" >&2
