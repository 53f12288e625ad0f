#!/usr/bin/env bash
# Property-based test of the sidecar's HTTP API against its own OpenAPI document:
# starts the sidecar binary (SQLite in a temp dir, ephemeral loopback port, random secrets),
# runs schemathesis on every operation with bounded examples, stops the sidecar.
# Fails on any 5xx, any response that breaks the document (schema, status, content type).
#
# Env: SIDECAR_BIN (default target/debug/llm-meter-sidecar, built if missing),
#      SCHEMATHESIS_MAX_EXAMPLES (default 20 per operation), SCHEMATHESIS_SEED (default 1),
#      SCHEMATHESIS_REPORT_DIR (write a JUnit report there; none by default).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${SIDECAR_BIN:-target/debug/llm-meter-sidecar}
MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-20}
SEED=${SCHEMATHESIS_SEED:-1}

if [ ! -x "$BIN" ]; then
    cargo build -p llm-meter-sidecar
fi
if ! command -v schemathesis >/dev/null 2>&1; then
    echo "installing schemathesis (pip)"
    if command -v pip3 >/dev/null 2>&1; then pip3 install --quiet schemathesis
    else python3 -m pip install --quiet schemathesis; fi
    hash -r
fi

work=$(mktemp -d)
pid=""
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

random_hex() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
secret=$(random_hex)
token=$(random_hex)

METER_SHARED_SECRET="$secret" METER_ADMIN_TOKEN="$token" \
    DATABASE_URL="sqlite://$work/ledger.db" METER_LISTEN=127.0.0.1:0 \
    METER_LOG_FORMAT=text RUST_LOG="${RUST_LOG:-warn,llm_meter_sidecar::api::server=info}" \
    "$BIN" serve 2>"$work/sidecar.log" &
pid=$!

addr=""
for _ in $(seq 1 300); do
    addr=$(grep -o 'listen=[0-9.:]*' "$work/sidecar.log" | head -n1 | cut -d= -f2 || true)
    [ -n "$addr" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/sidecar.log" >&2; echo "the sidecar exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$addr" ] || { cat "$work/sidecar.log" >&2; echo "the sidecar did not start" >&2; exit 1; }
echo "schemathesis against the sidecar at $addr ($MAX_EXAMPLES examples per operation, seed $SEED)"

report=()
if [ -n "${SCHEMATHESIS_REPORT_DIR:-}" ]; then
    mkdir -p "$SCHEMATHESIS_REPORT_DIR"
    report=(--report junit --report-dir "$(cd "$SCHEMATHESIS_REPORT_DIR" && pwd)")
fi

status=0
# From the temp dir: schemathesis keeps a cache (.schemathesis/) in its working directory.
cd "$work"
schemathesis run "http://$addr/openapi.json" \
    --header "Authorization: Bearer $token" \
    --header "x-meter-secret: $secret" \
    --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
    --max-examples "$MAX_EXAMPLES" --seed "$SEED" --request-timeout 30 \
    --workers 2 --warnings off ${report[@]+"${report[@]}"} || status=$?

if grep -q ' ERROR ' "$work/sidecar.log"; then
    echo "the sidecar logged errors during the run:" >&2
    grep ' ERROR ' "$work/sidecar.log" | head -n 20 >&2
    status=1
fi
exit "$status"
