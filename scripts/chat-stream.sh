#!/usr/bin/env bash
# A chat completion streamed as server-sent events, one chunk per token:
# ./chat-stream.sh [MODEL] [PROMPT]
source "$(dirname "$0")/common.sh"
model="${1:-smollm2-135m}" prompt="$(json_str "${2:-Write a haiku about the sea.}")"
# -N: print each event as it arrives instead of buffering.
call -N -X POST "$EDGEORCH_URL/v1/chat/completions" "${KEY[@]}" "${JSON[@]}" \
  -d "{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": $prompt}],
       \"max_tokens\": 48, \"temperature\": 0.7, \"stream\": true}"
