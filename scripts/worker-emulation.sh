#!/usr/bin/env bash
# Change a worker's emulated capacity while it runs; the monitor notices and the
# orchestrator may re-plan (see ./events.sh). ./worker-emulation.sh [SLOWDOWN] [BANDWIDTH_MBPS] [RTT_MS]
# e.g. ./worker-emulation.sh 4 20 10; ./worker-emulation.sh 1 to undo. EDGEORCH_WORKER_URL picks the worker.
source "$(dirname "$0")/common.sh"
bandwidth="${2:-null}"
call -X POST "$EDGEORCH_WORKER_URL/v1/admin/emulation" "${ADMIN[@]}" "${JSON[@]}" \
  -d "{\"slowdown\": ${1:-4.0}, \"bandwidth_mbps\": $bandwidth, \"rtt_ms\": ${3:-0}}"
call "$EDGEORCH_WORKER_URL/v1/admin/emulation" "${ADMIN[@]}"
