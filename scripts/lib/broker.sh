# Sourced by the bench scripts: start and stop a release broker by pid.
#   start_broker DATA_DIR PORT [CORES]  -> sets BROKER_PID, waits until it listens
#   stop_broker                          -> SIGTERM, wait (bounded), SIGKILL if needed
BROKER_PID=
start_broker() {
    local data_dir=$1 port=$2 cores=${3:-}
    local extra=()
    [ -n "$cores" ] && extra=(--cores "$cores")
    mkdir -p "$data_dir"
    "$SHARDQ" serve --metrics-listen off --data-dir "$data_dir" --listen "127.0.0.1:$port" "${extra[@]}" \
        > "$data_dir.log" 2>&1 &
    BROKER_PID=$!
    for _ in $(seq 1 100); do
        if grep -q "serving on" "$data_dir.log" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            echo "broker exited at start:" >&2
            cat "$data_dir.log" >&2
            BROKER_PID=
            return 1
        fi
        sleep 0.1
    done
    echo "broker did not start within 10 s" >&2
    stop_broker
    return 1
}
stop_broker() {
    [ -z "$BROKER_PID" ] && return 0
    kill "$BROKER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$BROKER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$BROKER_PID" 2>/dev/null; then
        echo "broker $BROKER_PID did not stop in 10 s; killing it" >&2
        kill -9 "$BROKER_PID" 2>/dev/null || true
    fi
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=
}
