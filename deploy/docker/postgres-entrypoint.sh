#!/bin/sh
# First start: a cluster whose POSTGRES_USER has POSTGRES_PASSWORD (password auth over
# TCP) and a database POSTGRES_DB. Every start: the server on every interface.
set -eu
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${POSTGRES_DB:?}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    "$PGBIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    "$PGBIN/pg_ctl" -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories=/tmp" start >/dev/null
    "$PGBIN/createdb" -h /tmp -U "$POSTGRES_USER" "$POSTGRES_DB"
    "$PGBIN/pg_ctl" -D "$PGDATA" -w -m fast stop >/dev/null
fi
exec "$PGBIN/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp
