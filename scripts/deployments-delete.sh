#!/usr/bin/env bash
# Remove a deployment (its stages are released on the workers): ./deployments-delete.sh NAME
source "$(dirname "$0")/common.sh"
call -X DELETE "$EDGEORCH_URL/v1/deployments/${1:?usage: $0 NAME}" "${ADMIN[@]}"
