#!/usr/bin/env bash
# wsgate and nginx, each under the default scheduling policy and under
# SCHED_BATCH (`chrt -b 0`), side by side in front of one wsgate `echo:`
# backend (see bench/proxy/notes.md, "fifth session"). Needs nginx and a
# release build (cargo build --release -p wsgate -p wsgate-bench).
#
#   bench/proxy/batch.sh [--rounds N] TEST...   bench/ab.py's TESTs (b1, b50, e, a)
#   bench/proxy/batch.sh latency                wsgate only: `wsbench --test latency`,
#                                               3 x 2 s each, idle and with a CPU hog per core
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || set -- --rounds 6 b1 b50 e
# shellcheck source=bench/proxy/common.sh
source bench/proxy/common.sh batch

target/release/wsgate serve --listen 127.0.0.1:0 --to echo: --log warn >"$RUN/backend.out" 2>&1 &
PIDS+=($!)
BACKEND=$(port_of "$RUN/backend.out")
TARGETS=()
declare -A PORT
for pol in normal batch; do
    pre=()
    [ "$pol" = batch ] && pre=(chrt -b 0)
    "${pre[@]}" target/release/wsgate serve --listen 127.0.0.1:0 --to "ws://127.0.0.1:$BACKEND" \
        --log warn >"$RUN/wsgate-$pol.out" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    PORT[$pol]=$(port_of "$RUN/wsgate-$pol.out")
    TARGETS+=("wsgate-$pol=${PORT[$pol]}:$pid")
    [ "$1" = latency ] && continue
    port=$(free_port)
    mkdir -p "$RUN/nginx-$pol"
    sed -e "s#@PORT@#$port#g" -e "s#@BACKEND@#$BACKEND#g" -e "s#@DIR@#$RUN/nginx-$pol#g" \
        bench/proxy/nginx.conf.in >"$RUN/nginx-$pol/conf"
    "${pre[@]}" nginx -p "$RUN/nginx-$pol" -c "$RUN/nginx-$pol/conf" -e "$RUN/nginx-$pol/error.log" &
    pid=$!
    PIDS+=("$pid")
    wait_port "$port"
    TARGETS+=("nginx-$pol=$port:$pid,$(pgrep -d, -P "$pid")")
done

if [ "$1" != latency ]; then
    opts=()
    if [ "$1" = --rounds ]; then opts=(--rounds "$2"); shift 2; fi
    for t in "$@"; do python3 bench/ab.py "${opts[@]}" "$t" "${TARGETS[@]}"; done
    exit 0
fi
latency() {
    local r pol
    for r in 1 2 3; do
        for pol in normal batch; do
            printf '%s %s: ' "$1" "$pol"
            target/release/wsbench load --target "ws://127.0.0.1:${PORT[$pol]}/" --test latency \
                --duration 2 2>&1 | tail -1
        done
    done
}
latency idle
for ((i = 0; i < $(nproc); i++)); do
    yes >/dev/null &
    PIDS+=($!)
done
latency hogs
