"""The DAG factory: one DAG per enabled (service, backup type) of the plan.

Every DAG has the same four tasks: backup → checksum → offsite_upload → retention_prune.
Each runs `guarded`: a fault no retry can fix fails it at once (erp_backup.fail_fast), and a
killed task process still gets its Slack alert (erp_backup.kill_alert).
Nothing here touches a connection, variable or network: it runs at parse time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, CronTriggerTimetable, Param, get_current_context, task

from erp_backup.notify import failure_notifier
from erp_backup.plan import BackupJob, Plan
from erp_backup.runs import RunInfo

OWNER = "ops-backup"
START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")
BACKUP_QUEUE = "backup"  # served only by the worker that takes backups (docs/deployment.md)
DRILL_QUEUE = "drill"  # served only by the worker that holds the age identity (docs/deployment.md)
TASK_IDS = ("backup", "checksum", "offsite_upload", "retention_prune")


def backup_asset(job: BackupJob) -> Asset:
    """The Asset that each successful offsite upload of this job updates.

    An `x-` scheme: Airflow then skips loading every provider's URI handlers at parse time.
    """
    return Asset(name=job.dag_id, uri=f"x-erp-backup://{job.service}/{job.backup_type}", group="backup")


def default_args(plan: Plan, queue: str = BACKUP_QUEUE) -> dict[str, Any]:
    """Every task's defaults; `queue` picks the Celery worker (ignored by the local executors)."""
    return {
        "owner": OWNER,
        "queue": queue,
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
        "on_failure_callback": failure_notifier(plan.slack_conn_id),
    }


@contextmanager
def guarded(slack_conn_id: str) -> Iterator[None]:
    """The body of every backup task: killed processes are alerted, unfixable faults are not retried."""
    from erp_backup.fail_fast import failing_fast
    from erp_backup.kill_alert import armed

    with armed(slack_conn_id), failing_fast():
        yield


def _fmt(delta: timedelta | None) -> str:
    if delta is None:
        return "none (start == end)"
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:g} days" if hours >= 24 and hours % 24 == 0 else f"{hours:g} h"


def render_doc(job: BackupJob, plan: Plan) -> str:
    offsite = f"s3://{plan.offsite.bucket}/{plan.offsite.prefix}" if plan.offsite.kind == "s3" else plan.offsite.path
    return f"""# {job.dag_id}

## Purpose
Back up **{job.service}** ({job.backup_type}, method `{job.method}`) into
`$BACKUP_ROOT/{job.service}/{job.backup_type}/<backup_id>/`, verify every file's SHA-256,
upload it offsite to `{offsite}`, and prune sets past retention.

| | |
|---|---|
| Owner | {OWNER} |
| Schedule | `{job.schedule}` ({job.timezone}) |
| Data window | {_fmt(job.interval)} |
| Retention | {job.retention.days} days (the newest verified set is always kept) |
| RPO / RTO | {_fmt(job.rpo)} / {_fmt(job.rto)} |
| Connections | {", ".join(f"`{cid}` ({role})" for role, cid in sorted(job.connections.items()))} |
| Alerts | Slack connection `{plan.slack_conn_id}` on any task failure |

## Tasks
1. `backup`: write the data files, hashing while streaming; the manifest is written last.
2. `checksum`: re-read every file against the manifest, run service checks, write `SHA256SUMS`.
3. `offsite_upload`: upload (manifest last), verify every object's size and checksum.
4. `retention_prune`: delete sets past retention on staging and offsite, logging every reason.
   Trigger with `prune_dry_run=true` to only log the decisions.

## Idempotency
This job is idempotent. The backup id is the run's logical date (or `run_after` for a
manual run) in UTC, never the wall clock. A rerun of the same run reuses a complete set,
skips offsite objects already present with the same checksum, and re-prunes harmlessly.
A set without a manifest is incomplete: it is never counted or restored, and the next
run removes it.

## Rerun and backfill
- Rerun: clear the failed task (and downstream) in the UI; a corrupt set is taken again.
- Backfill: `airflow backfill create --dag-id {job.dag_id} --from-date 2026-01-01 --to-date 2026-01-03`
  (add `--reprocess-behavior completed` to redo finished runs; offsite gets no duplicates).
  {_backfill_effect(job)}
- A backfill runs one window at a time, whatever its `--max-active-runs`: every task has
  `max_active_tis_per_dag=1` (backfill runs do not obey the DAG's `max_active_runs`), so
  no two windows write or prune this job's staging at once; the job's lock
  (`$BACKUP_ROOT/.locks/{job.service}.{job.backup_type}.lock`) also stops a second deployment sharing the root.
"""


def _backfill_effect(job: BackupJob) -> str:
    """What a backfilled run of this job's type does, for its DAG doc."""
    if job.interval:
        return (f"What a backfill does here: each run ships the data of its own window (the {_fmt(job.interval)} "
                "before its slot) from what the source still holds for it;\n  a window whose data is gone fails with "
                "the gap named, rather than shipping an empty set.")
    return ("What a backfill does here: each run captures the source as it is now (a snapshot cannot be taken in "
            "the past)\n  and files it under the past slot's id. Its manifest records the real capture time: the "
            "watchdog and the drill\n  order sets by it, and `erp-restore list` and the Backups page show the slot "
            "and the capture time.")


def _job_now(job: BackupJob) -> tuple[Plan, BackupJob]:
    """The plan as it is when a task runs (not when the DAG was parsed), and this job in it."""
    from erp_backup.plan import load_plan

    current = load_plan()
    return current, current.job(job.service, job.backup_type)


def build_backup_dag(job: BackupJob, plan: Plan) -> DAG:
    """The DAG for one job of the plan."""
    from erp_backup import steps  # light: no provider or service imports at module level

    asset = backup_asset(job)

    with DAG(
        dag_id=job.dag_id,
        description=f"{job.service} {job.backup_type} backup ({job.method}), keep {job.retention.days} d",
        schedule=CronTriggerTimetable(job.schedule, timezone=job.timezone, interval=job.interval or timedelta(0)),
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=["backup", f"service:{job.service}", f"type:{job.backup_type}"],
        doc_md=render_doc(job, plan),
        default_args={**default_args(plan), "max_active_tis_per_dag": 1},  # one window at a time, backfills too
        params={"prune_dry_run": Param(False, type="boolean", description="Only log what retention would delete.")},
    ) as dag:

        @task(task_id="backup")
        def backup_task() -> str:
            with guarded(plan.slack_conn_id):
                return steps.backup(*_job_now(job), RunInfo.from_context(get_current_context()))

        @task(task_id="checksum")
        def checksum_task(backup_id: str) -> dict:
            with guarded(plan.slack_conn_id):
                return steps.checksum(*_job_now(job), backup_id)

        @task(task_id="offsite_upload", outlets=[asset])
        def offsite_task(backup_id: str) -> dict:
            with guarded(plan.slack_conn_id):
                result = steps.offsite_upload(*_job_now(job), backup_id)
            get_current_context()["outlet_events"][asset].extra = {
                "backup_id": result["backup_id"], "size": result["size"], "captured_at": result["captured_at"],
            }
            return result

        @task(task_id="retention_prune")
        def prune_task(backup_id: str) -> dict:
            dry_run = bool(get_current_context()["params"].get("prune_dry_run"))
            with guarded(plan.slack_conn_id):
                return steps.retention_prune(*_job_now(job), backup_id, dry_run=dry_run)

        backup_id = backup_task()
        # TaskFlow passes the XComArg at parse time and the value at run time
        checked = checksum_task(backup_id)  # type: ignore[arg-type]
        uploaded = offsite_task(backup_id)  # type: ignore[arg-type]
        pruned = prune_task(backup_id)  # type: ignore[arg-type]
        checked >> uploaded >> pruned

    return dag


def build_all(plan: Plan) -> dict[str, DAG]:
    """DAGs for every enabled job. Disabled services and types produce no DAG."""
    return {job.dag_id: build_backup_dag(job, plan) for job in plan.enabled_jobs}
