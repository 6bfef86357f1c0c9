# Shared by the side-by-side benchmark scripts (sourced, not run): running
# again under `nice`, the build, the results and run folders, process groups
# stopped on exit, and bounded waits. Every script runs from the repository
# root with `set -euo pipefail`.

# With WSBENCH_NICE set, runs the calling script again under `nice` (once):
# on a machine shared with other work, WSBENCH_NICE=-10 runs everything (load
# generator, peers, contenders alike) ahead of it (needs root for < 0).
#   bench_nice "$0" "$@"
bench_nice() {
    local script=$1 var
    shift
    var=$(basename "$script" .sh | tr '[:lower:]' '[:upper:]')_SH_NICED
    if [ -n "${WSBENCH_NICE:-}" ] && [ -z "${!var:-}" ]; then
        export "$var=1"
        exec nice -n "$WSBENCH_NICE" "$script" "$@"
    fi
}

# Builds wsgate and the load generator unless BUILD=0 (--no-build).
bench_build() {
    if [ "${BUILD:-1}" = 1 ]; then
        echo "== building (release)" >&2
        cargo build --release -p wsgate -p wsgate-bench >&2
    fi
}

# Sets OUT (bench/results/NAME-<UTC timestamp>, absolute; kept) and RUN (a
# private folder under /tmp, removed on exit) holding copies of wsgate and
# wsbench, WSGATE and WSBENCH: target/ may be rebuilt by others mid-run.
#   bench_dirs NAME
bench_dirs() {
    local name=$1
    OUT=bench/results/$name-$(date -u +%Y%m%dT%H%M%SZ)
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    RUN=$(mktemp -d "/tmp/wsgate-$name-bench.XXXXXX")
    cp target/release/wsgate target/release/wsbench "$RUN/"
    WSGATE=$RUN/wsgate
    WSBENCH=$RUN/wsbench
}

# Process groups started by the script (each process is started by setsid);
# on exit each gets TERM, up to 3 s to go, then KILL, and RUN is removed.
PGIDS=()
cleanup() {
    local g i alive
    for g in "${PGIDS[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
    for ((i = 0; i < 30; i++)); do
        alive=0
        for g in "${PGIDS[@]}"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for g in "${PGIDS[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
    if [ -n "${RUN:-}" ]; then rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Stops one started group (TERM, then KILL after 5 s) and forgets it.
stop_group() {
    local g=$1 i keep=()
    for i in "${PGIDS[@]}"; do [ "$i" = "$g" ] || keep+=("$i"); done
    PGIDS=("${keep[@]}")
    kill -TERM -- "-$g" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 -- "-$g" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL -- "-$g" 2>/dev/null || true
}

# A free TCP port on 127.0.0.1 (for peers that cannot take port 0).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Waits (at most 10 s) until PID is alive and 127.0.0.1:PORT accepts.
wait_listening() {
    local pid=$1 port=$2 i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}
