# ALL-ERP backup image: Airflow 3.3.2 plus our Python requirements and the
# client tools the backup, restore and drill tasks run. See docs/deployment.md.
#
# The -python3.11 variant of the 3.3.2 image: the Python the project is developed
# and tested on. Its base is Debian bookworm. Where no registry can be reached,
# include/scripts/build_images.sh passes AIRFLOW_IMAGE=erp-local/airflow-base:3.3.2,
# a stand-in with the same layout built from Debian packages, and pip's
# PIP_NO_INDEX / PIP_FIND_LINKS (a wheelhouse built on the host) as build args.
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

USER root

# From Debian bookworm, whose PostgreSQL is 15 (the ERP server's major version):
#   postgresql-client-15  pg_dump, pg_dumpall, pg_restore, pg_basebackup, pg_receivewal, psql
#   postgresql-15         initdb, pg_ctl, pg_verifybackup for scratch restores and drills
#                         (create_main_cluster=false: no cluster is created in the image)
#   zstd                  compression CLI
#   etcd-client           etcdctl (snapshot save/status/restore); etcd-server: scratch etcd for restore checks
#   redis-tools           redis-cli (--rdb), redis-check-rdb; redis-server: scratch Redis for restore checks
#   rabbitmq-server       rabbitmqctl, and the scratch node of the local-backend RabbitMQ drill
# If a future base image is not bookworm, postgresql-client-15 comes from the PGDG apt repository instead.
# policy-rc.d keeps the packages' daemons from starting during the build.
RUN set -eux; \
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
    chmod +x /usr/sbin/policy-rc.d; \
    apt-get update; \
    apt-get install -y --no-install-recommends postgresql-common; \
    sed -ri 's/^#?[[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' \
        /etc/postgresql-common/createcluster.conf; \
    if ! apt-cache show postgresql-client-15 >/dev/null 2>&1; then \
        /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y; \
    fi; \
    apt-get install -y --no-install-recommends \
        postgresql-client-15 \
        postgresql-15 \
        zstd \
        etcd-client \
        etcd-server \
        redis-tools \
        redis-server \
        rabbitmq-server; \
    rm -f /usr/sbin/policy-rc.d; \
    apt-get autoremove -yqq --purge; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*; \
    pg_dump --version | grep -q ' 15\.'; \
    pg_basebackup --version | grep -q ' 15\.'; \
    /usr/lib/postgresql/15/bin/initdb --version; \
    zstd --version; \
    etcdctl version; \
    redis-cli --version; \
    command -v redis-check-rdb redis-server etcd rabbitmq-server rabbitmqctl

# Where erp_backup.scratch_pg finds initdb/pg_ctl (they are not on PATH).
ENV ERP_PG_BINDIR=/usr/lib/postgresql/15/bin

USER airflow

# As the Airflow docs recommend: pin apache-airflow to the image's version so pip
# can never up- or downgrade Airflow while resolving requirements.txt.
# requirements.txt also holds the test tools (pytest, moto, hypothesis): some tens of MB,
# accepted so the image can run the test suite against its own tools.
# constraints.txt pins the whole tree, exactly as the tests ran it.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
COPY --chown=airflow:0 requirements.txt constraints.txt /
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /requirements.txt -c /constraints.txt \
    && python -c "import airflow, docker, psycopg, pymilvus, yaml, zstandard; print('airflow', airflow.__version__)"
