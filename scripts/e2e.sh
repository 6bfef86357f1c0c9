#!/usr/bin/env bash
# Runs the end-to-end suite (e2e/, pytest) against a wsgate binary.
#
#   scripts/e2e.sh [PYTEST ARGS...]
#
#   WSGATE_BIN   binary under test (default: target/release/wsgate)
#
# Needs the tools from scripts/install-test-deps.sh. Exits non-zero on any
# failure. Examples:
#   scripts/e2e.sh                       # everything (a few minutes)
#   scripts/e2e.sh -m 'not autobahn'     # skip Autobahn|Testsuite
#   scripts/e2e.sh -m harness            # only the harness self-checks (no wsgate)
#   scripts/e2e.sh -k redis -x           # pick tests by name, stop at the first failure
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
E2E="$ROOT/e2e"

bin="${WSGATE_BIN:-target/release/wsgate}"
case "$bin" in
  /*) ;;
  *) bin="$ROOT/$bin" ;;
esac
export WSGATE_BIN="$bin"

if [ ! -x "$E2E/.venv/bin/pytest" ] || [ ! -d "$E2E/node_modules/ws" ] || [ ! -x "$ROOT/.cache/autobahn/wstest" ]; then
  echo "e2e: test dependencies missing: run scripts/install-test-deps.sh first" >&2
  exit 1
fi
if [ ! -x "$WSGATE_BIN" ]; then
  echo "e2e: warning: $WSGATE_BIN is not an executable; tests that need wsgate will fail" >&2
fi

cd "$E2E"
echo "e2e: running against $WSGATE_BIN" >&2
exec "$E2E/.venv/bin/python" -m pytest "$@"
