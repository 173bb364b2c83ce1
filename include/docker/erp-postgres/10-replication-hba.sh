#!/bin/sh
# docker-entrypoint-initdb.d script of the compose `erp` profile's erp-postgres (runs once, at initdb):
# lets pg_basebackup/pg_receivewal connect from the compose network.
echo "host replication all samenet scram-sha-256" >> "${PGDATA}/pg_hba.conf"
