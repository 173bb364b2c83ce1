"""What really happened in the soak, recorded as it happened, independent of what the watchdog says.

The assertions compare the watchdog's verdicts with this record: which windows missed their
RPO (judged from when each set truly reached offsite), which sets were verified, flipped,
killed or removed and why, and how much staging held that never reached offsite.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from erp_backup import staging
from erp_backup.notify import one_line
from erp_backup.plan import BackupJob, Plan
from erp_backup.services.base import RunInfo
from erp_backup.sets import BackupSet
from erp_backup.schedules import next_fire
from erp_backup.watchdog import GRACE, Status, rpo_carriers
from tests.integration.soak.faults import Fault

WATCHDOG_MESSAGE = re.compile(r"Backup watchdog: .*? (?P<kind>breach|new problem|recovered)\* \(`(?P<key>[^`]+)`")
KINDS = {"breach": "breach", "new problem": "changed", "recovered": "recovery"}
STALE_CODES = frozenset({"no_set", "overdue", "rpo", "rpo_unmet_by_schedule", "check_failed"})


@dataclass
class SetTruth:
    dag_id: str
    backup_id: str
    captured_at: datetime | None = None
    verified_at: datetime | None = None
    offsite_at: datetime | None = None
    flipped: bool = False
    removed_at: datetime | None = None
    removed_why: str | None = None
    offsite_deleted: bool = False


@dataclass
class Check:
    at: datetime
    verdicts: dict[str, tuple[bool, frozenset[str], str | None]]  # dag_id -> (breached, reason codes, newest set)


@dataclass
class Truth:
    plan: Plan
    sets: dict[tuple[str, str], SetTruth] = field(default_factory=dict)
    faults: list[tuple[Fault, datetime]] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    alerts: list[tuple[datetime, str, str]] = field(default_factory=list)  # (check time, dag_id, kind) Slack heard
    failed_tries: Counter = field(default_factory=Counter)
    failed_tasks: list[tuple[str, str, str, str]] = field(default_factory=list)
    watchdog_failures: list[str] = field(default_factory=list)
    removals: list[tuple[str, str]] = field(default_factory=list)
    flips: list[dict[str, Any]] = field(default_factory=list)  # each corrupted set: when, caught, retaken
    clears: Counter = field(default_factory=Counter)  # (dag_id, fire) -> times the operator cleared that run
    cleared_tasks: Counter = field(default_factory=Counter)  # (dag_id, task_id) -> clears
    most_unshipped: dict[str, tuple[int, int]] = field(default_factory=dict)  # dag_id -> (sets, bytes) at most

    def record(self, job: BackupJob, backup_id: str) -> SetTruth:
        return self.sets.setdefault((job.dag_id, backup_id), SetTruth(job.dag_id, backup_id))

    def fault(self, fault: Fault, now: datetime) -> None:
        self.faults.append((fault, now))

    def killed(self, job: BackupJob, info: dict[str, Any], backup_id: str) -> None:
        self.kills.append({"dag_id": job.dag_id, "backup_id": backup_id, **info})

    def backed_up(self, job: BackupJob, backup_set: BackupSet) -> None:
        """A complete set; one taken again (after a flip) starts a fresh record."""
        key = (job.dag_id, backup_set.backup_id)
        if key in self.sets and self.sets[key].flipped:
            del self.sets[key]
            for flip in self.flips:
                if (flip["dag_id"], flip["backup_id"]) == key and flip["retaken_at"] is None:
                    flip["retaken_at"] = backup_set.manifest().captured_started_at
        self.record(job, backup_set.backup_id).captured_at = backup_set.manifest().captured_finished_at

    def flipped(self, job: BackupJob, backup_id: str, at: datetime) -> None:
        self.record(job, backup_id).flipped = True
        self.flips.append({"dag_id": job.dag_id, "backup_id": backup_id, "at": at, "caught": None, "retaken_at": None})

    def flip_caught(self, job: BackupJob, backup_id: str, caught: bool) -> None:
        self.flips[-1]["caught"] = caught

    def cleared(self, job: BackupJob, task_id: str, fire: datetime) -> None:
        self.clears[(job.dag_id, fire)] += 1
        self.cleared_tasks[(job.dag_id, task_id)] += 1

    def verified(self, job: BackupJob, backup_id: str, at: datetime) -> None:
        self.record(job, backup_id).verified_at = at

    def shipped(self, job: BackupJob, backup_id: str, at: datetime) -> None:
        self.record(job, backup_id).offsite_at = at

    def pruned(self, job: BackupJob, report: dict[str, Any]) -> None:
        for backup_id in report["offsite_deleted"]:
            self.record(job, backup_id).offsite_deleted = True

    def removed(self, backup_set: BackupSet, reason: str, at: datetime) -> None:
        self.removals.append((backup_set.key, reason))
        dag_id = f"backup_{backup_set.service}_{backup_set.backup_type}"
        record = self.sets.get((dag_id, backup_set.backup_id))
        if record is not None:
            record.removed_at, record.removed_why = at, reason

    def failed_try(self, job: BackupJob, task_id: str, run: RunInfo, error: BaseException) -> None:
        self.failed_tries[(job.dag_id, task_id)] += 1

    def failed_task(self, job: BackupJob, task_id: str, run: RunInfo, error: BaseException | None) -> None:
        self.failed_tasks.append((job.dag_id, task_id, run.run_id, one_line(error)))

    def watchdog_failed(self, when: datetime, error: BaseException) -> None:
        self.watchdog_failures.append(f"{when.isoformat()}: {one_line(error)}")

    def checked(self, when: datetime, statuses: list[Status], heard: list[str]) -> None:
        """One hourly check: the watchdog's verdicts, and the watchdog messages Slack received from it."""
        self.checks.append(Check(when, {
            s.key: (s.breached, frozenset(r.code for r in s.reasons), s.newest_id) for s in statuses
        }))
        for text in heard:
            found = WATCHDOG_MESSAGE.search(text)
            if found:
                self.alerts.append((when, found.group("key"), KINDS[found.group("kind")]))

    def bounded(self, job: BackupJob, unshipped: list[BackupSet]) -> None:
        count, size = len(unshipped), sum(staging.set_bytes(s.path) for s in unshipped)
        before = self.most_unshipped.get(job.dag_id, (0, 0))
        self.most_unshipped[job.dag_id] = (max(before[0], count), max(before[1], size))

    # --- judgements -----------------------------------------------------------------

    def newest_offsite(self, job: BackupJob, at: datetime) -> SetTruth | None:
        """The newest set truly offsite at `at` (verified copy stored, staging still vouching for it)."""
        shipped = [
            s for s in self.sets.values()
            if s.dag_id == job.dag_id and s.offsite_at is not None and s.offsite_at <= at
            and (s.removed_at is None or s.removed_at > at) and s.captured_at is not None
        ]
        return max(shipped, key=lambda s: (s.captured_at, s.backup_id), default=None)

    def rpo_missed(self) -> list[tuple[datetime, str, str]]:
        """(check time, dag_id, why) for every hourly check at which an RPO-carrying job missed its RPO."""
        jobs = self.plan.enabled_jobs
        carriers = [job for job in jobs if job.dag_id in rpo_carriers(jobs, self.checks[0].at)] if self.checks else []
        missed = []
        for check in self.checks:
            for job in carriers:
                newest = self.newest_offsite(job, check.at)
                if newest is None:
                    # a fresh install waits for each job's first scheduled run (erp_backup.first_sets)
                    if check.at > next_fire(job.schedule, job.timezone, self.checks[0].at) + GRACE:
                        missed.append((check.at, job.dag_id, "no set offsite by its first run"))
                elif check.at - newest.captured_at > job.rpo:
                    missed.append((check.at, job.dag_id, f"newest {newest.backup_id} is {check.at - newest.captured_at} old"))
        return missed

    def flagged(self) -> list[tuple[datetime, str, frozenset[str]]]:
        return [(c.at, key, codes) for c in self.checks for key, (breached, codes, _) in c.verdicts.items() if breached]

    def verdict(self, at: datetime, dag_id: str) -> tuple[bool, frozenset[str], str | None]:
        return next(c.verdicts[dag_id] for c in self.checks if c.at == at)


def lost_sets(truth: Truth, plan: Plan) -> list[tuple[str, str, str]]:
    """Verified sets that are neither on staging, nor offsite, nor removed by a policy decision with its reason."""
    from erp_backup.offsite import offsite_from_plan

    store = offsite_from_plan(plan)
    lost = []
    for record in truth.sets.values():
        if record.verified_at is None:
            continue
        service, backup_type = record.dag_id.split("_", 2)[1:]
        on_staging = BackupSet(plan.backup_root, service, backup_type, record.backup_id).state.is_good
        offsite = record.offsite_at is not None and store.read_manifest(service, backup_type, record.backup_id) is not None
        why = record.removed_why or ""
        by_policy = "staging cap" in why or " > " in why  # the cap, or retention past its window
        if not (on_staging or offsite or by_policy):
            lost.append((record.dag_id, record.backup_id, why or "gone without a recorded reason"))
        if record.offsite_at is not None and not offsite and not record.offsite_deleted:
            lost.append((record.dag_id, record.backup_id, "gone from offsite without a retention decision"))
    return lost


def span(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:g} d" if hours >= 48 else f"{hours:g} h"
