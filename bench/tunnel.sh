#!/usr/bin/env bash
# The reverse-tunnel benchmark, one command: a TCP echo server reached
# through wsgate's tunnel (gateway + agent + --forward), rathole 0.5 (TCP and
# WebSocket transports), bore 0.6, `ssh -L` and `ssh -R` (Debian's OpenSSH on
# loopback), and directly, side by side in one run.
#
#   [WSBENCH_NICE=-10] bench/tunnel.sh [--rounds N] [--idle-rounds N] [--duration S] [--warmup S]
#                                      [--idle-streams N] [--idle-agents N] [--no-build]
#
# (a) 64 KiB echo MB/s on one connection, (b) new connections/s (each one a
# 64 B round trip), (c) 64 B ping-pong p50/p99 (all contenders interleaved),
# (e) HTTP requests/s through /request and the forward proxy against the same
# nginx reached directly: --rounds rounds, the order of the contenders rotating
# from round to round. Then (d) on fresh processes, --idle-rounds rounds: RSS
# growth of the entry side (the gateway) per open idle stream (--idle-streams
# connections) and per connected idle agent (--idle-agents agents).
# Installs rathole and bore from crates.io into .cache/tunnel-bench/ (once),
# builds wsgate and wsbench, prints a Markdown table of medians and ratios,
# keeps everything under bench/results/tunnel-<UTC>/ (git-ignored). Every
# process it starts is killed on exit. See bench/tunnel/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/lib.sh
bench_nice "$0" "$@"

ROUNDS=5
IDLE_ROUNDS=3
DURATION=1.5
WARMUP=0.5
IDLE_STREAMS=1000
IDLE_AGENTS=100
BUILD=1
ARGS=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --idle-rounds) IDLE_ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --idle-streams) IDLE_STREAMS=$2; shift 2 ;;
    --idle-agents) IDLE_AGENTS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "tunnel.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

RATHOLE_VERSION=0.5.0
BORE_VERSION=0.6.0
TOOLS=.cache/tunnel-bench
RATHOLE=$TOOLS/rathole-$RATHOLE_VERSION/bin/rathole
BORE=$TOOLS/bore-$BORE_VERSION/bin/bore
SSHD=/usr/sbin/sshd
SSH_CIPHER=aes128-gcm@openssh.com

for tool in ssh ssh-keygen nginx python3 curl; do
    command -v "$tool" >/dev/null || {
        echo "tunnel.sh: $tool is missing (Debian: scripts/install-test-deps.sh, or apt-get install openssh-client nginx-light python3 curl)" >&2
        exit 1
    }
done
[ -x "$SSHD" ] || { echo "tunnel.sh: $SSHD is missing (apt-get install openssh-server)" >&2; exit 1; }

# A connection through a tunnel costs its processes descriptors on both hops.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((4 * IDLE_STREAMS + 4 * IDLE_AGENTS + 500)) ]; then
    echo "tunnel.sh: open-files limit $(ulimit -n) is too low for $IDLE_STREAMS idle streams" >&2
    exit 1
fi

# ---------------------------------------------------------------- tools
# rathole: its WebSocket transport is the `websocket` feature (not in
# `server,client` alone); bore-cli as published.
if [ ! -x "$RATHOLE" ]; then
    echo "== installing rathole $RATHOLE_VERSION (crates.io) into $TOOLS" >&2
    cargo install --root "$TOOLS/rathole-$RATHOLE_VERSION" rathole --version "$RATHOLE_VERSION" \
        --no-default-features --features server,client,websocket >&2
fi
if [ ! -x "$BORE" ]; then
    echo "== installing bore-cli $BORE_VERSION (crates.io) into $TOOLS" >&2
    cargo install --root "$TOOLS/bore-$BORE_VERSION" bore-cli --version "$BORE_VERSION" >&2
fi
bench_build

bench_dirs tunnel
chmod 700 "$RUN"
cp "$RATHOLE" "$BORE" "$RUN/"
RATHOLE=$RUN/rathole
BORE=$RUN/bore

# ---------------------------------------------------------------- processes
# Starts a command in its own session, output to $OUT/NAME.{out,log}; sets STARTED_PID.
start() {
    local name=$1
    shift
    setsid "$@" >"$OUT/$name.out" 2>"$OUT/$name.log" </dev/null &
    STARTED_PID=$!
    PGIDS+=("$STARTED_PID")
}

# Waits (20 s at most) for a line matching SED in FILE; prints its capture.
wait_line() {
    local file=$1 sed=$2 pid=$3 i v
    for ((i = 0; i < 200; i++)); do
        # The file may not exist yet (the process was started in the background).
        v=$(sed -n "$sed" "$file" 2>/dev/null | head -1 || true)
        [ -n "$v" ] && { echo "$v"; return 0; }
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "tunnel.sh: no line ${sed} in $file" >&2
    return 1
}

# Waits (20 s at most) until an echo goes through 127.0.0.1:PORT.
wait_echo() {
    local port=$1 i
    for ((i = 0; i < 100; i++)); do
        if "$WSBENCH" load --target "tcp://127.0.0.1:$port" --test latency --warmup 0 --duration 0.05 \
            >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "tunnel.sh: nothing echoes through port $port" >&2
    return 1
}

# PID and all its descendants.
tree() {
    local p=$1 c
    echo "$p"
    for c in $(cat "/proc/$p/task/"*/children 2>/dev/null); do tree "$c"; done
}

# Sum of VmRSS (KiB) of the processes of the trees rooted at the PIDs given.
rss_trees() {
    local pids="" p
    for p in "$@"; do pids="$pids $(tree "$p")"; done
    (cd /proc && cat $(printf '%s/status ' $pids) 2>/dev/null) |
        awk '/^VmRSS:/ { s += $2 } END { print s + 0 }'
}

# CPU ticks (user + system) of the trees rooted at the PIDs given.
cpu_trees() {
    local pids="" p
    for p in "$@"; do pids="$pids $(tree "$p")"; done
    (cd /proc && cat $(printf '%s/stat ' $pids) 2>/dev/null) |
        sed 's/^.*) //' | awk '{ s += $12 + $13 } END { print s + 0 }'
}

# ---------------------------------------------------------------- shared pieces
echo "== starting the echo server, nginx and sshd" >&2
start echo "$WSBENCH" echo
ECHO_PID=$STARTED_PID
ECHO=$(wait_line "$OUT/echo.out" 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$ECHO_PID")

# nginx: the HTTP server of (e), one small answer, keep-alive.
NGINX_DIR=$RUN/nginx
mkdir -p "$NGINX_DIR"
for try in 1 2 3 4 5; do
    NGINX=$(free_port)
    cat >"$NGINX_DIR/conf" <<EOF
daemon off;
worker_processes 1;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $NGINX_DIR/body;
    proxy_temp_path $NGINX_DIR/proxy;
    fastcgi_temp_path $NGINX_DIR/fastcgi;
    uwsgi_temp_path $NGINX_DIR/uwsgi;
    scgi_temp_path $NGINX_DIR/scgi;
    server {
        listen 127.0.0.1:$NGINX;
        location / { default_type text/plain; return 200 "hello\n"; }
    }
}
EOF
    start nginx nginx -p "$NGINX_DIR" -c "$NGINX_DIR/conf" -e "$NGINX_DIR/error.log"
    NGINX_PID=$STARTED_PID
    if "$WSBENCH" load --target "tcp://127.0.0.1:$NGINX" --test http --check >/dev/null 2>&1 ||
        { sleep 0.5; "$WSBENCH" load --target "tcp://127.0.0.1:$NGINX" --test http --check >/dev/null 2>&1; }; then
        break
    fi
    stop_group "$NGINX_PID"
    [ "$try" = 5 ] && { echo "tunnel.sh: nginx did not start" >&2; cat "$NGINX_DIR/error.log" >&2; exit 1; }
done

# sshd: its own host key, a throwaway user key, on a free loopback port.
SSH_DIR=$RUN/ssh
mkdir -p "$SSH_DIR"
ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/host" -C bench
ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/user" -C bench
cp "$SSH_DIR/user.pub" "$SSH_DIR/authorized_keys"
[ "$(id -u)" = 0 ] && mkdir -p /run/sshd
SSH_USER=$(id -un)
for try in 1 2 3 4 5; do
    SSHD_PORT=$(free_port)
    cat >"$SSH_DIR/sshd_config" <<EOF
ListenAddress 127.0.0.1:$SSHD_PORT
HostKey $SSH_DIR/host
PidFile none
UsePAM no
StrictModes no
AuthorizedKeysFile $SSH_DIR/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers $SSH_USER
AllowTcpForwarding yes
MaxStartups 1000:30:1000
MaxSessions 1000
LogLevel ERROR
EOF
    start sshd "$SSHD" -D -e -f "$SSH_DIR/sshd_config"
    SSHD_PID=$STARTED_PID
    for ((i = 0; i < 50; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$SSHD_PORT") 2>/dev/null && break
        sleep 0.1
    done
    kill -0 "$SSHD_PID" 2>/dev/null && break
    [ "$try" = 5 ] && { echo "tunnel.sh: sshd did not start; see $OUT/sshd.log" >&2; exit 1; }
done
echo "[127.0.0.1]:$SSHD_PORT $(cut -d' ' -f1,2 "$SSH_DIR/host.pub")" >"$SSH_DIR/known_hosts"
SSH=(ssh -N -F /dev/null -i "$SSH_DIR/user" -o IdentitiesOnly=yes -o BatchMode=yes
    -o "UserKnownHostsFile=$SSH_DIR/known_hosts" -o StrictHostKeyChecking=yes -o ExitOnForwardFailure=yes
    -o Compression=no -o ServerAliveInterval=0 -c "$SSH_CIPHER" -p "$SSHD_PORT")

# wsgate's token file: bench for the measured agent, idleN for (d).
TOKENS=$RUN/agents.txt
{
    echo "bench bench-token-0123456789"
    for ((i = 1; i <= IDLE_AGENTS; i++)); do echo "idle$i bench-token-0123456789"; done
} >"$TOKENS"
echo bench-token-0123456789 >"$RUN/token.txt"

# ---------------------------------------------------------------- contenders
# Each start_* starts one contender in front of the echo server and sets
# ENTRY (the port clients connect to), ENTRY_PID (the process tree that
# holds that port: the "gateway" side) and EXIT_PID (the side that connects
# to the echo server: the "agent" side); NAME names the log files.
# WSGATE_ENV: an environment for both wsgate processes (the `wsgate-nothp`
# rows of (d): MIMALLOC_ALLOW_THP=0, see the README).
WSGATE_ENV=()
start_wsgate() {
    local name=$1
    start "$name-gw" env "${WSGATE_ENV[@]}" "$WSGATE" serve --listen 127.0.0.1:0 --agent-tokens "$TOKENS" --admin 127.0.0.1:0 \
        --forward "127.0.0.1:0=agent://bench/tcp://127.0.0.1:$ECHO" --max-connections 20000 --log warn
    ENTRY_PID=$STARTED_PID
    GW_PORT=$(wait_line "$OUT/$name-gw.out" 's#^listening on ws://127\.0\.0\.1:\([0-9]*\)$#\1#p' "$ENTRY_PID")
    GW_ADMIN=$(wait_line "$OUT/$name-gw.out" 's#^admin on \(http://.*\)$#\1#p' "$ENTRY_PID")
    ENTRY=$(wait_line "$OUT/$name-gw.out" 's#^forwarding tcp://127\.0\.0\.1:\([0-9]*\) to .*$#\1#p' "$ENTRY_PID")
    start "$name-agent" env "${WSGATE_ENV[@]}" "$WSGATE" agent --server "ws://127.0.0.1:$GW_PORT/agent" --id bench \
        --token-file "$RUN/token.txt" --allow "tcp://127.0.0.1:$ECHO" --allow "tcp://127.0.0.1:$NGINX" --log warn
    EXIT_PID=$STARTED_PID
    wait_line "$OUT/$name-agent.out" 's/^\(agent bench registered\).*/\1/p' "$EXIT_PID" >/dev/null
}

# rathole: TRANSPORT tcp or websocket; one service "echo".
rathole_configs() {
    local dir=$1 transport=$2 ctl=$3 svc=$4 ws=""
    [ "$transport" = websocket ] && ws=$'[server.transport.websocket]\ntls = false'
    cat >"$dir/server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$ctl"
default_token = "bench-token"
[server.transport]
type = "$transport"
$ws
[server.services.echo]
bind_addr = "127.0.0.1:$svc"
EOF
    cat >"$dir/client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$ctl"
default_token = "bench-token"
[client.transport]
type = "$transport"
${ws//server/client}
[client.services.echo]
local_addr = "127.0.0.1:$ECHO"
EOF
}

start_rathole() {
    local name=$1 transport=$2 dir try
    for try in 1 2 3 4 5; do
        dir=$RUN/$name.$try
        mkdir -p "$dir"
        CTL=$(free_port)
        ENTRY=$(free_port)
        rathole_configs "$dir" "$transport" "$CTL" "$ENTRY"
        cp "$dir/server.toml" "$OUT/$name-server.toml"
        cp "$dir/client.toml" "$OUT/$name-client.toml"
        start "$name-server" env RUST_LOG=warn "$RATHOLE" --server "$dir/server.toml"
        ENTRY_PID=$STARTED_PID
        start "$name-client" env RUST_LOG=warn "$RATHOLE" --client "$dir/client.toml"
        EXIT_PID=$STARTED_PID
        if wait_echo "$ENTRY" 2>/dev/null; then return 0; fi
        stop_group "$EXIT_PID"
        stop_group "$ENTRY_PID"
    done
    echo "tunnel.sh: $name did not start; see $OUT/$name-*.log" >&2
    exit 1
}

BORE_PID=""
start_bore() {
    local name=$1 i
    # bore's control port is fixed (7835): one server for the whole run.
    if [ -z "$BORE_PID" ] || ! kill -0 "$BORE_PID" 2>/dev/null; then
        start bore-server env RUST_LOG=warn "$BORE" server --bind-addr 127.0.0.1 --min-port 20000 --max-port 60000
        BORE_PID=$STARTED_PID
        for ((i = 0; i < 100; i++)); do
            (exec 3<>/dev/tcp/127.0.0.1/7835) 2>/dev/null && break
            kill -0 "$BORE_PID" 2>/dev/null || { echo "tunnel.sh: bore server failed (port 7835 taken?); see $OUT/bore-server.log" >&2; exit 1; }
            sleep 0.1
        done
    fi
    ENTRY_PID=$BORE_PID
    # bore logs every connection at `info`, on both sides: run both at
    # `warn` (as the others), so pick the public port here.
    local try
    for try in 1 2 3 4 5; do
        ENTRY=$(free_port)
        start "$name-local" env RUST_LOG=warn "$BORE" local "$ECHO" --local-host 127.0.0.1 --to 127.0.0.1 --port "$ENTRY"
        EXIT_PID=$STARTED_PID
        wait_echo "$ENTRY" 2>/dev/null && return 0
        stop_group "$EXIT_PID"
    done
    echo "tunnel.sh: bore local did not start; see $OUT/$name-local.*" >&2
    exit 1
}

start_ssh_l() {
    local name=$1
    ENTRY=$(free_port)
    start "$name" "${SSH[@]}" -L "127.0.0.1:$ENTRY:127.0.0.1:$ECHO" "$SSH_USER@127.0.0.1"
    ENTRY_PID=$STARTED_PID
    EXIT_PID=$SSHD_PID
    wait_echo "$ENTRY"
}

start_ssh_r() {
    local name=$1
    start "$name" "${SSH[@]}" -o LogLevel=INFO -R "127.0.0.1:0:127.0.0.1:$ECHO" "$SSH_USER@127.0.0.1"
    EXIT_PID=$STARTED_PID
    ENTRY_PID=$SSHD_PID
    ENTRY=$(wait_line "$OUT/$name.log" 's/^Allocated port \([0-9]*\) for remote forward.*/\1/p' "$EXIT_PID")
    wait_echo "$ENTRY"
}

start_contender() {
    WSGATE_ENV=()
    case "$1" in
    wsgate) start_wsgate "$2" ;;
    wsgate-nothp) WSGATE_ENV=(MIMALLOC_ALLOW_THP=0); start_wsgate "$2" ;;
    rathole-tcp) start_rathole "$2" tcp ;;
    rathole-ws) start_rathole "$2" websocket ;;
    bore) start_bore "$2" ;;
    ssh-L) start_ssh_l "$2" ;;
    ssh-R) start_ssh_r "$2" ;;
    direct) ENTRY=$ECHO; ENTRY_PID=$ECHO_PID; EXIT_PID="" ;;
    esac
}

# Stops a contender's own processes (not the shared sshd, bore server, echo).
stop_contender() {
    local c=$1 entry=$2 exit=$3
    case "$c" in
    wsgate* | rathole-*) stop_group "$exit"; stop_group "$entry" ;;
    bore | ssh-R) stop_group "$exit" ;;
    ssh-L) stop_group "$entry" ;;
    esac
}

# ---------------------------------------------------------------- machine
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "command: ${WSBENCH_NICE:+WSBENCH_NICE=$WSBENCH_NICE }bench/tunnel.sh${ARGS[*]:+ ${ARGS[*]}}"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- crates bench/src 2>/dev/null || echo ' (modified)')"
    echo "machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
    echo "versions: rathole $RATHOLE_VERSION (features server,client,websocket), bore $("$BORE" --version | awk '{ print $2 }'), $(ssh -V 2>&1 | cut -d, -f1), nginx $(nginx -v 2>&1 | sed 's/^nginx version: nginx\///'), ssh cipher $SSH_CIPHER"
} >"$OUT/meta.txt"

CONTENDERS=(wsgate rathole-tcp rathole-ws bore ssh-L ssh-R direct)
declare -A PORT EPID XPID
echo "== starting the contenders" >&2
for c in "${CONTENDERS[@]}"; do
    start_contender "$c" "$c"
    PORT[$c]=$ENTRY
    EPID[$c]=$ENTRY_PID
    XPID[$c]=$EXIT_PID
    [ "$c" = wsgate ] && { WS_GW_PORT=$GW_PORT; }
    echo "   $c: port ${PORT[$c]} (entry pid ${EPID[$c]}, exit pid ${XPID[$c]:-none})" >&2
done

# Every contender echoes 64 B, 64 KiB and 1 MiB intact before anything is measured.
for c in "${CONTENDERS[@]}"; do
    for size in 64 65536 1048576; do
        "$WSBENCH" load --target "tcp://127.0.0.1:${PORT[$c]}" --test latency --size "$size" \
            --warmup 0 --duration 0.1 >/dev/null ||
            { echo "tunnel.sh: $c does not echo $size bytes" >&2; exit 1; }
    done
done
# (e)'s three ways to the same nginx answer "hello".
HTTP_DIRECT=(--target "tcp://127.0.0.1:$NGINX" --path /)
# The same, a new connection per request (what the relay does towards nginx).
HTTP_DIRECT_CLOSE=(--target "tcp://127.0.0.1:$NGINX" --path / --header "Connection: close")
HTTP_REQUEST=(--target "tcp://127.0.0.1:$WS_GW_PORT" --path /request --header "X-PROXY-DESTINATION: http://127.0.0.1:$NGINX/")
HTTP_PROXY=(--target "tcp://127.0.0.1:$WS_GW_PORT" --path "http://127.0.0.1:$NGINX/")
for h in HTTP_DIRECT HTTP_DIRECT_CLOSE HTTP_REQUEST HTTP_PROXY; do
    declare -n hv=$h
    got=$("$WSBENCH" load "${hv[@]}" --test http --check) || { echo "tunnel.sh: $h: $got" >&2; exit 1; }
    [ "$got" = "200 hello" ] || { echo "tunnel.sh: $h answered: $got" >&2; exit 1; }
done

# ---------------------------------------------------------------- (a) (b) (c) (e)
RAW=$OUT/raw.csv
echo "round,test,contender,value,value2,entry_cpu_ticks,exit_cpu_ticks,output" >"$RAW"
TESTS=(
    "throughput|--test throughput --size 65536 --window 4"
    "connections|--test handshakes --conns 8 --size 64"
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
            e0=$(cpu_trees "${EPID[$c]}")
            x0=$([ -n "${XPID[$c]}" ] && cpu_trees "${XPID[$c]}" || echo 0)
            line=$("$WSBENCH" load --target "tcp://127.0.0.1:${PORT[$c]}" "${flags[@]}" \
                --warmup "$WARMUP" --duration "$DURATION" 2>>"$OUT/wsbench.log") || line="error: see wsbench.log"
            e1=$(cpu_trees "${EPID[$c]}")
            x1=$([ -n "${XPID[$c]}" ] && cpu_trees "${XPID[$c]}" || echo 0)
            v1=$(awk '{ print $1 }' <<<"$line")
            v2=$(sed -n 's/.*(\([0-9]*\) errors).*/\1/p' <<<"$line")
            echo "$((r + 1)),$id,$c,$v1,$v2,$((e1 - e0)),$((x1 - x0)),\"$line\"" >>"$RAW"
            printf '   %-12s %-12s %s\n' "$id" "$c" "$line" >&2
        done
    done
    # (c): every contender in one interleaved run (20 ms slices, round-robin).
    targets=()
    for c in "${order[@]}"; do targets+=(--target "tcp://127.0.0.1:${PORT[$c]}"); done
    lat=$("$WSBENCH" latency-multi "${targets[@]}" --size 64 --warmup "$WARMUP" --duration "$DURATION" \
        2>>"$OUT/wsbench.log") || lat=""
    for c in "${order[@]}"; do
        line=$(grep "^tcp://127.0.0.1:${PORT[$c]} " <<<"$lat" || echo "error")
        p50=$(sed -n 's/.* p50 \([0-9.]*\) us.*/\1/p' <<<"$line")
        p99=$(sed -n 's/.* p99 \([0-9.]*\) us.*/\1/p' <<<"$line")
        echo "$((r + 1)),latency,$c,$p50,$p99,,,\"$line\"" >>"$RAW"
        printf '   %-12s %-12s %s\n' latency "$c" "${line#* }" >&2
    done
    # (e): HTTP through /request, the forward proxy, and directly, rotating.
    hs=(HTTP_DIRECT HTTP_DIRECT_CLOSE HTTP_REQUEST HTTP_PROXY)
    for ((i = 0; i < ${#hs[@]}; i++)); do
        h=${hs[$(((i + r) % ${#hs[@]}))]}
        declare -n hv=$h
        line=$("$WSBENCH" load "${hv[@]}" --test http --conns 16 --warmup "$WARMUP" --duration "$DURATION" \
            2>>"$OUT/wsbench.log") || line="error: see wsbench.log"
        v1=$(awk '{ print $1 }' <<<"$line")
        v2=$(sed -n 's/.*(\([0-9]*\) errors).*/\1/p' <<<"$line")
        echo "$((r + 1)),http,$h,$v1,$v2,,,\"$line\"" >>"$RAW"
        printf '   %-12s %-12s %s\n' http "$h" "$line" >&2
    done
done

for c in "${CONTENDERS[@]}"; do stop_contender "$c" "${EPID[$c]}" "${XPID[$c]}"; done

# ---------------------------------------------------------------- (d) streams
# On fresh processes: one warm-up echo, then IDLE_STREAMS connections opened
# through the contender (64 connecting at once), each echoing 64 B, held 1 s.
# RSS of the entry side (and of the exit side) sampled every 0.1 s while they
# are open: growth = peak - before.
IDLE=$OUT/idle.csv
echo "round,contender,what,n,entry_before_kib,entry_peak_kib,exit_before_kib,exit_peak_kib" >"$IDLE"
IDLE_CONTENDERS=(wsgate wsgate-nothp rathole-tcp rathole-ws bore ssh-L ssh-R)
sample_idle() { # CONTENDER ROUND WHAT N -- command that holds the load
    local c=$1 r=$2 what=$3 n=$4 eb xb ep xp now wpid
    shift 5
    eb=$(rss_trees "$ENTRY_PID")
    xb=$([ -n "$EXIT_PID" ] && rss_trees "$EXIT_PID" || echo 0)
    "$@" >>"$OUT/idle-wsbench.log" 2>&1 &
    wpid=$!
    ep=$eb xp=$xb
    for ((k = 0; k < 3000; k++)); do
        kill -0 "$wpid" 2>/dev/null || break
        now=$(rss_trees "$ENTRY_PID"); [ "$now" -gt "$ep" ] && ep=$now
        if [ -n "$EXIT_PID" ]; then now=$(rss_trees "$EXIT_PID"); [ "$now" -gt "$xp" ] && xp=$now; fi
        sleep 0.1
    done
    if ! wait "$wpid"; then ep="" xp=""; fi
    echo "$r,$c,$what,$n,$eb,$ep,$xb,$xp" >>"$IDLE"
    printf '   %-12s %-7s entry %s -> %s KiB, exit %s -> %s KiB\n' "$c" "$what" "$eb" "${ep:-error}" "$xb" "${xp:-error}" >&2
}

for ((r = 0; r < IDLE_ROUNDS; r++)); do
    echo "== (d) round $((r + 1))/$IDLE_ROUNDS: $IDLE_STREAMS idle streams" >&2
    for ((i = 0; i < ${#IDLE_CONTENDERS[@]}; i++)); do
        c=${IDLE_CONTENDERS[$(((i + r) % ${#IDLE_CONTENDERS[@]}))]}
        start_contender "$c" "$c-idle$((r + 1))"
        "$WSBENCH" load --target "tcp://127.0.0.1:$ENTRY" --test idle --conns 1 --pid "$ENTRY_PID" >/dev/null
        sleep 0.3
        sample_idle "$c" $((r + 1)) streams "$IDLE_STREAMS" -- \
            "$WSBENCH" load --target "tcp://127.0.0.1:$ENTRY" --test idle --conns "$IDLE_STREAMS" \
            --pid "$ENTRY_PID"
        stop_contender "$c" "$ENTRY_PID" "$EXIT_PID"
        # bore's server is shared by the other phases: a fresh one per (d) row.
        [ "$c" = bore ] && { stop_group "$BORE_PID"; BORE_PID=""; }
    done
done

# ---------------------------------------------------------------- (d) agents
# IDLE_AGENTS agents connect to a fresh gateway side and stay idle; the
# gateway side's RSS growth is divided by their number. wsgate: `wsgate
# agent` with its default pool (2 WebSockets) and one id each; rathole: one
# client per service (a server with IDLE_AGENTS services); bore: `bore local`
# processes; ssh -R: ssh clients, each a session of sshd (its processes
# count). ssh -L has no agent side that dials in: not measured.
AGENT_PIDS=()
wait_count() { # DESCRIPTION N COMMAND... (prints a count), 60 s at most
    local what=$1 n=$2 i got
    shift 2
    for ((i = 0; i < 600; i++)); do
        got=$("$@" 2>/dev/null || echo 0)
        [ "$got" -ge "$n" ] && return 0
        sleep 0.1
    done
    echo "tunnel.sh: only $got of $n $what" >&2
    return 1
}
count_lines() { cat "$@" 2>/dev/null | wc -l; }
wsgate_links() { curl -s "$GW_ADMIN/agents" | python3 -c 'import json,sys; print(sum(a["connections"] for a in json.load(sys.stdin)))'; }
established() { # PORT: established TCP connections to 127.0.0.1:PORT (server side)
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" '$2 ~ p"$" && $4 == "01"' /proc/net/tcp | wc -l
}

agents_round() { # CONTENDER ROUND
    local c=$1 r=$2 n=$IDLE_AGENTS k dir eb ep pids
    AGENT_PIDS=()
    WSGATE_ENV=()
    case "$c" in
    wsgate | wsgate-nothp)
        [ "$c" = wsgate-nothp ] && WSGATE_ENV=(MIMALLOC_ALLOW_THP=0)
        start_wsgate "$c-agents$r"
        stop_group "$EXIT_PID"
        sleep 0.3
        eb=$(rss_trees "$ENTRY_PID")
        for ((k = 1; k <= n; k++)); do
            start "$c-agents$r-$k" env "${WSGATE_ENV[@]}" "$WSGATE" agent --server "ws://127.0.0.1:$GW_PORT/agent" --id "idle$k" \
                --token-file "$RUN/token.txt" --allow "tcp://127.0.0.1:$ECHO" --log warn
            AGENT_PIDS+=("$STARTED_PID")
        done
        wait_count "wsgate agent links" $((2 * n)) wsgate_links
        ;;
    rathole-tcp | rathole-ws)
        dir=$RUN/$c-agents$r
        mkdir -p "$dir"
        local transport=tcp ws=""
        [ "$c" = rathole-ws ] && { transport=websocket; ws=$'[server.transport.websocket]\ntls = false'; }
        local ctl
        ctl=$(free_port)
        {
            printf '[server]\nbind_addr = "127.0.0.1:%s"\ndefault_token = "bench-token"\n[server.transport]\ntype = "%s"\n%s\n' \
                "$ctl" "$transport" "$ws"
            for ((k = 1; k <= n; k++)); do
                printf '[server.services.s%d]\nbind_addr = "127.0.0.1:%s"\n' "$k" "$(free_port)"
            done
        } >"$dir/server.toml"
        start "$c-agents$r-server" env RUST_LOG=warn "$RATHOLE" --server "$dir/server.toml"
        ENTRY_PID=$STARTED_PID
        for ((k = 0; k < 100; k++)); do
            (exec 3<>"/dev/tcp/127.0.0.1/$ctl") 2>/dev/null && break
            sleep 0.1
        done
        sleep 0.3
        eb=$(rss_trees "$ENTRY_PID")
        for ((k = 1; k <= n; k++)); do
            printf '[client]\nremote_addr = "127.0.0.1:%s"\ndefault_token = "bench-token"\n[client.transport]\ntype = "%s"\n%s\n[client.services.s%d]\nlocal_addr = "127.0.0.1:%s"\n' \
                "$ctl" "$transport" "${ws//server/client}" "$k" "$ECHO" >"$dir/client$k.toml"
            start "$c-agents$r-$k" env RUST_LOG=warn "$RATHOLE" --client "$dir/client$k.toml"
            AGENT_PIDS+=("$STARTED_PID")
        done
        # One control channel per client, established to the server's port.
        wait_count "rathole control channels" "$n" established "$ctl"
        ;;
    bore)
        start_bore "$c-agents$r-probe"
        stop_group "$EXIT_PID"
        sleep 0.3
        eb=$(rss_trees "$ENTRY_PID")
        for ((k = 1; k <= n; k++)); do
            start "$c-agents$r-$k" env RUST_LOG=warn "$BORE" local "$ECHO" --local-host 127.0.0.1 --to 127.0.0.1
            AGENT_PIDS+=("$STARTED_PID")
        done
        # One control connection per client.
        wait_count "bore control connections" "$n" established 7835
        ;;
    ssh-R)
        ENTRY_PID=$SSHD_PID
        eb=$(rss_trees "$ENTRY_PID")
        for ((k = 1; k <= n; k++)); do
            start "$c-agents$r-$k" "${SSH[@]}" -o LogLevel=INFO -R "127.0.0.1:0:127.0.0.1:$ECHO" "$SSH_USER@127.0.0.1"
            AGENT_PIDS+=("$STARTED_PID")
        done
        wait_count "ssh -R forwards allocated" "$n" sh -c "grep -l '^Allocated port' $OUT/$c-agents$r-*.log | wc -l"
        ;;
    esac
    sleep 1
    ep=$(rss_trees "$ENTRY_PID")
    sleep 1
    now=$(rss_trees "$ENTRY_PID")
    [ "$now" -gt "$ep" ] && ep=$now
    echo "$r,$c,agents,$n,$eb,$ep,," >>"$IDLE"
    printf '   %-12s agents  entry %s -> %s KiB (%s agents)\n' "$c" "$eb" "$ep" "$n" >&2
    for k in "${AGENT_PIDS[@]}"; do stop_group "$k"; done
    case "$c" in
    wsgate* | rathole-*) stop_group "$ENTRY_PID" ;;
    bore) stop_group "$BORE_PID"; BORE_PID="" ;;
    esac
}

for ((r = 0; r < IDLE_ROUNDS; r++)); do
    echo "== (d) round $((r + 1))/$IDLE_ROUNDS: $IDLE_AGENTS idle agents" >&2
    AG=(wsgate wsgate-nothp rathole-tcp rathole-ws bore ssh-R)
    for ((i = 0; i < ${#AG[@]}; i++)); do
        agents_round "${AG[$(((i + r) % ${#AG[@]}))]}" $((r + 1))
    done
done

echo "$(cut -d' ' -f1-3 /proc/loadavg)" >"$RUN/load_after"
{
    cat "$OUT/meta.txt"
    echo "load average: $LOAD_BEFORE before, $(cat "$RUN/load_after") after"
} >"$OUT/meta.tmp" && mv "$OUT/meta.tmp" "$OUT/meta.txt"

python3 bench/tunnel/table.py "$OUT" "$ROUNDS" "$IDLE_ROUNDS" "$DURATION" "$WARMUP" | tee "$OUT/table.md"
