#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, ledger tests against SQLite, PostgreSQL and
# MariaDB, and the end-to-end suite in a real Envoy. Prefers cargo-nextest when installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi
