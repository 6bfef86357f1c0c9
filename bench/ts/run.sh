#!/usr/bin/env bash
# The TypeScript client's benchmark, one command:
#
#   bench/ts/run.sh [--rounds 5] [--total-mb 64] [--quick] [--json FILE]
#
# Builds clients/ts (npm ci once, then tsc: what is measured is the current
# source), installs the bench-only dependencies into bench/ts/node_modules
# (@chainsafe/libp2p-yamux, ws, bufferutil; never into the package), and
# runs bench.mjs, which prints a Markdown table. See README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pkg="$here/../../clients/ts"

if [ ! -x "$pkg/node_modules/.bin/tsc" ]; then
  (cd "$pkg" && npm ci --no-audit --no-fund --loglevel=error)
fi
(cd "$pkg" && npm run --silent build)

stamp="$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$here/node_modules/.bench-stamp" 2>/dev/null)" != "$stamp" ]; then
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$stamp" > "$here/node_modules/.bench-stamp"
fi

exec node "$here/bench.mjs" "$@"
