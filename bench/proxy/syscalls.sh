#!/usr/bin/env bash
# System calls per unit of proxied work, wsgate against nginx (and HAProxy
# for messages), each in front of one wsgate `echo:` backend.
#
#   bench/proxy/syscalls.sh handshakes   strace -c on one worker of each, per handshake
#   bench/proxy/syscalls.sh messages     perf stat per 64 B message at one connection
#   bench/proxy/syscalls.sh messages50   the same at 50 connections, one worker each
#   bench/proxy/syscalls.sh segments     TCP segments per 64 B message at one connection (nstat)
#
# handshakes: wsgate `--workers 1` and nginx with one worker (no master),
# `strace -c -f` attached for 3 s of `wsbench load --test handshakes --conns
# 4`; prints each system call's count ÷ handshakes. strace slows the proxy
# down, so only the counts per handshake mean anything, not the rate.
#
# messages: wsgate (default workers), nginx (one worker, no master: a single
# connection is served by one worker anyway) and HAProxy (its bench config)
# under `wsbench load --test messages --conns 1` (16 in flight) for 3 s, with
# `perf stat` counting the proxy's recvfrom, sendto, writev and epoll_wait
# tracepoints and its context switches; every message crosses the proxy twice,
# so messages per read = 2 × messages ÷ recvfrom. perf stat is attached for
# the whole load, which runs without warm-up, so the window is the load's
# (plus its connect); its task-clock gives the proxy's CPU time per message.
#
# messages50: the same with `--conns 50`, wsgate `--workers 1` and nginx's one
# worker (HAProxy left out: its bench config runs two threads), so that both
# serve every connection from one event loop and each one's per-message counts
# and CPU compare directly.
#
# segments: the same contenders and load as messages, with the kernel's TCP
# counters (`nstat`, system-wide: the load generator's and the backend's
# segments are in them too) read before and after; prints segments sent,
# pure ACKs and fast-path hits per message. The load and the backend are the
# same for every contender, so what differs is what the proxy makes them do:
# a proxy that split messages into more segments, or made the kernel send
# ACKs of their own, would show it here.
#
# Needs strace, perf (root, for the tracepoints) or nstat, nginx, haproxy and a
# release build (cargo build --release -p wsgate -p wsgate-bench).
set -euo pipefail
cd "$(dirname "$0")/../.."
WSGATE=$PWD/target/release/wsgate
WSBENCH=$PWD/target/release/wsbench
[ -x "$WSGATE" ] && [ -x "$WSBENCH" ] || { echo "syscalls.sh: build first (see the header)" >&2; exit 1; }
case "${1:-}" in
handshakes) TOOL=strace; CONTENDERS=(wsgate nginx); LOAD=(--test handshakes --conns 4); WORKERS=(--workers 1) ;;
messages) TOOL=perf; CONTENDERS=(wsgate nginx haproxy); LOAD=(--test messages --conns 1); WORKERS=() ;;
messages50) TOOL=perf; CONTENDERS=(wsgate nginx); LOAD=(--test messages --conns 50); WORKERS=(--workers 1) ;;
segments) TOOL=nstat; CONTENDERS=(wsgate nginx haproxy); LOAD=(--test messages --conns 1); WORKERS=() ;;
*) echo "usage: bench/proxy/syscalls.sh handshakes|messages|messages50|segments" >&2; exit 2 ;;
esac
command -v "$TOOL" >/dev/null || { echo "syscalls.sh: $TOOL is missing" >&2; exit 1; }
SECS=3

# shellcheck source=bench/proxy/common.sh
source bench/proxy/common.sh syscalls

"$WSGATE" serve --listen 127.0.0.1:0 --to echo: --log warn >"$RUN/backend.out" 2>&1 &
PIDS+=($!)
BACKEND=$(port_of "$RUN/backend.out")

for c in "${CONTENDERS[@]}"; do
    case "$c" in
    wsgate)
        "$WSGATE" serve --listen 127.0.0.1:0 --to "ws://127.0.0.1:$BACKEND" "${WORKERS[@]}" \
            --log warn >"$RUN/$c.out" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        port=$(port_of "$RUN/$c.out")
        ;;
    nginx)
        port=$(free_port)
        nginx_one_worker_conf "$port"
        nginx -p "$RUN/nginx" -c "$RUN/nginx/conf" -e "$RUN/nginx/error.log" >"$RUN/$c.err" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_port "$port"
        ;;
    haproxy)
        port=$(free_port)
        sed -e "s#@PORT@#$port#g" -e "s#@BACKEND@#$BACKEND#g" bench/proxy/haproxy.cfg.in >"$RUN/haproxy.conf"
        haproxy -db -f "$RUN/haproxy.conf" >"$RUN/$c.err" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_port "$port"
        ;;
    esac
    target=ws://127.0.0.1:$port/echo
    # Warm-up, untraced.
    "$WSBENCH" load --target "$target" "${LOAD[@]}" --size 64 --warmup 0 --duration 1 >/dev/null
    out=$RUN/$c.$TOOL
    if [ "$TOOL" = nstat ]; then
        # A private history file: `nstat -n` marks the start, `nstat -z`
        # prints every counter's change since (zeros included).
        export NSTAT_HISTORY=$RUN/nstat.history
        nstat -n
        line=$("$WSBENCH" load --target "$target" "${LOAD[@]}" --size 64 --warmup 0 --duration "$SECS" | tail -1)
        nstat -z >"$out"
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        rate=$(awk '{ print $1 }' <<<"$line")
        awk -v c="$c" -v n="$(awk -v r="$rate" -v s="$SECS" 'BEGIN { print r * s }')" -v l="$line" '
            { v[$1] = $2 }
            END {
                if (n == 0 || v["TcpOutSegs"] + 0 == 0) {
                    print "syscalls.sh: nothing counted for " c ": " l > "/dev/stderr"
                    exit 1
                }
                printf "%-8s %s: per message %.3f segments sent, %.3f with data, %.3f pure ACKs received, %.3f fast-path hits\n",
                    c, l, v["TcpOutSegs"] / n, v["TcpExtTCPOrigDataSent"] / n,
                    v["TcpExtTCPPureAcks"] / n, v["TcpExtTCPHPHits"] / n
            }' "$out"
        continue
    fi
    if [ "$TOOL" = strace ]; then
        strace -c -f -p "$pid" -o "$out" 2>/dev/null &
    else
        perf stat -x, -o "$out" -p "$pid" -e syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto \
            -e syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,context-switches,task-clock 2>/dev/null &
    fi
    tracer=$!
    # Give the tracer time to attach (strace prints nothing to wait for).
    sleep 0.5
    line=$("$WSBENCH" load --target "$target" "${LOAD[@]}" --size 64 --warmup 0 --duration "$SECS" | tail -1)
    kill -INT "$tracer"
    wait "$tracer" 2>/dev/null || true
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rate=$(awk '{ print $1 }' <<<"$line")
    if [ "$TOOL" = strace ]; then
        # strace -c: "% time, seconds, usecs/call, calls, [errors,] syscall".
        awk -v c="$c" -v n="$(awk -v r="$rate" -v s="$SECS" 'BEGIN { print r * s }')" -v l="$line" '
            BEGIN {
                if (n == 0) { print "syscalls.sh: no handshakes for " c ": " l > "/dev/stderr"; exit 1 }
                printf "%s (%s under strace), per handshake:\n", c, l
            }
            $NF == "total" { printf "  %-12s %6.2f\n", "total", $4 / n; next }
            $1 ~ /^[0-9.]+$/ && NF >= 5 {
                err = (NF == 6) ? sprintf("  (%.2f failed)", $5 / n) : ""
                printf "  %-12s %6.2f%s\n", $NF, $4 / n, err
            }' "$out"
    else
        # perf stat -x,: "count,unit,event,...".
        awk -F, -v c="$c" -v n="$(awk -v r="$rate" -v s="$SECS" 'BEGIN { print r * s }')" -v l="$line" '
            { v[$3] = $1 }
            END {
                r = v["syscalls:sys_enter_recvfrom"] + 0
                if (r == 0 || n == 0) {
                    print "syscalls.sh: nothing counted for " c " (tracepoints need root): " l > "/dev/stderr"
                    exit 1
                }
                printf "%-8s %s: %.2f messages per recvfrom, per message %.3f recvfrom, %.3f sendto, %.3f writev, %.3f epoll_wait, %.3f context switches, %.2f µs CPU\n",
                    c, l, 2 * n / r, r / n, v["syscalls:sys_enter_sendto"] / n,
                    v["syscalls:sys_enter_writev"] / n, v["syscalls:sys_enter_epoll_wait"] / n,
                    v["context-switches"] / n, v["task-clock"] * 1000 / n
            }' "$out"
    fi
done
