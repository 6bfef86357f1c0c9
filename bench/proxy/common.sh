# Sourced by the side scripts of bench/proxy (instructions.sh, workers.sh):
# a private run folder, the processes started there killed on exit, and
# waiting for a server's "listening on" line.
#
#   source bench/proxy/common.sh NAME     # sets RUN (a temp dir) and PIDS

RUN=$(mktemp -d "/tmp/wsgate-$1.XXXXXX")
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$RUN"
}
trap cleanup EXIT

# Waits (at most 20 s) for "listening on ws://127.0.0.1:PORT" in FILE (which a
# server started in the background may not have created yet); prints PORT.
port_of() {
    local i p
    for ((i = 0; i < 100; i++)); do
        p=$(sed -n 's#^listening on ws://127\.0\.0\.1:\([0-9]*\)$#\1#p' "$1" 2>/dev/null)
        [ -n "$p" ] && { echo "$p"; return 0; }
        sleep 0.2
    done
    echo "nothing listening, see $1" >&2
    return 1
}

# Prints a free port on 127.0.0.1 (for servers that cannot bind :0).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits (at most 20 s) until 127.0.0.1:PORT accepts a connection.
wait_port() {
    local i
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.2
    done
    echo "nothing accepts on port $1" >&2
    return 1
}

# Writes $RUN/nginx/conf: the bench config for PORT in front of $BACKEND,
# with one worker and no master (one process to trace or count).
nginx_one_worker_conf() {
    mkdir -p "$RUN/nginx"
    sed -e "s#@PORT@#$1#g" -e "s#@BACKEND@#$BACKEND#g" -e "s#@DIR@#$RUN/nginx#g" \
        -e 's/^worker_processes 2;/worker_processes 1;/' -e 's/^master_process on;/master_process off;/' \
        bench/proxy/nginx.conf.in >"$RUN/nginx/conf"
}
