#!/bin/sh
# The official image's contract, reduced: initdb on an empty $PGDATA with the password
# from $POSTGRES_PASSWORD (through a 0600 file, never argv), scram for every host, then
# the server as the postgres user. Scripts in /docker-entrypoint-initdb.d run once.
set -eu
if [ "${1:-}" = postgres ] && [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U "${POSTGRES_USER:-postgres}" --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    # As the official image: POSTGRES_DB defaults to POSTGRES_USER, and is created unless it is `postgres`.
    POSTGRES_DB=${POSTGRES_DB:-${POSTGRES_USER:-postgres}}
    if [ "$POSTGRES_DB" != postgres ]; then
        postgres --single -D "$PGDATA" postgres <<SQL >/dev/null
CREATE DATABASE "$POSTGRES_DB";
SQL
    fi
    if ls /docker-entrypoint-initdb.d/* >/dev/null 2>&1; then
        pg_ctl -D "$PGDATA" -w -o "-c listen_addresses=''" start >/dev/null
        for script in /docker-entrypoint-initdb.d/*; do
            case $script in
                *.sql) psql -v ON_ERROR_STOP=1 -U "${POSTGRES_USER:-postgres}" -d "${POSTGRES_DB:-postgres}" -f "$script" ;;
                *.sh) . "$script" ;;
            esac
        done
        pg_ctl -D "$PGDATA" -w -m fast stop >/dev/null
    fi
fi
exec "$@"
