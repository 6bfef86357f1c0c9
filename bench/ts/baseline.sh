#!/usr/bin/env bash
# Builds clients/ts as of a commit into a folder of its own, for the
# "wsmux baseline" contender: the two builds then run in the same rounds,
# under the same load.
#
#   dist=$(bench/ts/baseline.sh main)        # prints the built dist/ folder
#   WSMUX_BASELINE=$dist bench/ts/run.sh --cells bulk100,bulk10 --rounds 15
#
# The folder is /tmp/wsgate-client-baseline-<commit>; the package's own
# node_modules (TypeScript) does the build.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
rev="$(git -C "$repo" rev-parse --short "${1:?usage: baseline.sh COMMIT}")"
out="${TMPDIR:-/tmp}/wsgate-client-baseline-$rev"
pkg="$repo/clients/ts"
if [ ! -x "$pkg/node_modules/.bin/tsc" ]; then
  (cd "$pkg" && npm ci --no-audit --no-fund --loglevel=error) >&2
fi
if [ ! -f "$out/clients/ts/dist/index.js" ]; then
  rm -rf "$out"
  mkdir -p "$out"
  git -C "$repo" archive "$rev" clients/ts/src clients/ts/tsconfig.json clients/ts/package.json | tar -x -C "$out"
  ln -s "$pkg/node_modules" "$out/clients/ts/node_modules"
  (cd "$out/clients/ts" && ./node_modules/.bin/tsc -p tsconfig.json) >&2
fi
echo "$out/clients/ts/dist"
