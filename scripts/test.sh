#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, ledger tests against SQLite, PostgreSQL and
# MariaDB, and the end-to-end suite in a real Envoy (prefers cargo-nextest when installed);
# then the filter's pure-logic tests again, compiled to wasm32-wasip1 and run under wasmtime.
set -euo pipefail
cd "$(dirname "$0")/.."

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi

echo "filter core tests inside wasm (wasm32-wasip1 under wasmtime):"
CARGO_TARGET_WASM32_WASIP1_RUNNER="python3 $(pwd)/scripts/wasi-run.py" \
    cargo test --target wasm32-wasip1 -p llm-meter-filter --lib

echo "sidecar API against its own OpenAPI document (schemathesis):"
bash scripts/schemathesis.sh

echo "formatting and lints (cargo fmt --check, clippy -D warnings, native and wasm32):"
make --no-print-directory lint
