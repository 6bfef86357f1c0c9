#!/usr/bin/env bash
# Benchmark (b) of issue 26: a JSON message stream echoed through
# permessage-deflate by wsgate (`--to echo: --deflate`) and by Node `ws`
# (bench/deflate/server.mjs), one after the other in each round, the same
# client (wsbench-deflate) and messages for both. See bench/deflate/README.md.
#
#   bench/deflate.sh [ROUNDS]        # default 3; prints a Markdown table
#
# Needs node and e2e/node_modules (scripts/install-test-deps.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds="${1:-3}"
cd "$root"
cargo build --release -q -p wsgate -p wsgate-bench
bin="$root/target/release"
out="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT

start() { # NAME CMD... -> sets url, pid
  local name="$1"; shift
  "$@" > "$out/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    url="$(sed -n 's/^listening on \(ws:\/\/[^ ]*\)$/\1/p' "$out/$name.log" | head -1)"
    [ -n "$url" ] && return 0
    sleep 0.1
  done
  echo "$name did not start: $(cat "$out/$name.log")" >&2; exit 1
}

results="$out/results.jsonl"
for r in $(seq "$rounds"); do
  order=(wsgate node)
  [ $((r % 2)) -eq 0 ] && order=(node wsgate)
  for who in "${order[@]}"; do
    if [ "$who" = wsgate ]; then
      start wsgate "$bin/wsgate" serve --listen 127.0.0.1:0 --to echo: --deflate --log warn
    else
      start node node bench/deflate/server.mjs
    fi
    for conns in 1 16; do
      line="$("$bin/wsbench-deflate" --url "$url/" --pid "$pid" --conns "$conns" --inflight 32 --seconds 3)"
      echo "{\"server\":\"$who\",\"round\":$r,${line#\{}" >> "$results"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done

python3 - "$results" "$rounds" <<'PY'
import json, statistics, sys, os
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"Rounds: {sys.argv[2]} (median), load average at the end: {os.getloadavg()[0]:.2f}")
print()
print("| server | conns | msgs/s | server CPU µs/msg | server CPU (cores) | ratio (echoes) | mean message |")
print("|---|---:|---:|---:|---:|---:|---:|")
for who in ("wsgate", "node"):
    for conns in (1, 16):
        rs = [r for r in rows if r["server"] == who and r["conns"] == conns]
        med = lambda k: statistics.median(r[k] for r in rs)
        print(f"| {who} | {conns} | {med('msgs_per_s'):,.0f} | {med('server_cpu_us_per_msg'):.1f} | "
              f"{med('server_cpu_share'):.2f} | {med('ratio_down'):.2f} | {med('mean_msg_bytes'):.0f} B |")
print()
exts = {r["server"]: r["extensions"] for r in rows}
for who, e in exts.items():
    print(f"- {who} answered: `{e}`")
print(f"- client messages compressed on their own (client_no_context_takeover): ratio {rows[0]['ratio_up']:.2f}")
PY
