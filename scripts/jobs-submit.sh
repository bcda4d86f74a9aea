#!/usr/bin/env bash
# Queue a batch of completions (a Celery job); prints {"id", "state"}.
# ./jobs-submit.sh [MODEL] [PROMPT ...]   then ./jobs-poll.sh ID
source "$(dirname "$0")/common.sh"
model="${1:-smollm2-135m}"
shift || true
[[ $# -gt 0 ]] || set -- "The capital of France is" "Three primes:" "Once upon a time"
prompts=$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@")
call -X POST "$EDGEORCH_URL/v1/jobs" "${KEY[@]}" "${JSON[@]}" \
  -d "{\"model\": \"$model\", \"prompts\": $prompts, \"max_tokens\": 16, \"temperature\": 0}"
