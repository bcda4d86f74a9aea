# Sourced by every script here: where the stack listens and how to authenticate.
#   EDGEORCH_URL           the orchestrator (gateway), default http://127.0.0.1:8000
#   EDGEORCH_ADMIN_TOKEN   sent on calls that change the system (deployments, emulation)
#   EDGEORCH_API_KEY       sent on the OpenAI-style and jobs calls when the gateway
#                          requires keys (EDGEORCH_API_KEYS on the orchestrator)
#   EDGEORCH_MONITOR_URL   the monitor, default http://127.0.0.1:8001
#   EDGEORCH_WORKER_URL    one worker, default http://127.0.0.1:8100
# `edgeorch up` prints the exports for the stack it started.
set -euo pipefail

EDGEORCH_URL="${EDGEORCH_URL:-http://127.0.0.1:8000}"
EDGEORCH_MONITOR_URL="${EDGEORCH_MONITOR_URL:-http://127.0.0.1:8001}"
EDGEORCH_WORKER_URL="${EDGEORCH_WORKER_URL:-http://127.0.0.1:8100}"

ADMIN=()
if [[ -n "${EDGEORCH_ADMIN_TOKEN:-}" ]]; then
  ADMIN=(-H "Authorization: Bearer ${EDGEORCH_ADMIN_TOKEN}")
fi
KEY=()
if [[ -n "${EDGEORCH_API_KEY:-}" ]]; then
  KEY=(-H "Authorization: Bearer ${EDGEORCH_API_KEY}")
fi
JSON=(-H "content-type: application/json")

# curl that fails on HTTP errors but still shows the error body, ending with a newline.
call() {
  curl -sS --fail-with-body "$@"
  echo
}

# A JSON string literal for $1 (prompts may hold quotes).
json_str() {
  python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"
}
