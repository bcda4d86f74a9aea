#!/usr/bin/env bash
# Every deployment.
source "$(dirname "$0")/common.sh"
call "$EDGEORCH_URL/v1/deployments"
