#!/usr/bin/env bash
# The cluster benchmark, one command: the cost of the extra hop B -> A ->
# agent against A -> agent, and what the directory costs (docs/cluster.md).
#
#   [WSBENCH_NICE=-10] bench/cluster.sh [--rounds N] [--duration S] [--agents N] [--idle-window S] [--no-build]
#
# Starts redis-server, a TCP echo server (wsbench echo), two wsgate nodes A
# and B in one cluster, and one `wsgate agent` registered at A only (pool
# 2) that may reach the echo server. Each node has a --forward listener to
# agent://site-a/tcp://ECHO: a connection to A's goes A -> agent -> echo, to
# B's goes B -> (node link) -> A -> agent -> echo. Then, for --rounds rounds
# (the order of A and B alternating), through each forward:
#   - throughput: 1 connection, 64 KiB writes, 256 KiB in flight: MB/s;
#   - latency: 1 connection, 64 B ping-pong: p50 / p99;
#   - stream opens/s: 8 workers, each connect, 64 B echo, close: each
#     connection is one stream open through the agent (and, via B, one
#     across the link);
# and, during each opens run, the CPU time of the nodes and the agent per
# stream open; during B's opens, Redis's commands (INFO commandstats, and
# MONITOR for the keys of agents) per stream open B made. Last, --agents
# agents (default 2000, ids bench-0..) register at A, then the same ids at
# B (wsbench agents, idle wsmux sessions): A's RSS and Redis's used_memory
# per agent (one node holding it, then two), A's CPU per idle agent
# connection over --idle-window seconds (default 15: one keepalive), and
# Redis's time per EVAL.
#
# Prints a Markdown table of medians; the table, raw values and logs are
# kept under bench/results/cluster-<UTC timestamp>/ (git-ignored). Every
# process it starts is killed on exit. See bench/cluster/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/lib.sh
bench_nice "$0" "$@"

ROUNDS=3
DURATION=2
WARMUP=0.5
AGENTS=2000
IDLE_WINDOW=15
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --agents) AGENTS=$2; shift 2 ;;
    --idle-window) IDLE_WINDOW=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "cluster.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

for tool in redis-server redis-cli python3 curl; do
    command -v "$tool" >/dev/null || {
        echo "cluster.sh: $tool is missing (scripts/install-test-deps.sh)" >&2
        exit 1
    }
done
ulimit -n "$(ulimit -Hn)"

bench_build

bench_dirs cluster

# Waits (at most 20 s) until FILE has a line matching the sed expression;
# prints the match.
wait_line() {
    local file=$1 expr=$2 pid=$3 i v
    for ((i = 0; i < 200; i++)); do
        v=$(sed -n "$expr" "$file" | head -1)
        if [ -n "$v" ]; then echo "$v"; return 0; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "cluster.sh: no match for $expr in $file" >&2
    exit 1
}

# ---------------------------------------------------------------- processes
REDIS_PORT=$(free_port)
setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$RUN" --protected-mode no >"$OUT/redis.log" 2>&1 </dev/null &
PGIDS+=($!)
for ((i = 0; i < 100; i++)); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done
rc() { redis-cli -p "$REDIS_PORT" "$@"; }

setsid "$WSBENCH" --threads 1 echo >"$OUT/echo.out" 2>"$OUT/echo.log" </dev/null &
PGIDS+=($!)
ECHO=$(wait_line "$OUT/echo.out" 's/^listening on //p' $!)

TOKEN=bench-token-0123456789
{
    echo "site-a $TOKEN"
    for ((i = 0; i < AGENTS; i++)); do echo "bench-$i $TOKEN"; done
} >"$RUN/agents.txt"
echo -n "$TOKEN" >"$RUN/token.txt"

# Starts node NAME; sets NODE_PID, NODE_ADDR, NODE_ADMIN, NODE_FWD.
start_node() {
    local name=$1 port
    port=$(free_port)
    cat >"$RUN/$name.toml" <<EOF
workers = 1
[[listener]]
address = "127.0.0.1:$port"
[admin]
address = "127.0.0.1:0"
[limits]
max_connections = 20000
[tunnel]
agent_tokens = "$RUN/agents.txt"
[[tunnel.forward]]
listen = "127.0.0.1:0"
to = "agent://site-a/tcp://$ECHO"
[cluster]
redis = "redis://127.0.0.1:$REDIS_PORT/0"
node_id = "$name"
advertise = "ws://127.0.0.1:$port"
secret = "bench-cluster-secret-0123"
EOF
    cp "$RUN/$name.toml" "$OUT/"
    setsid "$WSGATE" serve --config "$RUN/$name.toml" --log warn \
        >"$OUT/$name.out" 2>"$OUT/$name.log" </dev/null &
    NODE_PID=$!
    PGIDS+=("$NODE_PID")
    NODE_ADDR=$(wait_line "$OUT/$name.out" 's#^listening on ws://##p' "$NODE_PID")
    NODE_ADMIN=$(wait_line "$OUT/$name.out" 's#^admin on http://##p' "$NODE_PID")
    NODE_FWD=$(wait_line "$OUT/$name.out" 's#^forwarding tcp://\([^ ]*\) to .*#\1#p' "$NODE_PID")
}
start_node node-a
A_PID=$NODE_PID A_ADDR=$NODE_ADDR A_FWD=$NODE_FWD A_ADMIN=$NODE_ADMIN
start_node node-b
B_PID=$NODE_PID B_ADDR=$NODE_ADDR B_ADMIN=$NODE_ADMIN B_FWD=$NODE_FWD

setsid "$WSGATE" agent --server "ws://$A_ADDR/agent" --id site-a --token-file "$RUN/token.txt" \
    --pool 2 --allow "tcp://$ECHO" --log warn >"$OUT/agent.out" 2>"$OUT/agent.log" </dev/null &
AGENT_PID=$!
PGIDS+=("$AGENT_PID")
for ((i = 0; i < 100; i++)); do
    [ "$(rc scard wsgate:agent:site-a)" = 1 ] && break
    sleep 0.1
done
[ "$(rc smembers wsgate:agent:site-a)" = node-a ] || {
    echo "cluster.sh: the agent did not register at node-a" >&2
    exit 1
}

load() { "$WSBENCH" --threads 2 load --duration "$DURATION" --warmup "$WARMUP" "$@"; }

# CPU time (user + system, clock ticks) used so far by the processes given.
cpu_ticks() {
    local p s=0 t
    for p in "$@"; do
        t=$(sed 's/^.*) //' "/proc/$p/stat" | awk '{ print $12 + $13 }')
        s=$((s + t))
    done
    echo "$s"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# A node's forward streams opened so far.
fwd_streams() {
    curl -s "http://$1/metrics" |
        awk '/^wsgate_tunnel_streams_total\{via="forward",outcome="ok"\}/ { print $2 }'
}

# B's remote stream opens so far (cache hits + misses).
b_opens() {
    curl -s "http://$B_ADMIN/metrics" |
        awk '/^wsgate_cluster_lookups_total/ { s += $2 } END { print s + 0 }'
}
# Every command Redis has run so far.
redis_calls() {
    rc info commandstats | tr -d '\r' | sed -n 's/^cmdstat_[^:]*:calls=\([0-9]*\),.*/\1/p' |
        awk '{ s += $1 } END { print s + 0 }'
}

echo "== warm-up" >&2
for fwd in "$A_FWD" "$B_FWD"; do
    "$WSBENCH" --threads 2 load --duration 0.5 --warmup 0.1 --target "tcp://$fwd" --test latency >/dev/null
done

RAW=$OUT/raw.csv
echo "round,path,test,value" >"$RAW"
for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then order="A B"; else order="B A"; fi
    for p in $order; do
        if [ "$p" = A ]; then fwd=$A_FWD; else fwd=$B_FWD; fi
        echo "== round $r/$ROUNDS: $p" >&2
        v=$(load --target "tcp://$fwd" --test throughput | awk '{ print $1 }')
        echo "$r,$p,throughput,$v" >>"$RAW"
        l=$(load --target "tcp://$fwd" --test latency)
        echo "$r,$p,p50,$(echo "$l" | awk '{ print $2 }')" >>"$RAW"
        echo "$r,$p,p99,$(echo "$l" | awk '{ print $5 }')" >>"$RAW"
        if [ "$p" = B ]; then
            # Redis's commands while idle, then during B's opens (same length).
            c0=$(redis_calls)
            sleep "$(python3 -c "print($DURATION + $WARMUP)")"
            c1=$(redis_calls)
            timeout 60 redis-cli -p "$REDIS_PORT" monitor >"$RUN/monitor.$r" 2>/dev/null &
            MON=$!
            o0=$(b_opens)
            c2=$(redis_calls)
        fi
        if [ "$p" = A ]; then admin=$A_ADMIN; else admin=$B_ADMIN; fi
        s0=$(fwd_streams "$admin")
        t0=$(cpu_ticks "$A_PID" "$B_PID" "$AGENT_PID")
        v=$(load --target "tcp://$fwd" --test handshakes --conns 8 | awk '{ print $1 }')
        t1=$(cpu_ticks "$A_PID" "$B_PID" "$AGENT_PID")
        s1=$(fwd_streams "$admin")
        echo "$r,$p,opens,$v" >>"$RAW"
        echo "$r,$p,cpu_us_per_open,$(python3 -c "print(round(($t1 - $t0) * $TICK_US / max($s1 - $s0, 1), 1))")" >>"$RAW"
        if [ "$p" = B ]; then
            c3=$(redis_calls)
            o1=$(b_opens)
            kill "$MON" 2>/dev/null || true
            wait "$MON" 2>/dev/null || true
            opens=$((o1 - o0))
            agent_cmds=$(grep -c 'wsgate:agent:' "$RUN/monitor.$r" || true)
            # Each INFO call is a command too: 2 per window, cancelled out.
            extra=$(((c3 - c2) - (c1 - c0)))
            echo "$r,B,remote_opens,$opens" >>"$RAW"
            echo "$r,B,redis_cmds_during_opens,$((c3 - c2))" >>"$RAW"
            echo "$r,B,redis_cmds_idle,$((c1 - c0))" >>"$RAW"
            echo "$r,B,redis_cmds_per_open,$(python3 -c "print(round(max($extra, 0) / max($opens, 1), 4))")" >>"$RAW"
            echo "$r,B,agent_key_cmds,$agent_cmds" >>"$RAW"
        fi
    done
done

echo "== idle CPU of node A without agents (${IDLE_WINDOW} s)" >&2
c0=$(cpu_ticks "$A_PID")
sleep "$IDLE_WINDOW"
c1=$(cpu_ticks "$A_PID")
echo "== memory per idle agent ($AGENTS agents at node-a, then at node-b too)" >&2
used() { rc info memory | tr -d '\r' | sed -n 's/^used_memory:\([0-9]*\)/\1/p'; }
evals() { rc info commandstats | tr -d '\r' | sed -n 's/^cmdstat_eval:calls=\([0-9]*\),usec=\([0-9]*\),.*/\1 \2/p'; }
e0=$(evals)
m0=$(used)
setsid "$WSBENCH" --threads 2 agents --addr "$A_ADDR" --count "$AGENTS" --prefix bench \
    --token "$TOKEN" --pid "$A_PID" >"$OUT/agents-a.out" 2>"$OUT/agents-a.log" </dev/null &
PGIDS+=($!)
AG=$(wait_line "$OUT/agents-a.out" 's/^registered \([0-9]*\) agents.* \([0-9.]*\) KiB per agent$/\1 \2/p' $!)
for ((i = 0; i < 300; i++)); do
    [ "$(rc scard wsgate:agents)" -ge $((AGENTS + 1)) ] && break
    sleep 0.1
done
m1=$(used)
e1=$(evals)
rc memory usage wsgate:agent:bench-1 >"$OUT/memory-usage.txt"
rc memory usage wsgate:agent:bench-1:info >>"$OUT/memory-usage.txt"
echo "== idle CPU of node A with $AGENTS agents (${IDLE_WINDOW} s)" >&2
c2=$(cpu_ticks "$A_PID")
sleep "$IDLE_WINDOW"
c3=$(cpu_ticks "$A_PID")
setsid "$WSBENCH" --threads 2 agents --addr "$B_ADDR" --count "$AGENTS" --prefix bench \
    --token "$TOKEN" --pid "$B_PID" >"$OUT/agents-b.out" 2>"$OUT/agents-b.log" </dev/null &
PGIDS+=($!)
wait_line "$OUT/agents-b.out" 's/^registered \([0-9]*\) agents.*/\1/p' $! >/dev/null
for ((i = 0; i < 300; i++)); do
    [ "$(rc scard wsgate:node:node-b:agents)" -ge "$AGENTS" ] && break
    sleep 0.1
done
m2=$(used)
echo "mem,A,rss_kib_per_agent,${AG#* }" >>"$RAW"
echo "mem,redis,bytes_per_agent,$(((m1 - m0) / AGENTS))" >>"$RAW"
echo "mem,redis,bytes_per_second_holder,$(((m2 - m1) / AGENTS))" >>"$RAW"
echo "mem,A,idle_cpu_us_per_agent_s,$(python3 -c "print(round((($c3 - $c2) - ($c1 - $c0)) * $TICK_US / $AGENTS / $IDLE_WINDOW, 3))")" >>"$RAW"
read -r ec0 eu0 <<<"${e0:-0 0}"
read -r ec1 eu1 <<<"$e1"
echo "mem,redis,eval_us,$(python3 -c "print(round(($eu1 - $eu0) / max($ec1 - $ec0, 1), 2))")" >>"$RAW"

python3 - "$RAW" "$ROUNDS" "$DURATION" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'EOF' | tee "$OUT/table.md"
import csv, statistics, sys
raw, rounds, duration, cores, loadavg = sys.argv[1:]
v = {}
for row in csv.DictReader(open(raw)):
    v.setdefault((row["path"], row["test"]), []).append(float(row["value"]))
m = lambda p, t: statistics.median(v[(p, t)])
print(f"{rounds} rounds of {duration} s per cell, medians; {cores} cores; load average {loadavg}\n")
print("| | A -> agent | B -> A -> agent | B / A |")
print("|---|---|---|---|")
for t, name, unit in [("throughput", "throughput (64 KiB writes)", "MB/s"), ("opens", "stream opens/s (8 workers)", "/s"),
                      ("p50", "64 B round trip p50", "µs"), ("p99", "64 B round trip p99", "µs"),
                      ("cpu_us_per_open", "CPU per stream open (nodes + agent)", "µs")]:
    a, b = m("A", t), m("B", t)
    print(f"| {name} | {a:.1f} {unit} | {b:.1f} {unit} | {b / a:.2f} |")
print()
print(f"- Redis commands per stream open through B (steady state): {m('B', 'redis_cmds_per_open'):.4f} "
      f"(commands while B opened {m('B', 'remote_opens'):.0f} streams: {m('B', 'redis_cmds_during_opens'):.0f}; "
      f"in an idle window as long: {m('B', 'redis_cmds_idle'):.0f}; commands on agent keys: {m('B', 'agent_key_cmds'):.0f})")
print(f"- Node RSS per idle registered agent: {m('A', 'rss_kib_per_agent'):.1f} KiB; "
      f"node CPU per idle agent connection: {m('A', 'idle_cpu_us_per_agent_s'):.3f} µs/s (keepalive 15 s)")
print(f"- Redis memory per agent id: {m('redis', 'bytes_per_agent'):.0f} bytes held by one node, "
      f"+{m('redis', 'bytes_per_second_holder'):.0f} bytes for a second node; "
      f"{m('redis', 'eval_us'):.1f} µs of Redis time per hold (EVAL)")
EOF
echo "results: $OUT" >&2
