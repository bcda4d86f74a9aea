#!/usr/bin/env bash
# The compose stack on this machine: `deploy/container.sh up|down|image|base`.
#
#   base   the base image: python:3.11-slim when a registry answers, else a Debian
#          bookworm image made from Debian's packages (mmdebstrap + docker import,
#          once; it carries python3, redis-server and postgresql), plus local Redis
#          and PostgreSQL images built FROM it (deploy/docker/).
#   image  stage .container/ (this machine's CA bundle and pip settings, read here at
#          build time so no hostname is committed; the CPU torch wheel when on disk)
#          and build edgeorch:latest with the chosen base.
#   up     image, secrets into .env when absent, `docker-compose up -d --wait`-like
#          start, and a ready smollm2-135m deployment (the deploy service).
#          `up --tls`: the same with mutual TLS everywhere (docker-compose.tls.yml): a CA
#          and a certificate per service and node into .tls/ when absent, and
#          COMPOSE_FILE in .env so that later docker-compose calls see the override.
#   down   remove the stack's containers and networks (the database volume too).
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE=${COMPOSE:-docker-compose}
WHEELS=${WHEELS:-/opt/wheels}
LOCAL_BASE=edgeorch-base:bookworm
NICE=(nice -n 10)

say() { echo "container: $*" >&2; }

# Who gets a certificate under `up --tls`: every edgeorch container, and `client` for the host.
TLS_NAMES=orchestrator,monitor,splitter,broadcast,jobs-worker,worker-a,worker-b,worker-c,deploy,client

choose_base() {
    # The slim image when present or pullable; else the local Debian base, made once.
    if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
        echo "BASE=python:3.11-slim REDIS=redis:7-alpine POSTGRES=postgres:16-alpine"
        return
    fi
    if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        say "no public registry answers: making $LOCAL_BASE from Debian packages (mmdebstrap, ~3 min)"
        command -v mmdebstrap >/dev/null || { say "mmdebstrap missing: apt-get install mmdebstrap"; exit 1; }
        local tar
        tar=$(mktemp -d)/base.tar
        # dpkg without an fsync per file (the result is a tarball: a crash only means a
        # rerun) and without manuals, docs and translations: less to write on a busy disk.
        "${NICE[@]}" mmdebstrap --quiet --variant=apt \
            --dpkgopt=force-unsafe-io \
            --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' \
            --include=python3,python3-venv,python3-pip,ca-certificates,redis-server,postgresql \
            bookworm "$tar"
        docker import "$tar" "$LOCAL_BASE" >/dev/null
        rm -rf "$(dirname "$tar")"
    fi
    for store in redis postgres; do
        "${NICE[@]}" docker build -q --build-arg BASE_IMAGE="$LOCAL_BASE" \
            -f "deploy/docker/$store.Dockerfile" -t "edgeorch-$store:local" . >/dev/null
    done
    echo "BASE=$LOCAL_BASE REDIS=edgeorch-redis:local POSTGRES=edgeorch-postgres:local"
}

pip_setting() {
    # One key of this machine's pip configuration (environment first, then pip's files).
    local env_name=$1 key=$2 value=${!1:-}
    if [ -z "$value" ]; then
        value=$(python3 -m pip config get "global.$key" 2>/dev/null || true)
    fi
    echo "$value"
}

stage_context() {
    # .container/ is the only machine-specific part of the build context (git-ignored).
    rm -rf .container && mkdir -p .container/wheels
    local cert
    cert=$(pip_setting PIP_CERT cert)
    cert=${cert:-/etc/ssl/certs/ca-certificates.crt}
    cp "$cert" .container/ca.crt
    {
        echo "[global]"
        echo "cert = /opt/edgeorch-build/ca.crt"
        local index extra
        index=$(pip_setting PIP_INDEX_URL index-url)
        extra=$(pip_setting PIP_EXTRA_INDEX_URL extra-index-url)
        # file:// indexes are this machine's own directories: not there inside the build.
        index=$(tr ' ' '\n' <<<"$index" | grep -v '^file:' | xargs || true)
        extra=$(tr ' ' '\n' <<<"$extra" | grep -v '^file:' | xargs || true)
        [ -n "$index" ] && echo "index-url = $index"
        [ -n "$extra" ] && echo "extra-index-url = $extra"
        [ -n "$(pip_setting PIP_DEFAULT_TIMEOUT timeout)" ] && echo "timeout = $(pip_setting PIP_DEFAULT_TIMEOUT timeout)"
        true
    } > .container/pip.conf
    # Only the CPU torch wheel the image needs, never a whole wheel directory.
    if compgen -G "$WHEELS/torch-2.13.0+cpu-cp311-*.whl" >/dev/null; then
        cp -p "$WHEELS"/torch-2.13.0+cpu-cp311-*.whl .container/wheels/
    fi
}

build_image() {
    local base=$1
    stage_context
    say "building edgeorch:latest FROM $base"
    # Host networking for RUN steps: pip reaches the index as this machine does,
    # whatever the engine's own bridge and firewall settings.
    "${NICE[@]}" docker build --network host --build-arg BASE_IMAGE="$base" -t edgeorch:latest .
}

write_env() {
    # Secrets once, into .env (git- and docker-ignored); image choices and the compose
    # files (the TLS override or not) every time.
    local base=$1 redis=$2 postgres=$3 tls=$4
    touch .env && chmod 600 .env
    for key in EDGEORCH_ADMIN_TOKEN EDGEORCH_ROLLOUT_SECRET EDGEORCH_POSTGRES_PASSWORD; do
        grep -q "^$key=" .env || echo "$key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" >> .env
    done
    sed -i '/^EDGEORCH_\(BASE\|REDIS\|POSTGRES\)_IMAGE=/d; /^COMPOSE_FILE=/d' .env
    printf 'EDGEORCH_BASE_IMAGE=%s\nEDGEORCH_REDIS_IMAGE=%s\nEDGEORCH_POSTGRES_IMAGE=%s\n' \
        "$base" "$redis" "$postgres" >> .env
    if [ "$tls" = 1 ]; then echo "COMPOSE_FILE=docker-compose.yml:docker-compose.tls.yml" >> .env; fi
}

make_certs() {
    # `edgeorch certs init` run in the image (the host needs no Python packages). The
    # services run as uid 10001 and must read their own key (0600); the CA's key and the
    # host's client key stay with the user who ran this. Kept when complete: a rerun
    # does not rotate certificates under a running stack.
    local missing="" n
    for n in ca ${TLS_NAMES//,/ }; do
        [ -f ".tls/$n.pem" ] && [ -f ".tls/$n.key" ] || missing="$missing $n"
    done
    [ -z "$missing" ] && return
    say "certificates into .tls/ (missing:$missing)"
    mkdir -p .tls && chmod 755 .tls
    docker run --rm --user 0 --network none -v "$PWD/.tls:/tls" --entrypoint sh edgeorch:latest -c "
        edgeorch certs init /tls --names $TLS_NAMES >/dev/null &&
        chown $(id -u):$(id -g) /tls/* && chmod 0644 /tls/*.pem && chmod 0600 /tls/*.key &&
        for n in ${TLS_NAMES//,/ }; do [ \$n = client ] || chown 10001:10001 /tls/\$n.key; done"
}

wait_deploy() {
    # The deploy service exits 0 once smollm2-135m is ready; its exit code is the verdict.
    local cid code
    cid=$($COMPOSE ps -q deploy)
    code=$(docker wait "$cid")
    if [ "$code" != 0 ]; then
        $COMPOSE logs --tail 80 >&2
        say "the deploy step failed (exit $code); logs above"
        exit 1
    fi
    if grep -q '^COMPOSE_FILE=.*tls' .env 2>/dev/null; then
        say "ready: smollm2-135m answers on https://127.0.0.1:${EDGEORCH_GATEWAY_PORT:-8000}/v1 to a client" \
            "certificate (.tls/client.pem, .tls/client.key, CA .tls/ca.pem; token in .env)"
    else
        say "ready: smollm2-135m answers on http://127.0.0.1:${EDGEORCH_GATEWAY_PORT:-8000}/v1 (token in .env)"
    fi
}

cmd=${1:-}
case "$cmd" in
    base) choose_base ;;
    image)
        eval "$(choose_base)"
        build_image "$BASE" ;;
    up)
        tls=0
        case "${2:-}" in
            --tls) tls=1 ;;
            "") ;;
            *) echo "usage: $0 up [--tls]" >&2; exit 2 ;;
        esac
        eval "$(choose_base)"
        build_image "$BASE"
        if [ "$tls" = 1 ]; then make_certs; fi
        write_env "$BASE" "$REDIS" "$POSTGRES" "$tls"
        $COMPOSE up -d
        wait_deploy ;;
    down) $COMPOSE down --volumes --remove-orphans ;;
    *) echo "usage: $0 base|image|up [--tls]|down" >&2; exit 2 ;;
esac
