"""The DR drill: restore randomly chosen backup sets into scratch targets, verify them, time them, report.

- `pick`: the seeded, weighted random choice (pure).
- `params`: the trigger form and its validation.
- `targets`: scratch targets (local processes or Docker containers) and the production guard.
- `runner`: the steps as plain functions (the DAG `dr_drill` wraps them).
- `report`: JSON + Markdown report, drill ledger, Slack summary.

Nothing here connects anywhere at import; `render_doc` runs at DAG parse time.
"""

from __future__ import annotations

from erp_backup.plan import Plan

DAG_ID = "dr_drill"


def _hours(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:g} h"


def render_doc(plan: Plan) -> str:
    """The DAG's doc_md, from the plan (schedule, RTO targets, backend)."""
    from erp_backup.drill.params import drill_types, drillable_services

    rows = "\n".join(
        f"| {service} | {', '.join(drill_types(plan, service))} | "
        f"{_hours(plan.job(service, drill_types(plan, service)[0]).rto.total_seconds())} |"
        for service in drillable_services(plan)
    ) or "| (no enabled service) | | |"
    return f"""# {DAG_ID}

## Purpose
Prove the backups restore. Every week, for each enabled service, one complete backup set within
retention is picked at random (weighted towards sets and services not drilled recently, read from
the drill ledger), fetched from offsite with every file's SHA-256 checked, restored into a scratch
target, verified against its manifest, and timed. The report compares the measured RTO with the
plan's target and extrapolates it to the newest (production) set's size.

| | |
|---|---|
| Owner | ops-backup |
| Schedule | `{plan.drill.schedule}` ({plan.drill.timezone}) and manual runs (trigger form) |
| Scratch backend | `{plan.drill.backend}` (plan `drill.backend`, or the `backend` param) |
| Report | `$BACKUP_ROOT/drills/runs/<run>/report.md` + `.json`, offsite `drills/runs/<run>/` |
| Ledger | `$BACKUP_ROOT/drills/ledger.jsonl` and offsite `drills/ledger.jsonl` |
| Alerts | Slack `{plan.slack_conn_id}`: a summary after every drill, and any task failure |

| Service | Drilled types | RTO target |
|---|---|---|
{rows}

## Tasks
1. `pick`: validate the params (bad values fail here, listing what is valid), choose the sets, record the seed.
2. `clean_leftovers`: stop and remove scratch targets left by crashed or kept drills (by label and pid file).
3. Per picked set (mapped group `drill`):
   `start_target` (setup) → `fetch` → `restore` → `verify` → `teardown` (teardown, always runs).
   GitLab is drilled as *prepared*: its files are fetched, checked and placed for the restore runbook,
   not restored into a GitLab.
4. `report`: JSON + Markdown report, ledger (local and offsite), Slack summary; fails the run if any set failed.

A drill never touches production: scratch targets listen on 127.0.0.1 (or an internal Docker
network), and any target equal to an endpoint of the plan's connections is refused.

## Manual runs
Trigger with the form: `service` (`all`, `random` or one service), `backup_id` (empty: random),
`source` (`offsite` or `local` staging), `target_time` (PostgreSQL PITR), `keep_scratch`, `seed`
(empty: derived from the run id), `backend`.

## Idempotency
This job is idempotent. A rerun of a run (same run id) derives the same seed and picks the same sets;
a retried fetch starts from an empty directory; a retried restore gets a fresh scratch target; the
ledger never gets a run's lines twice. Verification failures and checksum mismatches are not
retried (they would fail the same way). No backfill: a drill tests the backups that exist now.
"""
