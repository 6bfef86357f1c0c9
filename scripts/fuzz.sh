#!/usr/bin/env bash
# Runs every fuzz target for a while (default 60 s each) with cargo-fuzz.
#
#   scripts/fuzz.sh [SECONDS]
#
# cargo-fuzz needs nightly-only compiler flags (sanitizers); on a stable
# toolchain RUSTC_BOOTSTRAP=1 enables them. Installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for dir in fuzz crates/wsmux/fuzz; do
  [ -d "$dir" ] || continue
  for target in $(cd "$dir/.." && cargo fuzz list --fuzz-dir "$(basename "$dir")"); do
    echo "==> $dir: $target (${secs}s)"
    (cd "$dir/.." && cargo fuzz run --fuzz-dir "$(basename "$dir")" "$target" -- -max_total_time="$secs")
  done
done
