#!/usr/bin/env bash
# A chat completion, answered in one piece: ./chat.sh [MODEL] [PROMPT]
source "$(dirname "$0")/common.sh"
model="${1:-smollm2-135m}" prompt="$(json_str "${2:-What is the capital of France?}")"
call -X POST "$EDGEORCH_URL/v1/chat/completions" "${KEY[@]}" "${JSON[@]}" \
  -d "{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": $prompt}],
       \"max_tokens\": 32, \"temperature\": 0}"
