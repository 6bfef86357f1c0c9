#!/usr/bin/env bash
# wsgate and nginx with 1 and with 2 workers, side by side in front of one
# wsgate `echo:` backend: rate, CPU and context switches per proxied
# handshake, measured by bench/ab.py (see bench/proxy/README.md, "fourth
# session"). Needs nginx and a release build (cargo build --release -p wsgate
# -p wsgate-bench).
#
#   bench/proxy/workers.sh [ab.py arguments, default: --rounds 8 e]
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || set -- --rounds 8 e
RUN=$(mktemp -d /tmp/wsgate-workers.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$RUN"
}
trap cleanup EXIT

# Waits (at most 10 s) for "listening on ws://127.0.0.1:PORT" in FILE; prints PORT.
port_of() {
    local i p
    for ((i = 0; i < 100; i++)); do
        p=$(sed -n 's#^listening on ws://127\.0\.0\.1:\([0-9]*\)$#\1#p' "$1")
        [ -n "$p" ] && { echo "$p"; return 0; }
        sleep 0.1
    done
    echo "workers.sh: nothing listening, see $1" >&2
    return 1
}

target/release/wsgate serve --listen 127.0.0.1:0 --to echo: --log warn >"$RUN/backend.out" 2>&1 &
PIDS+=($!)
BACKEND=$(port_of "$RUN/backend.out")
TARGETS=()
for w in 1 2; do
    target/release/wsgate serve --listen 127.0.0.1:0 --to "ws://127.0.0.1:$BACKEND" --workers "$w" \
        --log warn >"$RUN/wsgate-$w.out" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    TARGETS+=("wsgate-$w=$(port_of "$RUN/wsgate-$w.out"):$pid")
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$RUN/nginx-$w"
    sed -e "s#@PORT@#$port#g" -e "s#@BACKEND@#$BACKEND#g" -e "s#@DIR@#$RUN/nginx-$w#g" \
        -e "s/^worker_processes 2;/worker_processes $w;/" bench/proxy/nginx.conf.in >"$RUN/nginx-$w/conf"
    nginx -p "$RUN/nginx-$w" -c "$RUN/nginx-$w/conf" -e "$RUN/nginx-$w/error.log" &
    pid=$!
    PIDS+=("$pid")
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    TARGETS+=("nginx-$w=$port:$pid,$(pgrep -d, -P "$pid")")
done
python3 bench/ab.py "$@" "${TARGETS[@]}"
