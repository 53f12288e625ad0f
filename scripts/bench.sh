#!/usr/bin/env bash
# `make bench`: installs the two load/runtime tools the bench needs when missing (wrk from
# Debian, the wasmtime wheel from PyPI), builds everything in release and runs the bench,
# which writes BENCHMARKS.md and target/bench/results.json.
# Extra arguments for target/release/llm-meter-bench come from BENCH_ARGS (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null 2>&1; then
    echo "installing wrk (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q wrk >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }
fi
if ! python3 -c 'import wasmtime' >/dev/null 2>&1; then
    echo "installing wasmtime (pip install wasmtime)"
    python3 -m pip install --quiet wasmtime
fi

start=$(date +%s)
# One cargo invocation per target, so shared dependencies are built once with one feature set.
cargo build --release -p llm-meter-sidecar -p llm-meter-bench
env ${WASM_PROFILE:-CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1} \
    cargo build --release --target wasm32-wasip1 \
    -p llm-meter-filter -p llm-meter-bench-filter -p llm-meter-bench --bin llm-meter-bench-core \
    --lib
echo "bench: built in $(( $(date +%s) - start )) s"

# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
target/release/llm-meter-bench ${BENCH_ARGS:-}
echo "bench: done in $(( $(date +%s) - start )) s (build included)"
