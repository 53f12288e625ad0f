#!/usr/bin/env bash
# `make run`: start the sidecar on SQLite (./data/), the upstream (a real provider when
# UPSTREAM_URL is set, else the labelled demo upstream) and Envoy with the filter, print
# where everything listens and an example, and stop everything on Ctrl-C.
#
# Environment:
#   UPSTREAM_URL           e.g. https://dashscope.aliyuncs.com/compatible-mode or https://api.openai.com
#                          (the caller's own Authorization header is passed through unchanged)
#   UPSTREAM_PROVIDER      provider code to bill under (default: openai)
#   METER_SHARED_SECRET    filter<->sidecar secret (default: a demo value; set your own)
#   METER_ADMIN_TOKEN      admin API bearer token (default: a demo value; set your own)
#   DATABASE_URL           ledger database (default: sqlite://./data/ledger.db)
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=.run
mkdir -p "$RUN_DIR" data
export METER_SHARED_SECRET=${METER_SHARED_SECRET:-demo-shared-secret}
export METER_ADMIN_TOKEN=${METER_ADMIN_TOKEN:-demo-admin-token}
export DATABASE_URL=${DATABASE_URL:-sqlite://./data/ledger.db?mode=rwc}
export METER_LISTEN=${METER_LISTEN:-127.0.0.1:8081}
SIDECAR=target/release/llm-meter-sidecar
DEMO=target/release/llm-meter-demo-upstream

pids=()
cleanup() {
    trap - INT TERM EXIT
    echo
    echo "stopping..."
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "stopped."
    exit 0
}
trap cleanup INT TERM EXIT

wait_http() {
    local url=$1 what=$2
    for _ in $(seq 1 100); do
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "$what did not become ready ($url); see $RUN_DIR/*.log" >&2
    exit 1
}

"$SIDECAR" migrate
"$SIDECAR" seed-demo
"$SIDECAR" serve >"$RUN_DIR/sidecar.log" 2>&1 &
pids+=($!)
wait_http "http://$METER_LISTEN/readyz" "the sidecar"

python3 scripts/render_envoy.py envoy/envoy.yaml "$RUN_DIR/envoy.yaml"
if [[ -z "${UPSTREAM_URL:-}" ]]; then
    "$DEMO" >"$RUN_DIR/demo-upstream.log" 2>&1 &
    pids+=($!)
    upstream="DEMO upstream at http://127.0.0.1:8090 (OpenAI-compatible, not a real model)"
else
    upstream="$UPSTREAM_URL"
fi
envoy -c "$RUN_DIR/envoy.yaml" --disable-hot-restart -l warning --log-path "$RUN_DIR/envoy.log" &
pids+=($!)
wait_http "http://127.0.0.1:9901/ready" "Envoy"

cat <<EOF

llm-meter is running.
  proxy (Envoy + filter):  http://127.0.0.1:10000      upstream: $upstream
  admin API (sidecar):     http://$METER_LISTEN/admin/v1   (Authorization: Bearer $METER_ADMIN_TOKEN)
  OpenAPI:                 http://$METER_LISTEN/openapi.json
  Envoy admin / stats:     http://127.0.0.1:9901/stats?filter=wasmcustom.llm_meter
  logs:                    $RUN_DIR/

Try it (a streamed call metered for demo-user, then the quota going down):
  curl -N http://127.0.0.1:10000/v1/chat/completions -H 'x-user-id: demo-user' \\
       -H 'content-type: application/json' \\
       -d '{"model":"demo-model","stream":true,"messages":[{"role":"user","content":"Hello!"}]}'
  curl -s -H 'Authorization: Bearer $METER_ADMIN_TOKEN' http://$METER_LISTEN/admin/v1/users/demo-user/quotas

Ctrl-C stops everything.
EOF
wait -n "${pids[@]}" || true
echo "a process exited; see $RUN_DIR/*.log" >&2
