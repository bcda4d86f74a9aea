#!/usr/bin/env bash
# Measured bandwidth and RTT per directed pair of live nodes.
source "$(dirname "$0")/common.sh"
call "$EDGEORCH_MONITOR_URL/v1/links"
