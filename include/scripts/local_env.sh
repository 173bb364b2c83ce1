# The local estate's environment, for `make run` (run_local.sh) and `make shell` (shell.sh). Source it with ROOT set
# to the checkout. ERP_ESTATE_DIR and AIRFLOW_HOME may be preset (the tests point them at a temporary directory).
export ERP_ESTATE_DIR=${ERP_ESTATE_DIR:-$ROOT/.estate}
export AIRFLOW_HOME=${AIRFLOW_HOME:-$ROOT/.airflow}
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$ROOT/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=30
export AIRFLOW__API__BASE_URL=${AIRFLOW__API__BASE_URL:-http://localhost:8080}
export ERP_BACKUP_ROOT=$ERP_ESTATE_DIR/backup
export ERP_SCRATCH_ROOT=$ERP_ESTATE_DIR/scratch
export ERP_WAL_ARCHIVE_DIR=$ERP_ESTATE_DIR/wal_archive
# Offsite is a NAS-style directory here: it survives `make stop` (moto's S3 keeps nothing on disk).
export ERP_OFFSITE_KIND=filesystem
export ERP_OFFSITE_PATH=$ERP_ESTATE_DIR/offsite-nas
export ERP_BACKUP_DISABLE=gitlab   # no GitLab can run on this machine (README)
export PYTHONPATH=$ROOT/plugins:$ROOT/include/estate${PYTHONPATH:+:$PYTHONPATH}
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS=airflow_sqlite.CONNECT_ARGS
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC=airflow_sqlite.CONNECT_ARGS
export PATH=$ROOT/include/scripts:$ROOT/.venv/bin:$PATH
set -a; source "$ROOT/include/estate/dev.env"; set +a
# A local age keypair ($ERP_ESTATE_DIR/age/identity.txt, made once): backups are sealed for its public key, and the
# drill (same machine here) reads the identity. In production workers get the recipients connection only.
eval "$("$ROOT/.venv/bin/python" "$ROOT/include/scripts/local_keys.py" "$ERP_ESTATE_DIR/age")"
