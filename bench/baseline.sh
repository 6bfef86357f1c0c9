#!/usr/bin/env bash
# Builds wsgate at an earlier git revision, for a before/after comparison in
# one benchmark run, and prints the binary's path.
#
#   bench/baseline.sh REV      # e.g. be3cd7c; builds in .cache/baseline-REV/
#
# bench/run.sh and bench/proxy.sh call it when WSGATE_BASELINE=REV is set.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$(git rev-parse --short "${1:?usage: bench/baseline.sh REV}")
wt=.cache/baseline-$rev
if [ ! -x "$wt/target/release/wsgate" ]; then
    echo "== building the baseline wsgate at $rev" >&2
    [ -d "$wt" ] || git worktree add --detach "$wt" "$rev" >&2
    (cd "$wt" && cargo build --release -p wsgate) >&2
fi
echo "$PWD/$wt/target/release/wsgate"
