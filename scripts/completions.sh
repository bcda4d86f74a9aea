#!/usr/bin/env bash
# A plain text completion (no chat template): ./completions.sh [MODEL] [PROMPT] [MAX_TOKENS]
source "$(dirname "$0")/common.sh"
model="${1:-smollm2-135m}" prompt="$(json_str "${2:-The capital of France is}")"
call -X POST "$EDGEORCH_URL/v1/completions" "${KEY[@]}" "${JSON[@]}" \
  -d "{\"model\": \"$model\", \"prompt\": $prompt, \"max_tokens\": ${3:-16}, \"temperature\": 0}"
