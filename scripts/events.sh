#!/usr/bin/env bash
# The orchestrator's decision log (deploy, keep, remap, re-split, recover, and why):
# ./events.sh [SINCE_ID]
source "$(dirname "$0")/common.sh"
call "$EDGEORCH_URL/v1/events?since=${1:-0}"
