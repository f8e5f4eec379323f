#!/usr/bin/env bash
# A real Prometheus scraping a real broker. Starts a broker (ports 0, temporary data
# directory) and a Prometheus scraping its /metrics every second (its own temporary
# storage, a free loopback port), runs load (`shardq bench e2e` and `bench queue`, and a
# fetch past the end of a partition for the error counters), then asks Prometheus' HTTP API for
# a few series and has it evaluate every panel query of tuning/grafana/shardq.json (the
# variables set to All). Fails, saying which, if a series is missing or zero or a query
# is rejected.
#
# Usage: scripts/check-prometheus.sh [path/to/shardq]
#   default target/release/shardq, built with `cargo build --release` if missing.
# Installs prometheus and jq with apt-get when they are not on PATH (needs root then);
# PROMETHEUS=/path/to/prometheus uses that binary instead. SHARDS=N sets the broker's
# shard count (default: 2, or 1 on a one-CPU machine).
#
# Bounded: every wait has a limit, and the broker, Prometheus and the load are stopped by
# their pids on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."

shardq=${1:-target/release/shardq}
shards=${SHARDS:-$(($(nproc) >= 2 ? 2 : 1))}
dashboard=tuning/grafana/shardq.json
# Rates and quantiles look back this far: the whole load, and then some.
window=30s

work=$(mktemp -d "${TMPDIR:-/var/tmp}/shardq-prometheus.XXXXXX")
broker_pid=
prometheus_pid=
load_pid=

# SIGTERM, up to 10 s to exit, then SIGKILL; reaps it.
stop_pid() {
    local pid=$1
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "check-prometheus: pid $pid did not stop in 10 s; killing it" >&2
        kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop_pid "$load_pid"
    stop_pid "$prometheus_pid"
    stop_pid "$broker_pid"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { echo "check-prometheus: $*"; }
fail() {
    echo "check-prometheus: FAILED: $*" >&2
    for log in serve.log prometheus.log load.log; do
        if [ -s "$work/$log" ]; then
            echo "--- last lines of $log ---" >&2
            tail -n 20 "$work/$log" >&2
        fi
    done
    exit 1
}

# --- Tools --------------------------------------------------------------------------
prometheus=${PROMETHEUS:-$(command -v prometheus || true)}
packages=()
[ -n "$prometheus" ] || packages+=(prometheus)
command -v jq >/dev/null || packages+=(jq)
command -v curl >/dev/null || packages+=(curl)
command -v ss >/dev/null || packages+=(iproute2)
if [ ${#packages[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "missing ${packages[*]}: install them (apt-get install ${packages[*]}) or run as root"
    say "installing ${packages[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq >"$work/apt.log" 2>&1 || fail "apt-get update: $(tail -n 5 "$work/apt.log")"
    timeout 600 apt-get install -y -qq --no-install-recommends "${packages[@]}" >>"$work/apt.log" 2>&1 ||
        fail "apt-get install ${packages[*]}: $(tail -n 5 "$work/apt.log")"
    prometheus=${PROMETHEUS:-$(command -v prometheus || true)}
fi
[ -x "$prometheus" ] || fail "no prometheus binary (PROMETHEUS=$prometheus)"
say "$("$prometheus" --version 2>&1 | head -n 1)"

if [ ! -x "$shardq" ]; then
    [ $# -eq 0 ] || fail "$shardq is not an executable"
    say "building $shardq"
    cargo build --release --bin shardq
fi

# --- Broker -------------------------------------------------------------------------
# Port 0 everywhere; the addresses come back on the broker's "serving on" line.
"$shardq" serve --data-dir "$work/data" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --cores "$shards" 2>"$work/serve.log" &
broker_pid=$!
for _ in $(seq 1 100); do
    grep -q "serving on" "$work/serve.log" && break
    kill -0 "$broker_pid" 2>/dev/null || fail "the broker exited before serving"
    sleep 0.1
done
server=$(sed -n 's/.*serving on \([0-9.]*:[0-9]*\) .*/\1/p' "$work/serve.log" | head -n 1)
[ -n "$server" ] || fail "the broker did not start serving within 10 s"
metrics=$(sed -n 's/.*metrics on http:\/\/\([0-9.]*:[0-9]*\)\/metrics.*/\1/p' "$work/serve.log" | head -n 1)
[ -n "$metrics" ] || fail "the broker did not say where its metrics are"
say "broker (pid $broker_pid, $shards shards) on $server, metrics on $metrics"

# --- Prometheus ---------------------------------------------------------------------
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: shardq
    static_configs:
      - targets: ['$metrics']
EOF
# Port 0 too: the kernel picks a free port, read back from the listening socket of this
# pid, so nothing can take it between choosing and binding.
"$prometheus" --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address=127.0.0.1:0 --log.level=warn >"$work/prometheus.log" 2>&1 &
prometheus_pid=$!
prometheus_addr=
for _ in $(seq 1 300); do
    kill -0 "$prometheus_pid" 2>/dev/null || fail "prometheus exited at start"
    prometheus_addr=$(ss -Hltnp 2>/dev/null |
        awk -v pid="pid=$prometheus_pid," 'index($0, pid) { print $4; exit }')
    [ -n "$prometheus_addr" ] && break
    sleep 0.1
done
[ -n "$prometheus_addr" ] || fail "prometheus did not listen within 30 s"
for _ in $(seq 1 300); do
    curl -sf --max-time 2 "http://$prometheus_addr/-/ready" >/dev/null && break
    kill -0 "$prometheus_pid" 2>/dev/null || fail "prometheus exited before it was ready"
    sleep 0.1
done
curl -sf --max-time 2 "http://$prometheus_addr/-/ready" >/dev/null ||
    fail "prometheus was not ready within 30 s"
say "prometheus (pid $prometheus_pid) on $prometheus_addr, scraping every 1s"

# One instant query; prints the API's JSON answer.
query() {
    curl -sG --max-time 5 --data-urlencode "query=$1" "http://$prometheus_addr/api/v1/query"
}

# check LABEL QUERY JQ-CONDITION: asks until the condition holds on the answer's
# .data.result, for up to 20 s; prints the values it saw.
check() {
    local label=$1 promql=$2 condition=$3 answer=
    for _ in $(seq 1 40); do
        answer=$(query "$promql" || true)
        if [ -n "$answer" ] && jq -e ".status == \"success\" and (.data.result | $condition)" \
            <<<"$answer" >/dev/null 2>&1; then
            say "ok: $label: $(jq -r '[.data.result[] | .value[1]] | join(" ")' <<<"$answer")"
            return 0
        fi
        sleep 0.5
    done
    fail "$label: $promql answered ${answer:-nothing}"
}
# jq helpers over a vector result: its values as numbers ("NaN" is not one).
numbers='[.[] | .value[1] | select(. != "NaN" and . != "+Inf" and . != "-Inf") | tonumber]'

check "prometheus scrapes the broker" 'up{job="shardq"}' 'length == 1 and .[0].value[1] == "1"'

# --- Load ---------------------------------------------------------------------------
run_load() {
    local what=$1
    shift
    SHARDQ_SERVER=$server timeout 120 "$shardq" "$@" >>"$work/load.log" 2>&1 &
    load_pid=$!
    wait "$load_pid" || fail "$what failed (status $?)"
    load_pid=
}
say "load: bench e2e for 6 s, bench queue of 2000 messages, a fetch past the end of a partition"
run_load "bench e2e" bench e2e --topic check --partitions 4 --duration-s 6 --rate 5000 \
    --message-size 256 --quiet
run_load "bench queue" bench queue --topic check-queue --messages 2000 --message-size 100 \
    --workers 2 --fail-rate 0.05 --quiet
# A fetch from past the end of a partition: answered offset_out_of_range, counted in
# shardq_errors_total. (A produce to an unknown topic never leaves the CLI, which asks
# for the topic's metadata first.)
if SHARDQ_SERVER=$server timeout 20 "$shardq" consume check --partition 0 --offset 1000000000 \
    --count 1 --timeout-ms 1000 >>"$work/load.log" 2>&1; then
    fail "consuming from past the end of check/0 succeeded"
fi

# --- Series -------------------------------------------------------------------------
check "produce records/s" \
    "sum(rate(shardq_produce_records_total[$window]))" \
    "length == 1 and ($numbers | .[0] > 0)"
check "fetch records/s" \
    "sum(rate(shardq_fetch_records_total[$window]))" \
    "length == 1 and ($numbers | .[0] > 0)"
check "shardq_shard_up of each of $shards shards" \
    'shardq_shard_up' \
    "length == $shards and all(.[]; .value[1] == \"1\")"
# One-chunk rounds are written through O_DSYNC with no fdatasync
# (segment_dsync_write_bytes_max): the fdatasync series is exported but may have seen no
# round in the window (NaN); the O_DSYNC one must have.
check "fdatasync p99 (s), NaN when every round went through O_DSYNC" \
    "histogram_quantile(0.99, sum by (le) (rate(shardq_fdatasync_seconds_bucket[$window])))" \
    "length == 1"
check "O_DSYNC round p99 (s)" \
    "histogram_quantile(0.99, sum by (le) (rate(shardq_dsync_write_seconds_bucket[$window])))" \
    "length == 1 and ($numbers | length == 1 and .[0] > 0)"
check "durable produce p99 (s)" \
    "histogram_quantile(0.99, sum by (le) (rate(shardq_produce_latency_seconds_bucket{acks=\"durable\"}[$window])))" \
    "length == 1 and ($numbers | length == 1 and .[0] > 0)"
check "shardq_log_end_offset of check's 4 partitions" \
    'shardq_log_end_offset{topic="check"}' \
    "length == 4 and ($numbers | add > 0)"
check "queue group acked" \
    'sum(shardq_queue_acked_total{topic="check-queue"})' \
    "length == 1 and ($numbers | .[0] > 0)"
check "offset_out_of_range errors" \
    'sum(shardq_errors_total{operation="fetch", code="offset_out_of_range"})' \
    "length == 1 and ($numbers | .[0] >= 1)"

# --- The dashboard's queries ----------------------------------------------------------
# Grafana's variables as All (.*), $__rate_interval as the window.
total=0
with_data=0
empty=()
while IFS=$'\t' read -r title expr; do
    promql=$(sed -e "s/\\\$__rate_interval/$window/g" -e 's/\$[a-z_]*/.*/g' <<<"$expr")
    answer=$(query "$promql" || true)
    [ "$(jq -r '.status' <<<"$answer" 2>/dev/null)" = success ] ||
        fail "prometheus rejected the query of panel \"$title\": $promql: ${answer:-no answer}"
    total=$((total + 1))
    if jq -e '.data.result | length > 0' <<<"$answer" >/dev/null; then
        with_data=$((with_data + 1))
    else
        empty+=("$title")
    fi
done < <(jq -r '.. | objects | select(has("targets")) | .title as $title
    | .targets[] | [$title, .expr] | @tsv' "$dashboard")
[ "$total" -gt 0 ] || fail "no queries found in $dashboard"
say "ok: dashboard: prometheus evaluated all $total panel queries; $with_data returned series"
if [ ${#empty[@]} -gt 0 ]; then
    list=$(printf '"%s", ' "${empty[@]}")
    say "    no series (nothing of that kind happened in this run): ${list%, }"
fi
say "ok"
