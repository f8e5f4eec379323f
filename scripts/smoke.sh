#!/usr/bin/env bash
# The README's quick tour against a fresh broker in a temporary data directory, with
# every step checked. Usage: scripts/smoke.sh [path/to/shardq]  (default: target/release/shardq)
# Bounded: every wait has a limit, and the broker is stopped by its pid on any exit.
set -euo pipefail
shardq=${1:-target/release/shardq}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/shardq-smoke.XXXXXX")
port=$((20000 + RANDOM % 20000))
server="127.0.0.1:$port"
export SHARDQ_SERVER=$server

"$shardq" serve --data-dir "$work/data" --listen "$server" 2>"$work/serve.log" &
pid=$!
cleanup() {
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
    grep -q "serving on" "$work/serve.log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
    sleep 0.1
done
grep -q "serving on" "$work/serve.log" || { echo "broker did not start"; cat "$work/serve.log"; exit 1; }

fail() { echo "smoke: $*" >&2; cat "$work/serve.log" >&2; exit 1; }

"$shardq" topic create orders --partitions 4
printf 'a\nb\nc\n' | "$shardq" produce orders --key customer-7
got=$("$shardq" consume orders --from-beginning --count 3 --timeout-ms 5000)
[ "$got" = "$(printf 'a\nb\nc')" ] || fail "consume printed: $got"
"$shardq" topic list | grep -q '^orders' || fail "topic list lacks orders"
"$shardq" topic describe orders --json | grep -q '"partitions"' || fail "describe --json"
if "$shardq" consume nosuchtopic --from-beginning --count 1 2>/dev/null; then
    fail "consuming an unknown topic succeeded"
fi

# A clean stop flushes; a restart serves the same messages.
kill -TERM "$pid"
wait "$pid" || fail "broker exited non-zero on SIGTERM"
"$shardq" serve --data-dir "$work/data" --listen "$server" 2>"$work/serve.log" &
pid=$!
for _ in $(seq 1 100); do
    grep -q "serving on" "$work/serve.log" && break
    sleep 0.1
done
got=$("$shardq" consume orders --from-beginning --count 3 --timeout-ms 5000)
[ "$got" = "$(printf 'a\nb\nc')" ] || fail "after restart consume printed: $got"
"$shardq" topic delete orders
echo "smoke: ok"
