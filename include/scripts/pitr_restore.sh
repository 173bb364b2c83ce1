#!/bin/sh
# pitr_restore.sh: runbook wrapper. Restore PostgreSQL as it was at a point in time
# into a new scratch cluster (left running), from the base backups and WAL sets
# under the backup root plus the local WAL archive. See docs/pitr.md.
#
#   pitr_restore.sh --target-time 2026-11-26T10:15:00+09:00 --dry-run   # which base and WAL
#   pitr_restore.sh --target-time 2026-11-26T10:15:00+09:00             # restore, print the report
#   pitr_restore.sh coverage                                             # what targets are possible
#
# Options: --root DIR, --archive-dir DIR, --no-local-archive, --timeout SECONDS, --stop.
# Env: ERP_PYTHON (interpreter; default .venv/bin/python, else python3), ERP_BACKUP_ROOT, ERP_BACKUP_PLAN.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${ERP_PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$repo/plugins${PYTHONPATH:+:$PYTHONPATH}"

command=restore
if [ "${1:-}" = coverage ] || [ "${1:-}" = restore ]; then
    command=$1
    shift
fi
exec "$python" -m erp_backup.services.postgres.pitr_cli "$command" "$@"
