#!/usr/bin/env bash
# Where the time goes in wsgate's tunnel: starts an echo server, a gateway
# with a --forward and an agent (as bench/tunnel.sh does), runs one wsbench
# test through the forward for DURATION seconds, and reports per unit of work
# the system calls of the gateway and of the agent (strace -c -f) and, with
# `perf`, the hottest functions of each (perf record, children excluded).
#
#   bench/tunnel/profile.sh connections|throughput [DURATION]   (needs a release build; root for perf)
#
# Output: the strace summaries and perf reports under a temp folder, printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
TEST=${1:-connections}
DUR=${2:-3}
W=target/release/wsgate
B=target/release/wsbench
RUN=$(mktemp -d /tmp/wsgate-tunnel-profile.XXXXXX)
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_for() { local i; for ((i = 0; i < 100; i++)); do v=$(sed -n "$2" "$1" 2>/dev/null | head -1 || true); [ -n "$v" ] && { echo "$v"; return 0; }; sleep 0.1; done; echo "no $2 in $1" >&2; return 1; }

echo "bench bench-token-0123456789" >"$RUN/agents.txt"
echo bench-token-0123456789 >"$RUN/token.txt"
$B echo >"$RUN/echo.out" 2>&1 &
PIDS+=($!)
ECHO=$(wait_for "$RUN/echo.out" 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p')
$W serve --listen 127.0.0.1:0 --agent-tokens "$RUN/agents.txt" --log warn \
    --forward "127.0.0.1:0=agent://bench/tcp://127.0.0.1:$ECHO" >"$RUN/gw.out" 2>"$RUN/gw.log" &
GW=$!
PIDS+=($GW)
GP=$(wait_for "$RUN/gw.out" 's#^listening on ws://127\.0\.0\.1:\([0-9]*\)$#\1#p')
FP=$(wait_for "$RUN/gw.out" 's#^forwarding tcp://127\.0\.0\.1:\([0-9]*\) .*#\1#p')
$W agent --server "ws://127.0.0.1:$GP/agent" --id bench --token-file "$RUN/token.txt" \
    --allow "tcp://127.0.0.1:$ECHO" --log warn >"$RUN/ag.out" 2>"$RUN/ag.log" &
AG=$!
PIDS+=($AG)
wait_for "$RUN/ag.out" 's/^\(agent bench registered\).*/\1/p' >/dev/null
case "$TEST" in
connections) FLAGS=(--test handshakes --conns 8 --size 64) ;;
throughput) FLAGS=(--test throughput --size 65536 --window 4) ;;
*) echo "profile.sh: connections or throughput" >&2; exit 2 ;;
esac
$B load --target "tcp://127.0.0.1:$FP" "${FLAGS[@]}" --warmup 0 --duration 1 >/dev/null

echo "== strace -c -f, $DUR s of $TEST" >&2
strace -c -f -o "$RUN/gw.strace" -p "$GW" &
S1=$!
strace -c -f -o "$RUN/ag.strace" -p "$AG" &
S2=$!
sleep 0.5
$B load --target "tcp://127.0.0.1:$FP" "${FLAGS[@]}" --warmup 0 --duration "$DUR" | tee "$RUN/strace-load.txt"
kill -INT "$S1" "$S2"
wait "$S1" "$S2" 2>/dev/null || true
echo "-- gateway" && head -25 "$RUN/gw.strace"
echo "-- agent" && head -25 "$RUN/ag.strace"

if command -v perf >/dev/null; then
    echo "== perf record, $DUR s of $TEST" >&2
    perf record -q -F 2000 -g -o "$RUN/gw.perf" -p "$GW" -- sleep "$((DUR + 1))" 2>/dev/null &
    P1=$!
    perf record -q -F 2000 -g -o "$RUN/ag.perf" -p "$AG" -- sleep "$((DUR + 1))" 2>/dev/null &
    P2=$!
    sleep 0.5
    $B load --target "tcp://127.0.0.1:$FP" "${FLAGS[@]}" --warmup 0 --duration "$DUR" | tee "$RUN/perf-load.txt"
    wait "$P1" "$P2" || true
    for s in gw ag; do
        echo "-- $s: top symbols (self)"
        perf report -q -i "$RUN/$s.perf" --no-children -g none --sort dso,symbol --percent-limit 1.5 2>/dev/null | grep -v "^$" | head -25
    done
fi
echo "(kept in $RUN)"
