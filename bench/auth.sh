#!/usr/bin/env bash
# The authentication benchmark, one command: WebSocket handshakes per second
# through wsgate with each method (none, JWT HS256, JWT ES256, Basic with
# bcrypt cached and not, an auth hook, TLS and mTLS) and through nginx with
# and without auth_request, all in front of the same echo backend, and the
# CPU each spends per handshake.
#
#   [WSBENCH_NICE=-10] bench/auth.sh [--rounds N] [--duration S] [--warmup S] [--conns N]
#                                   [--bcrypt-cost N] [--no-build]
#
# Prints a Markdown table of medians; the table, every raw value, the
# configs and the logs are kept under bench/results/auth-<UTC timestamp>/
# (git-ignored). Every process it starts is killed on exit. See
# bench/auth/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/lib.sh
bench_nice "$0" "$@"

ROUNDS=3
DURATION=2
WARMUP=0.5
CONNS=8
COST=10
BUILD=1
ARGS=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --conns) CONNS=$2; shift 2 ;;
    --bcrypt-cost) COST=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "auth.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

for tool in nginx openssl htpasswd python3; do
    command -v "$tool" >/dev/null || {
        echo "auth.sh: $tool is missing (scripts/install-test-deps.sh installs it)" >&2
        exit 1
    }
done

bench_build

bench_dirs auth
chmod 755 "$RUN"

# Starts wsgate NAME with ARGS; waits for COUNT `listening on` lines; sets
# STARTED_PID and STARTED_PORTS (one per listener, in order).
start_wsgate() {
    local name=$1 count=$2 i
    shift 2
    # Created first: the loop below may read it before the child opens it.
    : >"$OUT/$name.out"
    setsid "$WSGATE" serve "$@" >>"$OUT/$name.out" 2>"$OUT/$name.log" </dev/null &
    STARTED_PID=$!
    PGIDS+=("$STARTED_PID")
    for ((i = 0; i < 100; i++)); do
        mapfile -t STARTED_PORTS < <(sed -n 's#^listening on wss\?://127\.0\.0\.1:\([0-9]*\)$#\1#p' "$OUT/$name.out")
        [ "${#STARTED_PORTS[@]}" -ge "$count" ] && return 0
        kill -0 "$STARTED_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "auth.sh: $name did not start; see $OUT/$name.log" >&2
    exit 1
}

# ---------------------------------------------------------------- material
echo "== keys, tokens, certificates (bcrypt cost $COST)" >&2
M=$RUN/material
mkdir -p "$M"
head -c 48 /dev/urandom | base64 | tr -d '\n' >"$M/hs256.secret"
openssl ecparam -name prime256v1 -genkey -noout -out "$M/es256.key" 2>/dev/null
openssl ec -in "$M/es256.key" -pubout -out "$M/es256.pub" 2>/dev/null
HS=$(python3 bench/auth/mint.py hs256 "$M/hs256.secret" bench)
ES=$(python3 bench/auth/mint.py es256 "$M/es256.key" bench)
htpasswd -cbB -C "$COST" "$M/users" bench "correct horse battery staple" 2>/dev/null
BASIC=$(printf '%s' "bench:correct horse battery staple" | base64 | tr -d '\n')
HOOK_TOKEN=$(head -c 24 /dev/urandom | base64 | tr -d '/+=\n')
(
    cd "$M"
    cat >ext.cnf <<'CNF'
[ca]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
[server]
basicConstraints = CA:false
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
[client]
basicConstraints = CA:false
extendedKeyUsage = clientAuth
CNF
    ec() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -subj "/CN=$1" "${@:2}"; }
    ec ca -x509 -days 2 -out ca.pem -addext "basicConstraints=critical,CA:true" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    for n in server client; do
        ec "$n" -out "$n.csr" 2>/dev/null
        openssl x509 -req -in "$n.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile ext.cnf -extensions "$n" -out "$n.pem" 2>/dev/null
    done
)

# ---------------------------------------------------------------- processes
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "uptime: $(uptime)"
    echo "command: ${WSBENCH_NICE:+WSBENCH_NICE=$WSBENCH_NICE }bench/auth.sh${ARGS[*]:+ ${ARGS[*]}}"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- crates bench 2>/dev/null || echo ' (modified)')"
    echo "machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
    echo "nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
} >"$OUT/meta.txt"

echo "== starting the backend, nginx and wsgate" >&2
start_wsgate backend 1 --listen 127.0.0.1:0 --to echo: --max-connections 20000 --log warn
BACKEND=${STARTED_PORTS[0]}

# nginx cannot bind :0: ports picked just before start, retried if taken.
for ((try = 0; try < 5; try++)); do
    NGINX_PORT=$(free_port)
    AUTH_PORT=$(free_port)
    dir=$RUN/nginx.$try
    mkdir -p "$dir"
    sed -e "s#@PORT@#$NGINX_PORT#g" -e "s#@AUTHPORT@#$AUTH_PORT#g" -e "s#@BACKEND@#$BACKEND#g" \
        -e "s#@DIR@#$dir#g" -e "s#@TOKEN@#$HOOK_TOKEN#g" bench/auth/nginx.conf.in >"$dir/conf"
    sed "s#$HOOK_TOKEN#TOKEN#g" "$dir/conf" >"$OUT/nginx.conf"
    setsid nginx -p "$dir" -c "$dir/conf" -e "$dir/nginx-error.log" >"$OUT/nginx.log" 2>&1 </dev/null &
    NGINX_PID=$!
    PGIDS+=("$NGINX_PID")
    if wait_listening "$NGINX_PID" "$NGINX_PORT" && wait_listening "$NGINX_PID" "$AUTH_PORT"; then
        break
    fi
    kill -TERM -- "-$NGINX_PID" 2>/dev/null || true
    NGINX_PID=""
done
[ -n "$NGINX_PID" ] || { echo "auth.sh: nginx did not start; see $OUT/nginx.log" >&2; exit 1; }

# Every method on its own route, all proxying to the same backend as nginx.
cat >"$RUN/wsgate.toml" <<TOML
[[listener]]
address = "127.0.0.1:0"

[[listener]]
address = "127.0.0.1:0"
tls_cert = "$M/server.pem"
tls_key = "$M/server.key"
client_ca = "$M/ca.pem"
client_auth = "optional"

[limits]
max_connections = 20000

[auth.hs256]
type = "jwt"
secret_file = "$M/hs256.secret"
algorithms = ["HS256"]

[auth.es256]
type = "jwt"
public_key = "$M/es256.pub"
algorithms = ["ES256"]

[auth.basic]
type = "basic"
htpasswd = "$M/users"

[auth.basic_nocache]
type = "basic"
htpasswd = "$M/users"
cache_ttl = "0s"

[auth.hook]
type = "hook"
url = "http://127.0.0.1:$AUTH_PORT/check"
cache_ttl = "0s"

[auth.hook_cached]
type = "hook"
url = "http://127.0.0.1:$AUTH_PORT/check"

[auth.certs]
type = "mtls"
TOML
for r in none:- hs256:hs256 es256:es256 basic:basic basic-nocache:basic_nocache hook:hook \
    hook-cached:hook_cached mtls:certs; do
    path=${r%%:*} method=${r#*:}
    {
        echo
        echo "[[route]]"
        echo "path = \"/$path\""
        echo "proxy = \"ws://127.0.0.1:$BACKEND\""
        [ "$method" = - ] || echo "auth = [\"$method\"]"
    } >>"$RUN/wsgate.toml"
done
sed -e "s#$RUN#RUN#g" "$RUN/wsgate.toml" >"$OUT/wsgate.toml"
"$WSGATE" check --config "$RUN/wsgate.toml" >&2
start_wsgate wsgate 2 --config "$RUN/wsgate.toml" --log warn
WSGATE_PID=$STARTED_PID
WS=${STARTED_PORTS[0]}
WSS=${STARTED_PORTS[1]}
echo "   backend :$BACKEND, wsgate :$WS (wss :$WSS), nginx :$NGINX_PORT (auth endpoint :$AUTH_PORT)" >&2

# ---------------------------------------------------------------- cells
# label | CPU of (wsgate, nginx, both) | wsbench flags
TLS=(--ca "$M/ca.pem")
CELLS=(
    "wsgate: none|wsgate|--target ws://127.0.0.1:$WS/none"
    "wsgate: JWT HS256|wsgate|--target ws://127.0.0.1:$WS/hs256 --header Authorization:@Bearer@$HS"
    "wsgate: JWT ES256|wsgate|--target ws://127.0.0.1:$WS/es256 --header Authorization:@Bearer@$ES"
    "wsgate: Basic, bcrypt cached|wsgate|--target ws://127.0.0.1:$WS/basic --header Authorization:@Basic@$BASIC"
    "wsgate: Basic, bcrypt not cached|wsgate|--target ws://127.0.0.1:$WS/basic-nocache --header Authorization:@Basic@$BASIC"
    "wsgate: hook, not cached|both|--target ws://127.0.0.1:$WS/hook --header Authorization:@Bearer@$HOOK_TOKEN"
    "wsgate: hook, cached|both|--target ws://127.0.0.1:$WS/hook-cached --header Authorization:@Bearer@$HOOK_TOKEN"
    "wsgate: TLS, no client certificate|wsgate|--target wss://127.0.0.1:$WSS/none ${TLS[*]}"
    "wsgate: mTLS|wsgate|--target wss://127.0.0.1:$WSS/mtls ${TLS[*]} --cert $M/client.pem --key $M/client.key"
    "nginx: none|nginx|--target ws://127.0.0.1:$NGINX_PORT/none"
    "nginx: auth_request|nginx|--target ws://127.0.0.1:$NGINX_PORT/auth --header Authorization:@Bearer@$HOOK_TOKEN"
)
RAW=$OUT/raw.csv
echo "round,label,rate,errors,cpu_us" >"$RAW"
for ((r = 0; r < ROUNDS; r++)); do
    echo "== round $((r + 1))/$ROUNDS (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    n=${#CELLS[@]}
    for ((i = 0; i < n; i++)); do
        cell=${CELLS[$(((i + r) % n))]}
        label=${cell%%|*}
        rest=${cell#*|}
        who=${rest%%|*}
        read -r -a flags <<<"${rest#*|}"
        # `@` stands for a space inside one header argument.
        for k in "${!flags[@]}"; do flags[$k]=${flags[$k]//@/ }; done
        case "$who" in
        wsgate) pids=(--pid "$WSGATE_PID") ;;
        nginx) pids=(--pid "$NGINX_PID") ;;
        both) pids=(--pid "$WSGATE_PID" --pid "$NGINX_PID") ;;
        esac
        line=$("$WSBENCH" handshakes "${flags[@]}" --conns "$CONNS" "${pids[@]}" \
            --warmup "$WARMUP" --duration "$DURATION" 2>>"$OUT/wsbench.log") || line="error: see wsbench.log"
        rate=$(awk '{ print $1 }' <<<"$line")
        errors=$(sed -n 's/.*(\([0-9]*\) errors).*/\1/p' <<<"$line")
        cpu=$(sed -n 's/.*, \([0-9]*\) us CPU.*/\1/p' <<<"$line")
        echo "$((r + 1)),\"$label\",$rate,$errors,$cpu" >>"$RAW"
        printf '   %-40s %s\n' "$label" "$line" >&2
    done
done

echo "load average: $LOAD_BEFORE before, $(cut -d' ' -f1-3 /proc/loadavg) after" >>"$OUT/meta.txt"
python3 bench/auth/table.py "$OUT" "$ROUNDS" "$DURATION" "$WARMUP" "$CONNS" "$COST" | tee "$OUT/table.md"
