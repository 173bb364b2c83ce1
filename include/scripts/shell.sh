#!/usr/bin/env bash
# `make shell`: a shell with the local estate's environment (include/scripts/local_env.sh), where `airflow ...`,
# `erp-restore ...` and `python -m erp_backup ...` reach what `make run` started. With arguments, runs them instead.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export ROOT
source "$ROOT/include/scripts/local_env.sh"
if [[ $# -gt 0 ]]; then exec "$@"; fi
[[ -f $AIRFLOW_HOME/airflow.db ]] || echo "shell: no Airflow database in $AIRFLOW_HOME yet; run \`make run\` once first"
echo "shell: local estate environment (ERP_BACKUP_ROOT=$ERP_BACKUP_ROOT, AIRFLOW_HOME=$AIRFLOW_HOME); exit to leave"
exec bash --rcfile <(printf '%s\n' '[[ -f ~/.bashrc ]] && source ~/.bashrc' \
  "source '$ROOT/include/scripts/local_env.sh'" 'PS1="(erp-local) $PS1"') -i
