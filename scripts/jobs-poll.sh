#!/usr/bin/env bash
# Poll a job until it has succeeded or failed, then print it with its results: ./jobs-poll.sh ID
source "$(dirname "$0")/common.sh"
id="${1:?usage: $0 JOB_ID}"
while true; do
  job=$(call "$EDGEORCH_URL/v1/jobs/$id" "${KEY[@]}")
  if grep -Eq '"state": *"(succeeded|failed)"' <<<"$job"; then
    echo "$job"
    exit 0
  fi
  echo "$job" | grep -Eo '"(state|done|total)": *("[a-z]+"|[0-9]+)' | paste -sd' ' >&2
  sleep 1
done
