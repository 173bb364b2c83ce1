"""# backup_watchdog

## Purpose
Every hour, check that each enabled backup job of `include/backup_plan.yaml` has a
complete, offsite-verified set that is fresh enough, and post to Slack when one is not.
It catches what task failure callbacks miss: killed workers (no callback on SIGKILL
or OOM), a paused backup DAG, a scheduler outage, an unreachable offsite store.

| | |
|---|---|
| Owner | ops-backup |
| Schedule | `0 * * * *` (hourly, plan timezone) |
| Reads | staging `$BACKUP_ROOT/<service>/<type>/`, the offsite store's manifests |
| Writes | only the alert state `$BACKUP_ROOT/watchdog/state.json` |
| Alerts | Slack connection `alerts.slack_conn_id` of the plan |

## Tasks
1. `check_freshness`: for each job, the newest set in state OFFSITE whose manifest the
   offsite store holds; breach when it is older than the service's RPO, or when the
   run due after it (next cron fire + its capture time + 1 h grace) has not produced
   a newer one. Also counts incomplete and corrupt sets, and offsite sets whose manifest
   disagrees with its upload record (suspect). Logs a table and returns it as XCom (one
   dict per job, one for the offsite store, and one for the plan while a service block of
   it is broken: that service's DAGs are not loaded, so this row is what alerts).
2. `alert`: posts a breach once, a new kind of problem once, and a recovery once.

Rules in detail: `plugins/erp_backup/watchdog.py`.

## Idempotency
This job is idempotent. It never changes a backup. It always checks the present
(wall clock), whatever the run's logical date; the state file makes a rerun, or
two runs in the same hour, announce nothing twice.

## Rerun and backfill
- Rerun: clear the run; it re-checks now. A message that failed to send is retried
  by the next run.
- Backfill is pointless (a past hour cannot be re-checked), so catchup is off.
- To announce everything again, delete `$BACKUP_ROOT/watchdog/state.json`.
"""

from __future__ import annotations

from airflow.sdk import CronTriggerTimetable, dag, task

from erp_backup import watchdog
from erp_backup.factory import START_DATE, default_args
from erp_backup.plan import load_plan

DAG_ID = "backup_watchdog"
PLAN = load_plan()


@dag(
    dag_id=DAG_ID,
    schedule=CronTriggerTimetable("0 * * * *", timezone=PLAN.timezone),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    tags=["backup", "watchdog"],
    doc_md=__doc__,
    default_args=default_args(PLAN),
)
def backup_watchdog():
    @task(task_id="check_freshness")
    def check_freshness() -> list[dict]:
        return watchdog.run_check()

    @task(task_id="alert")
    def alert(rows: list[dict]) -> list[dict]:
        return watchdog.run_alerts(rows)

    alert(check_freshness())  # type: ignore[arg-type]  # TaskFlow: an XComArg at parse time


backup_watchdog()
