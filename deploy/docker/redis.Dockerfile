# Redis from Debian's package, for machines that cannot pull redis:7-alpine.
# Built FROM the local Debian base (deploy/container.sh); compose then uses it as
# EDGEORCH_REDIS_IMAGE. Cache only: nothing is saved to disk.
ARG BASE_IMAGE=edgeorch-base:bookworm
FROM ${BASE_IMAGE}
USER redis
EXPOSE 6379
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
