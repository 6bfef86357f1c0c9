#!/usr/bin/env bash
# wsgate and nginx with 1 and with 2 workers, side by side in front of one
# wsgate `echo:` backend: rate, CPU and context switches per proxied
# handshake, measured by bench/ab.py (see bench/proxy/notes.md, "fourth
# session"). Needs nginx and a release build (cargo build --release -p wsgate
# -p wsgate-bench).
#
#   bench/proxy/workers.sh [ab.py arguments, default: --rounds 8 e]
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || set -- --rounds 8 e
# shellcheck source=bench/proxy/common.sh
source bench/proxy/common.sh workers

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
    port=$(free_port)
    mkdir -p "$RUN/nginx-$w"
    sed -e "s#@PORT@#$port#g" -e "s#@BACKEND@#$BACKEND#g" -e "s#@DIR@#$RUN/nginx-$w#g" \
        -e "s/^worker_processes 2;/worker_processes $w;/" bench/proxy/nginx.conf.in >"$RUN/nginx-$w/conf"
    nginx -p "$RUN/nginx-$w" -c "$RUN/nginx-$w/conf" -e "$RUN/nginx-$w/error.log" &
    pid=$!
    PIDS+=("$pid")
    wait_port "$port"
    TARGETS+=("nginx-$w=$port:$pid,$(pgrep -d, -P "$pid")")
done
python3 bench/ab.py "$@" "${TARGETS[@]}"
