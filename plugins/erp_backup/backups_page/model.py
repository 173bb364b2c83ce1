"""The Backups page's data: per job, the newest verified offsite set and its freshness; per service, its drills.

Sets are ordered by their manifest's capture time, never by name: a backfilled set carries a
past slot's id but today's data. Freshness follows the watchdog's rules (`watchdog.evaluate`):
"late" when the run due after the newest set has not produced one, "breached" when the set is
older than the service's RPO (or the schedule cannot meet it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from erp_backup.drill.ledger import DrillLedgerEntry, latest_by_service
from erp_backup.manifest import Manifest
from erp_backup.notify import one_line
from erp_backup.offsite_trust import check_offsite_sets
from erp_backup.plan import BackupJob, Plan
from erp_backup.schedules import next_fire
from erp_backup.sets import SetState, staging_states
from erp_backup.watchdog import SetCounts, evaluate, rpo_carriers

log = logging.getLogger(__name__)

SPARK_SETS = 30
OK, LATE, BREACHED, NO_SET = "ok", "late", "breached", "no set yet"
_BREACH_CODES = frozenset({"rpo", "rpo_unmet_by_schedule"})


@dataclass(frozen=True)
class SetPoint:
    backup_id: str  # the schedule slot
    captured_at: datetime  # when the data was really captured
    size: int


@dataclass(frozen=True)
class JobRow:
    service: str
    backup_type: str
    schedule: str
    rpo: timedelta | None  # None for a type that does not carry its service's RPO
    newest: SetPoint | None
    age: timedelta | None
    freshness: str  # OK, LATE, BREACHED or NO_SET
    why: tuple[str, ...]
    sizes: tuple[SetPoint, ...]  # the last SPARK_SETS verified offsite sets, oldest capture first
    incomplete: int
    unverified: int
    corrupt: int
    suspect: int
    next_run: datetime


@dataclass(frozen=True)
class ServiceRow:
    service: str
    rto_target: timedelta
    last_drill: DrillLedgerEntry | None
    drills: tuple[DrillLedgerEntry, ...]  # oldest first; not those skipped for having no backup yet


@dataclass(frozen=True)
class Page:
    generated_at: datetime
    timezone: str
    offsite: str
    offsite_error: str | None
    jobs: tuple[JobRow, ...]
    services: tuple[ServiceRow, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


def by_capture(manifests: Sequence[Manifest]) -> list[Manifest]:
    """Oldest capture first; the slot (backup id) breaks ties."""
    return sorted(manifests, key=lambda m: (_utc(m.captured_finished_at), m.backup_id))


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def freshness(codes: Sequence[str], has_set: bool) -> str:
    if not has_set:
        return NO_SET
    if _BREACH_CODES & set(codes):
        return BREACHED
    return LATE if "overdue" in codes else OK


def staging_counts(plan: Plan, job: BackupJob) -> dict[SetState, int]:
    counts = dict.fromkeys(SetState, 0)
    for state in staging_states(plan.backup_root, job.service, job.backup_type).values():
        counts[state] += 1
    return counts


def offsite_manifests(plan: Plan, job: BackupJob, store: Any) -> tuple[list[Manifest], int]:
    """The verified offsite manifests of a job (by capture time) and how many offsite sets are suspect."""
    checks = check_offsite_sets(store, job.service, job.backup_type, plan.backup_root)
    good = [c.manifest for c in checks if c.state is SetState.OFFSITE and c.manifest is not None]
    return by_capture(good), sum(1 for c in checks if c.state is SetState.SUSPECT)


def job_row(plan: Plan, job: BackupJob, manifests: list[Manifest], suspect: int, now: datetime,
            carries_rpo: bool) -> JobRow:
    newest = manifests[-1] if manifests else None
    status = evaluate(job, newest, SetCounts(), now, carries_rpo=carries_rpo)
    codes = [reason.code for reason in status.reasons]
    counts = staging_counts(plan, job)
    points = tuple(SetPoint(m.backup_id, _utc(m.captured_finished_at), m.total_size) for m in manifests[-SPARK_SETS:])
    return JobRow(
        service=job.service, backup_type=job.backup_type, schedule=job.schedule,
        rpo=job.rpo if carries_rpo else None,
        newest=points[-1] if points else None, age=status.age,
        freshness=freshness(codes, newest is not None),
        why=tuple(reason.text for reason in status.reasons if reason.code != "no_set"),
        sizes=points, incomplete=counts[SetState.INCOMPLETE], unverified=counts[SetState.UNVERIFIED],
        corrupt=counts[SetState.CORRUPT], suspect=suspect,
        next_run=next_fire(job.schedule, job.timezone, now),
    )


def service_rows(plan: Plan, ledger: Sequence[DrillLedgerEntry]) -> list[ServiceRow]:
    latest = latest_by_service(ledger)
    rows = []
    for service in sorted({job.service for job in plan.enabled_jobs}):
        drills = tuple(sorted((e for e in ledger if e.service == service and e.status != "skipped"),
                              key=lambda e: e.finished_at))
        target = max(job.rto for job in plan.enabled_jobs if job.service == service)
        rows.append(ServiceRow(service, target, latest.get(service), drills))
    return rows


def build_page(plan: Plan, now: datetime, store: Any, ledger: Sequence[DrillLedgerEntry]) -> Page:
    """Every enabled job's row and every enabled service's drills. An unreachable store is shown, not raised."""
    now = _utc(now)
    carriers = rpo_carriers(plan.enabled_jobs, now)
    rows, error = [], None
    for job in plan.enabled_jobs:
        manifests: list[Manifest] = []
        suspect = 0
        if error is None:
            try:
                manifests, suspect = offsite_manifests(plan, job, store)
            except Exception as exc:
                error = one_line(exc)
                log.warning("Backups page: offsite %s unreachable: %s", store.description, error)
        rows.append(job_row(plan, job, manifests, suspect, now, job.dag_id in carriers))
    return Page(
        generated_at=now, timezone=plan.timezone, offsite=store.description, offsite_error=error,
        jobs=tuple(rows), services=tuple(service_rows(plan, ledger)),
    )
