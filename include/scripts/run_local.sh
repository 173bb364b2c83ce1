#!/usr/bin/env bash
# `make run`: start the local estate, then Airflow standalone with this project's DAGs unpaused.
# `make stop` (this script with "stop") stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=$ROOT/.venv/bin/python
export ERP_ESTATE_DIR=$ROOT/.estate
export AIRFLOW_HOME=$ROOT/.airflow
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
export PATH=$ROOT/.venv/bin:$PATH
set -a; source include/estate/dev.env; set +a
# A local age keypair (.estate/age/identity.txt, made once): backups are sealed for its public key, and the
# drill (same machine here) reads the identity. In production workers get the recipients connection only.
eval "$("$PY" include/scripts/local_keys.py "$ERP_ESTATE_DIR/age")"

stop() {
  if [[ -f $ERP_ESTATE_DIR/airflow.pid ]] && kill -0 "$(cat "$ERP_ESTATE_DIR/airflow.pid")" 2>/dev/null; then
    group=$(cat "$ERP_ESTATE_DIR/airflow.pid")
    kill -TERM -- "-$group" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 -- "-$group" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$group" 2>/dev/null || true
    echo "run: stopped Airflow"
  fi
  rm -f "$ERP_ESTATE_DIR/airflow.pid"
  "$PY" include/scripts/local_estate.py stop
}

if [[ ${1:-} == stop ]]; then stop; exit 0; fi

mkdir -p "$ERP_ESTATE_DIR" "$AIRFLOW_HOME"
"$PY" include/scripts/local_estate.py start
if [[ -f $ERP_ESTATE_DIR/airflow.pid ]] && kill -0 "$(cat "$ERP_ESTATE_DIR/airflow.pid")" 2>/dev/null; then
  echo "run: Airflow already running"
else
  started=$(date +%s)
  setsid "$ROOT/.venv/bin/airflow" standalone >"$ERP_ESTATE_DIR/airflow.log" 2>&1 &
  echo $! >"$ERP_ESTATE_DIR/airflow.pid"
  echo "run: waiting for the Airflow UI (log: $ERP_ESTATE_DIR/airflow.log)"
  for _ in $(seq 240); do
    curl -fsS http://127.0.0.1:8080/api/v2/monitor/health >/dev/null 2>&1 && break
    kill -0 "$(cat "$ERP_ESTATE_DIR/airflow.pid")" 2>/dev/null || { tail -n 40 "$ERP_ESTATE_DIR/airflow.log"; exit 1; }
    sleep 1
  done
  echo "run: UI up after $(( $(date +%s) - started )) s"
fi
password=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['admin'])" \
  "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated" 2>/dev/null || echo "(see $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)")
cat <<MSG

  Airflow UI:  http://localhost:8080
  Login:       admin / $password
  Backups:     $ERP_BACKUP_ROOT
  Alerts:      $ERP_ESTATE_DIR/slack.jsonl
  Stop:        make stop

MSG
