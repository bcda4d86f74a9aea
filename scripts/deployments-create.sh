#!/usr/bin/env bash
# Create a deployment: ./deployments-create.sh [NAME] [MODEL] [OBJECTIVE]
# (defaults: smollm2-135m smollm2-135m latency; objectives: latency, throughput, energy)
source "$(dirname "$0")/common.sh"
name="${1:-smollm2-135m}" model="${2:-$name}" objective="${3:-latency}"
call -X POST "$EDGEORCH_URL/v1/deployments" "${ADMIN[@]}" "${JSON[@]}" \
  -d "{\"name\": \"$name\", \"model\": \"$model\", \"policy\": {\"objective\": \"$objective\"}}"
