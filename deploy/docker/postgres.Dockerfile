# PostgreSQL from Debian's package, for machines that cannot pull postgres:16-alpine.
# Takes the official image's POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB and data
# directory, so docker-compose.yml is the same with either image.
ARG BASE_IMAGE=edgeorch-base:bookworm
FROM ${BASE_IMAGE}
ENV PGDATA=/var/lib/postgresql/data
RUN mkdir -p "$PGDATA" && chown -R postgres:postgres /var/lib/postgresql && chmod 700 "$PGDATA"
COPY deploy/docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
USER postgres
EXPOSE 5432
ENTRYPOINT ["/bin/sh", "/usr/local/bin/postgres-entrypoint.sh"]
