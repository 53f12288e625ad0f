#!/usr/bin/env bash
# `make soak`: builds the filter and the sidecar (release), then runs the soak in
# tests/soak.rs against real Envoy + filter + sidecar on loopback for SOAK_SECONDS
# (default 600) with SOAK_USERS (1000) users at SOAK_RPS (40) requests/s, the sidecar
# SIGKILLed and restarted every SOAK_RESTART_SECS (60). It fails unless the ledger
# reconciles afterwards, and writes its figures into BENCHMARKS.md between the soak markers.
set -euo pipefail
cd "$(dirname "$0")/.."

env ${WASM_PROFILE:-CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1} \
    cargo build --release --target wasm32-wasip1 -p llm-meter-filter
cargo build --release -p llm-meter-sidecar
export LLM_METER_SIDECAR_BIN="$(pwd)/target/release/llm-meter-sidecar"
export SOAK_REPORT="${SOAK_REPORT:-$(pwd)/BENCHMARKS.md}"
echo "soak: ${SOAK_SECONDS:-600} s, ${SOAK_USERS:-1000} users, ${SOAK_RPS:-40} req/s"
cargo test -p llm-meter-e2e --test soak -- --ignored --exact soak_long --nocapture
