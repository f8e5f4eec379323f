#!/usr/bin/env bash
# The README's quick tour against a fresh broker in a temporary data directory, with
# every step checked. Usage: scripts/smoke.sh [path/to/shardq]  (default: target/release/shardq)
# Bounded: every wait has a limit, and the broker is stopped by its pid on any exit.
set -euo pipefail
shardq=${1:-target/release/shardq}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/shardq-smoke.XXXXXX")
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

fail() { echo "smoke: $*" >&2; cat "$work/serve.log" >&2; exit 1; }

# Starts the broker on port 0 (the kernel picks free ports, so no port a test or another
# program holds can collide) and reads the addresses back from its "serving on" line.
# Fails with the broker's log if it exits or does not serve within 10 s.
start_broker() {
    "$shardq" serve --data-dir "$work/data" --listen 127.0.0.1:0 \
        --metrics-listen 127.0.0.1:0 2>"$work/serve.log" &
    pid=$!
    for _ in $(seq 1 100); do
        grep -q "serving on" "$work/serve.log" && break
        kill -0 "$pid" 2>/dev/null || fail "the broker exited before serving"
        sleep 0.1
    done
    SHARDQ_SERVER=$(sed -n 's/.*serving on \([0-9.]*:[0-9]*\) .*/\1/p' "$work/serve.log" | head -n 1)
    [ -n "$SHARDQ_SERVER" ] || fail "the broker did not start serving within 10 s"
    export SHARDQ_SERVER
    metrics=$(sed -n 's/.*metrics on http:\/\/\([0-9.]*:[0-9]*\)\/metrics.*/\1/p' "$work/serve.log" | head -n 1)
    [ -n "$metrics" ] || fail "the broker did not say where its metrics are"
}

start_broker

"$shardq" topic create orders --partitions 4
printf 'a\nb\nc\n' | "$shardq" produce orders --key customer-7
got=$("$shardq" consume orders --from-beginning --count 3 --timeout-ms 5000)
[ "$got" = "$(printf 'a\nb\nc')" ] || fail "consume printed: $got"
"$shardq" topic list | grep -q '^orders' || fail "topic list lacks orders"
"$shardq" topic describe orders --json | grep -q '"partitions"' || fail "describe --json"
if "$shardq" consume nosuchtopic --from-beginning --count 1 2>/dev/null; then
    fail "consuming an unknown topic succeeded"
fi

# Health and metrics: ready and live once serving; the three records show up, counted
# exactly, summed over the partitions they went to.
curl -sf --max-time 5 "http://$metrics/health/ready" >/dev/null || fail "/health/ready"
curl -sf --max-time 5 "http://$metrics/health/live" >/dev/null || fail "/health/live"
produced=$(curl -sf --max-time 5 "http://$metrics/metrics" |
    awk '/^shardq_produce_records_total\{.*topic="orders"/ { sum += $2 } END { print sum + 0 }')
[ "$produced" = 3 ] || fail "/metrics counted $produced records produced to orders, not 3"

# A clean stop flushes; a restart serves the same messages.
kill -TERM "$pid"
wait "$pid" || fail "broker exited non-zero on SIGTERM"
pid=
start_broker
got=$("$shardq" consume orders --from-beginning --count 3 --timeout-ms 5000)
[ "$got" = "$(printf 'a\nb\nc')" ] || fail "after restart consume printed: $got"
"$shardq" topic delete orders
echo "smoke: ok"
