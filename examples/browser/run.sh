#!/usr/bin/env bash
# The browser example, one command:
#
#   examples/browser/run.sh [--listen HOST:PORT] [--redis HOST:PORT] [--slow-rate BYTES_PER_S]
#
# 1. builds the wsgate-client package (clients/ts: npm ci once, then tsc
#    whenever a source is newer than its build) and wsgate (cargo build
#    --release, only when target/release/wsgate is missing; $WSGATE_BIN
#    names another binary);
# 2. starts redis-server on a Unix socket in a private temporary directory
#    (no port to clash with), unless --redis names a running one;
# 3. starts the demo's TCP peers (peers.mjs: an echo peer and a slow one);
# 4. serves gateway.toml, with the listener (default 127.0.0.1:8080; port
#    0 picks a free one) and the Redis address filled in, and prints
#    `open http://…` with the peers' addresses in the query string.
#
# Ctrl-C (or SIGTERM) stops the gateway, the peers and redis-server.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
listen="127.0.0.1:8080"
redis=""
slow_rate=$((64 * 1024))

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --listen) listen="${2:?--listen needs HOST:PORT}"; shift 2 ;;
    --redis) redis="${2:?--redis needs HOST:PORT}"; shift 2 ;;
    --slow-rate) slow_rate="${2:?--slow-rate needs a number}"; shift 2 ;;
    -h | --help) usage ;;
    *) echo "run.sh: unknown argument $1" >&2; usage ;;
  esac
done
log() { printf '[browser-example] %s\n' "$*" >&2; }

# ------------------------------------------------------------- 1. builds
pkg="$root/clients/ts"
command -v node >/dev/null || { log "node (>= 20) is needed"; exit 1; }
if [ ! -x "$pkg/node_modules/.bin/tsc" ]; then
  log "clients/ts: npm ci"
  (cd "$pkg" && npm ci --no-audit --no-fund --loglevel=error)
fi
if [ ! -f "$pkg/dist/index.js" ] \
  || [ -n "$(find "$pkg/src" "$pkg/tsconfig.json" "$pkg/package.json" -newer "$pkg/dist/index.js" -print -quit)" ]; then
  log "clients/ts: npm run build"
  (cd "$pkg" && rm -rf dist && npm run --silent build)
fi
bin="${WSGATE_BIN:-$root/target/release/wsgate}"
if [ ! -x "$bin" ]; then
  log "wsgate: cargo build --release -p wsgate"
  (cd "$root" && cargo build --release -p wsgate)
  bin="$root/target/release/wsgate"
fi

# ------------------------------------------------------------ processes
tmp="$(mktemp -d "${TMPDIR:-/tmp}/wsgate-browser-example.XXXXXX")"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Reads one line from file descriptor $1 within $2 seconds into $line.
read_line() {
  if ! IFS= read -r -t "$2" -u "$1" line; then
    return 1
  fi
}

# ----------------------------------------------------------- 2. redis
if [ -n "$redis" ]; then
  redis_peer="tcp://$redis"
else
  command -v redis-server >/dev/null || { log "redis-server is needed (or --redis HOST:PORT)"; exit 1; }
  mkfifo "$tmp/redis.out"
  redis-server --port 0 --unixsocket "$tmp/redis.sock" --unixsocketperm 700 --save "" --appendonly no \
    --dir "$tmp" --daemonize no --loglevel notice >"$tmp/redis.out" 2>&1 &
  pids+=($!)
  exec 5<"$tmp/redis.out"
  # redis-server logs "[Rr]eady to accept connections" once its socket is open (7.0 and 7.2 differ in case).
  ready=""
  while read_line 5 10; do
    case "$line" in *[Rr]"eady to accept connections"*) ready=1; break ;; esac
  done
  [ -n "$ready" ] || { log "redis-server did not start"; exit 1; }
  cat <&5 >"$tmp/redis.log" &
  pids+=($!)
  redis_peer="unix:$tmp/redis.sock"
fi

# ----------------------------------------------------------- 3. peers
mkfifo "$tmp/peers.out"
node "$here/peers.mjs" --slow-rate "$slow_rate" >"$tmp/peers.out" &
pids+=($!)
exec 6<"$tmp/peers.out"
echo_peer="" slow_peer=""
while { [ -z "$echo_peer" ] || [ -z "$slow_peer" ]; } && read_line 6 10; do
  case "$line" in
    "echo "*) echo_peer="${line#echo }" ;;
    "slow "*) slow_peer="${line#slow }" ;;
  esac
done
[ -n "$echo_peer" ] && [ -n "$slow_peer" ] || { log "peers.mjs did not start"; exit 1; }

# ---------------------------------------------------------- 4. wsgate
# The config with the addresses filled in; static directories made absolute
# (they are relative to the config file, which now lives in $tmp).
sed -e "s|^address = \".*\"|address = \"$listen\"|" \
  -e "s|^to = \"tcp://127.0.0.1:6379\"|to = \"$redis_peer\"|" \
  -e "s|^static = \"\\(.*\\)\"|static = \"$here/\\1\"|" \
  "$here/gateway.toml" >"$tmp/gateway.toml"
mkfifo "$tmp/wsgate.out"
"$bin" serve --config "$tmp/gateway.toml" >"$tmp/wsgate.out" &
pids+=($!)
exec 7<"$tmp/wsgate.out"
url=""
while read_line 7 20; do
  case "$line" in "listening on ws://"*) url="http://${line#listening on ws://}"; break ;; esac
done
[ -n "$url" ] || { log "wsgate did not start"; exit 1; }
cat <&7 &
pids+=($!)

enc() { node -e 'process.stdout.write(encodeURIComponent(process.argv[1]))' "$1"; }
log "redis-server: $redis_peer; peers: echo $echo_peer, slow $slow_peer (reads $slow_rate B/s)"
echo "open $url/?echo=$(enc "$echo_peer")&slow=$(enc "$slow_peer")"
log "Ctrl-C stops everything"

# Runs until interrupted, or until one of the processes exits.
set +e
wait -n "${pids[@]}"
status=$?
log "a process exited (status $status): stopping"
exit "$status"
