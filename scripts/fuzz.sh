#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a while (default 60 s
# each) with cargo-fuzz.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   scripts/fuzz.sh 600 deflate         # one target, 10 minutes
#
# Each run ends with libFuzzer's final stats (executions, peak RSS); new
# inputs go to fuzz/corpus/TARGET, a crash to fuzz/artifacts/TARGET. Set
# CARGO_TARGET_DIR to build elsewhere than fuzz/target.
#
# cargo-fuzz needs nightly-only compiler flags (sanitizers); on a stable
# toolchain RUSTC_BOOTSTRAP=1 enables them. Installs cargo-fuzz if missing.
#
# Without cargo-fuzz (no sanitizer, the same coverage instrumentation), one
# target, e.g. mux_connection:
#   cd fuzz && RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
#     -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
#     -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
#     cargo +nightly build --release --bin mux_connection --target-dir target/cov --target x86_64-unknown-linux-gnu
#   mkdir -p corpus/mux_connection
#   target/cov/x86_64-unknown-linux-gnu/release/mux_connection corpus/mux_connection -max_total_time=60
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs="${1:-60}"
shift $(($# > 0 ? 1 : 0))
case "$secs" in
  ''|*[!0-9]*) echo "fuzz.sh: SECONDS must be a number, not '$secs'" >&2; exit 2 ;;
esac
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
# One fuzz crate for the workspace: the parsers' targets and wsmux's (mux_*).
all="$(cargo fuzz list)"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  read -r -a targets <<<"$(echo $all)"
fi
for target in "${targets[@]}"; do
  if ! grep -qx -- "$target" <<<"$all"; then
    echo "fuzz.sh: no target '$target'; there are: $(echo $all)" >&2
    exit 2
  fi
done
for target in "${targets[@]}"; do
  echo "==> $target (${secs}s)"
  cargo fuzz run "$target" -- -max_total_time="$secs" -print_final_stats=1
done
