#!/usr/bin/env bash
# Nodes as the monitor sees them: capacity, calibrated speed for MODEL, live load, state.
# ./monitor-nodes.sh [MODEL]
source "$(dirname "$0")/common.sh"
call "$EDGEORCH_MONITOR_URL/v1/nodes?model=${1:-smollm2-135m}"
