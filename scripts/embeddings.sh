#!/usr/bin/env bash
# Sentence embeddings from an encoder: deploys minilm-l6 as "minilm" if it is not there yet,
# waits until it is ready, then embeds two inputs. ./embeddings.sh [TEXT]
source "$(dirname "$0")/common.sh"
text="$(json_str "${1:-edge inference}")"
status=$(curl -sS -o /dev/null -w '%{http_code}' "$EDGEORCH_URL/v1/deployments/minilm")
if [[ "$status" == 404 ]]; then
  call -X POST "$EDGEORCH_URL/v1/deployments" "${ADMIN[@]}" "${JSON[@]}" \
    -d '{"name": "minilm", "model": "minilm-l6", "policy": {"objective": "latency"}}' >/dev/null
fi
for _ in $(seq 120); do
  curl -sS "$EDGEORCH_URL/v1/deployments/minilm" | grep -q '"state": *"ready"' && break
  sleep 1
done
call -X POST "$EDGEORCH_URL/v1/embeddings" "${KEY[@]}" "${JSON[@]}" \
  -d "{\"model\": \"minilm\", \"input\": [$text, \"a second sentence\"]}"
