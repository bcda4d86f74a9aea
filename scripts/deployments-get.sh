#!/usr/bin/env bash
# One deployment: state, plan version, stages, predicted figures, plan history.
# ./deployments-get.sh [NAME]
source "$(dirname "$0")/common.sh"
call "$EDGEORCH_URL/v1/deployments/${1:-smollm2-135m}"
