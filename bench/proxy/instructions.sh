#!/usr/bin/env bash
# User-space instructions per proxied WebSocket handshake, counted by
# valgrind's callgrind: deterministic where rates and CPU times on a shared
# VM are not, so it is what small changes to the handshake path are judged by.
#
#   bench/proxy/instructions.sh [wsgate|nginx]...     (default: wsgate nginx)
#   INSTR_TEST=messages bench/proxy/instructions.sh   per relayed 64 B message
#   INSTR_TEST=batched bench/proxy/instructions.sh    ... with 16 in flight, as in (b)
#   INSTR_KEEP=DIR bench/proxy/instructions.sh        keep the callgrind files in DIR
#
# For each contender (one worker, under callgrind) in front of a wsgate
# `echo:` backend: 1 s of warm-up, counters zeroed, 3 s of 4 looping clients
# (`wsbench load --test handshakes`: connect, handshake, one 64 B echo,
# closing handshake), counters dumped; prints instructions ÷ handshakes.
# With INSTR_TEST=messages the load is one connection doing strict ping-pong
# of 64 B messages (`--test messages --inflight 1`): every message costs the
# proxy two wake-ups, two reads and two writes, with no batching to blur it,
# and the count is instructions ÷ messages echoed.
# Under valgrind SHA-1 runs in software (valgrind hides the SHA
# instructions): about 3,500 of wsgate's count, a few hundred on the CPU.
# Needs valgrind (Debian: apt-get install valgrind) and a release build
# (cargo build --release -p wsgate -p wsgate-bench).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v callgrind_control >/dev/null || { echo "instructions.sh: valgrind is missing" >&2; exit 1; }
WSGATE=$PWD/target/release/wsgate
WSBENCH=$PWD/target/release/wsbench
[ -x "$WSGATE" ] && [ -x "$WSBENCH" ] || { echo "instructions.sh: build first (see the header)" >&2; exit 1; }
[ $# -gt 0 ] || set -- wsgate nginx

case "${INSTR_TEST:=handshakes}" in
handshakes) LOAD=(--test handshakes --conns 4) ;;
messages) LOAD=(--test messages --conns 1 --inflight 1) ;;
batched) LOAD=(--test messages --conns 1 --inflight 16) ;;
*) echo "instructions.sh: INSTR_TEST is handshakes, messages or batched, not '$INSTR_TEST'" >&2; exit 2 ;;
esac

# shellcheck source=bench/proxy/common.sh
source bench/proxy/common.sh instructions

"$WSGATE" serve --listen 127.0.0.1:0 --to echo: --log warn >"$RUN/backend.out" 2>&1 &
PIDS+=($!)
BACKEND=$(port_of "$RUN/backend.out")

for c in "$@"; do
    out=$RUN/$c.callgrind
    case "$c" in
    wsgate)
        valgrind --tool=callgrind --callgrind-out-file="$out" "$WSGATE" serve \
            --listen 127.0.0.1:0 --to "ws://127.0.0.1:$BACKEND" --workers 1 --log warn \
            >"$RUN/$c.out" 2>"$RUN/$c.err" &
        pid=$!
        PIDS+=("$pid")
        port=$(port_of "$RUN/$c.out")
        ;;
    nginx)
        port=$(free_port)
        nginx_one_worker_conf "$port"
        valgrind --tool=callgrind --callgrind-out-file="$out" nginx -p "$RUN/nginx" \
            -c "$RUN/nginx/conf" -e "$RUN/nginx/error.log" >"$RUN/$c.err" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_port "$port"
        ;;
    *) echo "instructions.sh: unknown contender $c" >&2; exit 2 ;;
    esac
    load() {
        "$WSBENCH" load --target "ws://127.0.0.1:$port/echo" "${LOAD[@]}" --size 64 --warmup 0 \
            --duration "$1" | tail -1
    }
    load 1 >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    line=$(load 3)
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    if [ -n "${INSTR_KEEP:-}" ]; then mkdir -p "$INSTR_KEEP" && cp "$out".* "$INSTR_KEEP"/; fi
    total=$(awk '/^(summary|totals):/ { print $2; exit }' "$out".*)
    rate=$(awk '{ print $1 }' <<<"$line")
    awk -v c="$c" -v t="$total" -v r="$rate" -v l="$line" \
        -v u="$INSTR_TEST" \
        'BEGIN { sub(/s$/, "", u); if (u == "batched") u = "message, 16 in flight"; printf "%-7s %6.0f instructions per %s  (%s under valgrind)\n", c, t / (r * 3), u, l }'
done
