#!/usr/bin/env bash
# The proxy-mode benchmark, one command: wsgate as a WebSocket reverse proxy
# side by side with nginx and HAProxy, all three in front of the same echo
# backend (wsgate's own `echo:` route), plus that backend reached directly.
#
#   [WSBENCH_NICE=-10] [WSGATE_BASELINE=REV] bench/proxy.sh [--rounds N] [--idle-rounds N] [--duration S] [--warmup S]
#                                    [--idle-conns N] [--no-build]
#
# Runs (a) 64 KiB throughput, (b) 64 B msgs/s at 1 and 50 connections,
# (c) latency p50/p99, (e) handshakes/s for --rounds rounds (the order of the
# contenders rotates from round to round), then (d) RSS per idle proxied
# WebSocket on fresh proxy processes for --idle-rounds rounds. Prints a
# Markdown table of medians with the ratios wsgate/nginx and wsgate/haproxy
# (and wsgate/REV: with WSGATE_BASELINE=REV, wsgate built at that git revision
# by bench/baseline.sh runs as one more proxy, a before/after in one run);
# the table, every raw value, the configs and the logs are kept under
# bench/results/proxy-<UTC timestamp>/ (git-ignored). Every process it starts
# is killed on exit. See bench/proxy/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/lib.sh
bench_nice "$0" "$@"

ROUNDS=5
IDLE_ROUNDS=3
DURATION=1.5
WARMUP=0.5
IDLE_CONNS=5000
BUILD=1
ARGS=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --idle-rounds) IDLE_ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --idle-conns) IDLE_CONNS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "proxy.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

for tool in nginx haproxy python3; do
    command -v "$tool" >/dev/null || {
        echo "proxy.sh: $tool is missing (Debian: apt-get install nginx-light haproxy python3)" >&2
        exit 1
    }
done

# (d): a proxied connection costs the proxy 2 descriptors, the backend and the
# load generator 1 each; every process has its own limit.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((2 * IDLE_CONNS + 200)) ]; then
    echo "proxy.sh: open-files limit $(ulimit -n) is too low for $IDLE_CONNS idle connections" >&2
    exit 1
fi

bench_build

bench_dirs proxy
BASE_BIN=
if [ -n "${WSGATE_BASELINE:-}" ]; then
    cp "$(bench/baseline.sh "$WSGATE_BASELINE")" "$RUN/wsgate-baseline"
    BASE_BIN=$RUN/wsgate-baseline
fi
# The one-test subcommand of wsbench (`load`; `run` in later versions).
if "$WSBENCH" --help | grep -qE '^  run '; then LOAD=run; else LOAD=load; fi

# ---------------------------------------------------------------- processes
# Starts a wsgate that prints its port; sets STARTED_PID and STARTED_PORT.
# BIN (default: the current build) picks the binary.
start_wsgate() {
    local name=$1 i bin=${BIN:-$WSGATE}
    shift
    : >"$OUT/$name.out"
    setsid "$bin" serve --listen 127.0.0.1:0 "$@" --max-connections 20000 --log warn \
        >"$OUT/$name.out" 2>"$OUT/$name.log" </dev/null &
    STARTED_PID=$!
    PGIDS+=("$STARTED_PID")
    for ((i = 0; i < 100; i++)); do
        STARTED_PORT=$(sed -n 's#^listening on ws://127\.0\.0\.1:\([0-9]*\)$#\1#p' "$OUT/$name.out" || true)
        [ -n "$STARTED_PORT" ] && return 0
        kill -0 "$STARTED_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "proxy.sh: $name did not start; see $OUT/$name.log" >&2
    exit 1
}

# nginx and HAProxy cannot bind :0. Pick an ephemeral port by binding a
# socket to :0 and releasing it right before the start; if someone takes it
# in between (the proxy fails to bind), pick another (5 tries).
start_fixed_port() {
    local name=$1 template=$2 try port dir
    shift 2
    for ((try = 0; try < 5; try++)); do
        port=$(free_port)
        dir=$RUN/$name.$try
        mkdir -p "$dir"
        sed -e "s#@PORT@#$port#g" -e "s#@BACKEND@#$BACKEND_PORT#g" -e "s#@DIR@#$dir#g" \
            "$template" >"$dir/conf"
        cp "$dir/conf" "$OUT/$name.conf"
        case "$name" in
        nginx*) setsid nginx -p "$dir" -c "$dir/conf" -e "$dir/nginx-error.log" \
            >"$OUT/$name.log" 2>&1 </dev/null & ;;
        haproxy*) setsid haproxy -db -f "$dir/conf" >"$OUT/$name.log" 2>&1 </dev/null & ;;
        esac
        STARTED_PID=$!
        PGIDS+=("$STARTED_PID")
        if wait_listening "$STARTED_PID" "$port"; then
            STARTED_PORT=$port
            return 0
        fi
        [ -f "$dir/nginx-error.log" ] && cat "$dir/nginx-error.log" >>"$OUT/$name.log"
        stop_group "$STARTED_PID"
        if ! grep -qiE 'address already in use|cannot bind' "$OUT/$name.log"; then
            echo "proxy.sh: $name did not start; see $OUT/$name.log" >&2
            exit 1
        fi
        echo "   ($name: port $port was taken, trying another)" >&2
    done
    echo "proxy.sh: $name: no free port after 5 tries" >&2
    exit 1
}

# Starts contender NAME (wsgate, nginx, haproxy) in front of the backend;
# sets STARTED_PID (the process, or nginx's master) and STARTED_PORT.
start_proxy() {
    case "$1" in
    wsgate) start_wsgate "$2" --to "ws://127.0.0.1:$BACKEND_PORT" ;;
    baseline) BIN=$BASE_BIN start_wsgate "$2" --to "ws://127.0.0.1:$BACKEND_PORT" ;;
    nginx) start_fixed_port "$2" bench/proxy/nginx.conf.in ;;
    haproxy) start_fixed_port "$2" bench/proxy/haproxy.cfg.in ;;
    esac
}

# CPU time (user + system, clock ticks) used so far by PID and its children
# (nginx's workers); all threads of a process are in its own line.
cpu_ticks() {
    local pids
    pids="$1 $(cat "/proc/$1/task/"*/children 2>/dev/null)"
    (cd /proc && cat $(printf '%s/stat ' $pids) 2>/dev/null) |
        sed 's/^.*) //' | awk '{ s += $12 + $13 } END { print s + 0 }'
}

# The machine's CPU time taken by the hypervisor (steal) and all CPU time so
# far, in clock ticks: "STEAL TOTAL". On a shared VM, steal is why a cell
# can come out at half speed for every contender alike.
steal_total() {
    awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print $9, t }' /proc/stat
}

# Sum of VmRSS (KiB) of PID and its children (nginx's workers).
rss_tree() {
    local pids
    pids="$1 $(cat "/proc/$1/task/"*/children 2>/dev/null)"
    (cd /proc && cat $(printf '%s/status ' $pids) 2>/dev/null) |
        awk '/^VmRSS:/ { s += $2 } END { print s + 0 }'
}

# ---------------------------------------------------------------- machine
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "command: ${WSBENCH_NICE:+WSBENCH_NICE=$WSBENCH_NICE }bench/proxy.sh${ARGS[*]:+ ${ARGS[*]}}"
    if [ -n "$BASE_BIN" ]; then echo "baseline: wsgate at $(git rev-parse --short "$WSGATE_BASELINE")"; fi
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- crates 2>/dev/null || echo ' (crates/ modified)')"
    echo "machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
    echo "nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //'), haproxy: $(haproxy -v | head -1 | awk '{ print $3 }')"
} >"$OUT/meta.txt"

echo "== starting the backend and the proxies" >&2
start_wsgate backend --to echo:
BACKEND_PORT=$STARTED_PORT
declare -A PORT PID
PORT[direct]=$BACKEND_PORT
PID[direct]=$STARTED_PID
PROXIES=(wsgate nginx haproxy)
if [ -n "$BASE_BIN" ]; then PROXIES+=(baseline); fi
for c in "${PROXIES[@]}"; do
    start_proxy "$c" "$c"
    PORT[$c]=$STARTED_PORT
    PID[$c]=$STARTED_PID
done
echo "   backend :${PORT[direct]}, wsgate :${PORT[wsgate]}, nginx :${PORT[nginx]}, haproxy :${PORT[haproxy]}${BASE_BIN:+, baseline :${PORT[baseline]}}" >&2

# Every contender echoes through before anything is measured.
for c in "${PROXIES[@]}" direct; do
    "$WSBENCH" "$LOAD" --target "ws://127.0.0.1:${PORT[$c]}/" --test latency \
        --warmup 0 --duration 0.2 >/dev/null ||
        { echo "proxy.sh: $c does not echo" >&2; exit 1; }
done

# ---------------------------------------------------------------- (a) (b) (c) (e)
RAW=$OUT/raw.csv
# cpu_ticks: CPU the contender (for "direct": the backend) used during the
# cell, warm-up included.
echo "round,test,contender,value,value2,cpu_ticks,steal_ticks,output" >"$RAW"
read -r STEAL0 TOTAL0 < <(steal_total)
CONTENDERS=("${PROXIES[@]}" direct)
# test id | wsbench flags
TESTS=(
    "throughput|--test throughput --size 65536 --window 4"
    "msgs1|--test messages --conns 1 --size 64 --inflight 16"
    "msgs50|--test messages --conns 50 --size 64 --inflight 16"
    "latency|--test latency --size 64"
    "handshakes|--test handshakes --conns 8 --size 64"
)
for ((r = 0; r < ROUNDS; r++)); do
    echo "== round $((r + 1))/$ROUNDS (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    order=()
    for ((i = 0; i < ${#CONTENDERS[@]}; i++)); do
        order+=("${CONTENDERS[$(((i + r) % ${#CONTENDERS[@]}))]}")
    done
    for t in "${TESTS[@]}"; do
        id=${t%%|*}
        read -r -a flags <<<"${t#*|}"
        for c in "${order[@]}"; do
            t0=$(cpu_ticks "${PID[$c]}")
            read -r s0 _ < <(steal_total)
            line=$("$WSBENCH" "$LOAD" --target "ws://127.0.0.1:${PORT[$c]}/" "${flags[@]}" \
                --warmup "$WARMUP" --duration "$DURATION" 2>>"$OUT/wsbench.log") ||
                line="error: see wsbench.log"
            t1=$(cpu_ticks "${PID[$c]}")
            read -r s1 _ < <(steal_total)
            v1=$(awk '{ print ($1 == "p50") ? $2 : $1 }' <<<"$line")
            v2=""
            case "$id" in
            latency) v2=$(awk '{ print $5 }' <<<"$line") ;;
            handshakes) v2=$(sed -n 's/.*(\([0-9]*\) errors).*/\1/p' <<<"$line") ;;
            esac
            echo "$((r + 1)),$id,$c,$v1,$v2,$((t1 - t0)),$((s1 - s0)),\"$line\"" >>"$RAW"
            printf '   %-10s %-8s %s\n' "$id" "$c" "$line" >&2
        done
    done
done

read -r STEAL1 TOTAL1 < <(steal_total)
# The measuring proxies are done: (d) starts fresh ones.
for c in "${PROXIES[@]}"; do stop_group "${PID[$c]}"; done

# ---------------------------------------------------------------- (d)
# For each proxy, on a fresh process: one warm-up echo, then $IDLE_CONNS
# WebSockets opened (64 at once), each echoing 64 B, held idle. The RSS of the
# proxy's processes (nginx: master + workers) is sampled every 0.1 s while
# they are open; growth = peak - before. wsbench's own reading (one PID) is
# kept as a cross-check.
IDLE=$OUT/idle.csv
echo "round,contender,rss_before_kib,rss_peak_kib,kib_per_conn,wsbench_output" >"$IDLE"
for ((r = 0; r < IDLE_ROUNDS; r++)); do
    echo "== (d) round $((r + 1))/$IDLE_ROUNDS: $IDLE_CONNS idle WebSockets" >&2
    for ((i = 0; i < ${#PROXIES[@]}; i++)); do
        c=${PROXIES[$(((i + r) % ${#PROXIES[@]}))]}
        start_proxy "$c" "$c-idle$((r + 1))"
        pid=$STARTED_PID
        target="ws://127.0.0.1:$STARTED_PORT/"
        "$WSBENCH" "$LOAD" --target "$target" --test idle --conns 1 --pid "$pid" >/dev/null
        sleep 0.2
        before=$(rss_tree "$pid")
        "$WSBENCH" "$LOAD" --target "$target" --test idle --conns "$IDLE_CONNS" --pid "$pid" \
            >"$RUN/idle.out" 2>>"$OUT/wsbench.log" &
        wpid=$!
        peak=$before
        # Bounded: wsbench gives up after 120 s of connecting.
        for ((k = 0; k < 1500; k++)); do
            kill -0 "$wpid" 2>/dev/null || break
            now=$(rss_tree "$pid")
            [ "$now" -gt "$peak" ] && peak=$now
            sleep 0.1
        done
        if ! wait "$wpid"; then echo "error" >"$RUN/idle.out"; fi
        line=$(cat "$RUN/idle.out")
        per=$(awk -v a="$before" -v b="$peak" -v n="$IDLE_CONNS" 'BEGIN { printf "%.2f", (b - a) / n }')
        [[ $line == error* ]] && per=""
        echo "$((r + 1)),$c,$before,$peak,$per,\"$line\"" >>"$IDLE"
        printf '   %-8s %s KiB -> %s KiB: %s KiB per connection (wsbench, one PID: %s)\n' \
            "$c" "$before" "$peak" "${per:-error}" "$line" >&2
        stop_group "$pid"
    done
done

echo "$(cut -d' ' -f1-3 /proc/loadavg)" >"$RUN/load_after"
{
    cat "$OUT/meta.txt"
    echo "load average: $LOAD_BEFORE before, $(cat "$RUN/load_after") after"
    awk -v s="$((STEAL1 - STEAL0))" -v t="$((TOTAL1 - TOTAL0))" \
        'BEGIN { printf "steal (CPU time the hypervisor took) while (a)-(e) ran: %.1f%%\n", t ? 100 * s / t : 0 }' 
} >"$OUT/meta.tmp" && mv "$OUT/meta.tmp" "$OUT/meta.txt"

# ---------------------------------------------------------------- table
python3 bench/proxy/table.py "$OUT" "$ROUNDS" "$IDLE_ROUNDS" "$DURATION" "$WARMUP" "$IDLE_CONNS" "$(getconf CLK_TCK)" | tee "$OUT/table.md"
