#!/usr/bin/env bash
# `make run`: start the local estate, then Airflow standalone with this project's DAGs unpaused.
# `make stop` (this script with "stop") stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=$ROOT/.venv/bin/python
source include/scripts/local_env.sh

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
