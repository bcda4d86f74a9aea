#!/usr/bin/env bash
# The deployments the gateway serves, OpenAI-style.
source "$(dirname "$0")/common.sh"
call "$EDGEORCH_URL/v1/models" "${KEY[@]}"
