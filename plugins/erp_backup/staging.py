"""Bounded staging: what may wait on local staging for its offsite copy, and room for the next set.

Limits come from the plan's optional top-level `staging:` block (defaults below), per
(service, type):

- `alert_after_days` (2): a set that holds data (unverified or verified) but has not
  reached offsite this long after its capture is reported by the watchdog
  (reason `unshipped`), so a broken upload cannot go unnoticed for weeks.
- `max_unshipped_sets` (7) and `max_unshipped_bytes` (100 GiB): before each backup the
  oldest sets that never reached offsite are removed until the new set fits under both
  caps; corrupt sets go first. Never removed: the newest good set, sets the service
  protects (a WAL chain), sets whose writer may still run. Each removal is logged with
  its reason and posted to Slack.
- `free_space_factor` (1.2): before each backup the root needs at least this times the
  last set's size free, or the backup is refused before it writes anything.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from erp_backup import locks
from erp_backup.manifest import ManifestError
from erp_backup.plan import BackupJob, Plan, PlanError
from erp_backup.sets import BackupSet, SetState, list_sets

log = logging.getLogger(__name__)

PLAN_SECTION = "staging"
GIB = 1024**3


class StagingFull(RuntimeError):
    """Not enough free space for the next set. The message names the root, free and needed bytes."""


@dataclass(frozen=True)
class StagingLimits:
    alert_after: timedelta = timedelta(days=2)
    max_sets: int = 7
    max_bytes: int = 100 * GIB
    free_factor: float = 1.2


_FIELDS: dict[str, tuple[str, bool]] = {  # plan key: (StagingLimits field, whole numbers only)
    "alert_after_days": ("alert_after", False),
    "max_unshipped_sets": ("max_sets", True),
    "max_unshipped_bytes": ("max_bytes", True),
    "free_space_factor": ("free_factor", False),
}


def limits(plan: Plan) -> StagingLimits:
    """The plan's `staging:` limits (defaults for what it leaves out)."""
    try:
        stat = plan.path.stat()
    except OSError:
        return StagingLimits()
    return _limits_cached(plan.path, (stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=8)
def _limits_cached(path: Path, _stamp: tuple[int, int]) -> StagingLimits:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    section = data.get(PLAN_SECTION) if isinstance(data, dict) else None
    if section is None:
        return StagingLimits()
    if not isinstance(section, dict):
        raise PlanError(f"{path}: plan.{PLAN_SECTION}: must be a mapping, got {type(section).__name__}")
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in _FIELDS:
            raise PlanError(f"{path}: plan.{PLAN_SECTION}.{key}: unknown key (allowed: {', '.join(_FIELDS)})")
        name, whole = _FIELDS[key]
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if number is None or number <= 0 or (whole and not isinstance(number, int)):
            kind = "whole number" if whole else "number"
            raise PlanError(f"{path}: plan.{PLAN_SECTION}.{key}: must be a positive {kind}, got {value!r}")
        values[name] = timedelta(days=number) if name == "alert_after" else number
    return StagingLimits(**values)


def set_bytes(path: Path) -> int:
    """Bytes of the files under a set directory."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _captured(backup_set: BackupSet) -> datetime | None:
    try:
        moment = backup_set.manifest().captured_finished_at
    except ManifestError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _newest_good(sets: list[BackupSet]) -> str | None:
    good = [(when, s.backup_id) for s in sets if s.state.is_good and (when := _captured(s)) is not None]
    return max(good)[1] if good else None


def unshipped(root: Path, job: BackupJob) -> list[BackupSet]:
    """The job's sets that never reached offsite (incomplete ones excluded: cleanup owns them)."""
    return [
        s for s in list_sets(root, job.service, job.backup_type)
        if s.state not in (SetState.OFFSITE, SetState.INCOMPLETE)
    ]


def _protected(plan: Plan, job: BackupJob, now: datetime) -> dict[str, str]:
    from erp_backup.services import get_service

    protected_for = getattr(get_service(job.service), "protected_sets", None)
    return dict(protected_for(plan, job, now=now, offsite=None)) if protected_for else {}


def enforce_caps(plan: Plan, job: BackupJob, now: datetime, *, incoming: int, keep: str) -> list[str]:
    """Remove the oldest never-offsite sets until one more set of `incoming` bytes fits the caps.

    Returns the removed backup ids (each logged with its reason and posted to Slack).
    """
    cap = limits(plan)
    waiting = [s for s in unshipped(plan.backup_root, job) if s.backup_id != keep]
    sizes = {s.backup_id: set_bytes(s.path) for s in waiting}
    count, total = len(waiting), sum(sizes.values())
    if count < cap.max_sets and total + incoming <= cap.max_bytes:
        return []
    spared = {_newest_good(list_sets(plan.backup_root, job.service, job.backup_type)): "newest good set"}
    spared.update(_protected(plan, job, now))
    candidates = sorted(
        (s for s in waiting if s.backup_id not in spared),
        key=lambda s: (s.state is not SetState.CORRUPT, s.backup_id),
    )
    removed: list[str] = []
    for backup_set in candidates:
        if count < cap.max_sets and total + incoming <= cap.max_bytes:
            break
        reason = (
            f"staging cap: {count} set(s), {total} bytes never reached offsite (caps {cap.max_sets} sets, "
            f"{cap.max_bytes} bytes, next set about {incoming} bytes); oldest {backup_set.state.value} set removed"
        )
        backup_set.remove(reason)
        removed.append(backup_set.backup_id)
        count, total = count - 1, total - sizes[backup_set.backup_id]
    if count >= cap.max_sets or total + incoming > cap.max_bytes:
        log.warning("%s: staging stays over its caps: the remaining never-offsite sets are all kept (%s)",
                    job.dag_id, "; ".join(f"{k}: {v}" for k, v in spared.items() if k))
    if removed:
        _announce_removal(plan, job, removed, count, total)
    return removed


def _announce_removal(plan: Plan, job: BackupJob, removed: list[str], count: int, total: int) -> None:
    from erp_backup import notify

    notify.send(plan.slack_conn_id, (
        f":wastebasket: *{job.dag_id}*: staging cap reached, removed {len(removed)} set(s) that never reached "
        f"offsite: {', '.join(removed)}. {count} never-offsite set(s), {total} bytes remain under "
        f"{plan.backup_root}. Fix the offsite upload: these sets exist nowhere else."
    ))


def last_set_size(root: Path, job: BackupJob, *, keep: str | None = None) -> tuple[str, int] | None:
    """(backup id, total size) of the newest set with a readable manifest, or None."""
    for backup_set in reversed(list_sets(root, job.service, job.backup_type)):
        if backup_set.backup_id == keep or backup_set.state is SetState.INCOMPLETE:
            continue
        try:
            return backup_set.backup_id, backup_set.manifest().total_size
        except ManifestError:
            continue
    return None


def check_free_space(plan: Plan, job: BackupJob, backup_set: BackupSet) -> int:
    """Refuse (StagingFull) unless the root has room for a set like the last one. Returns the bytes needed."""
    last = last_set_size(plan.backup_root, job, keep=backup_set.backup_id)
    if last is None:
        return 0
    last_id, size = last
    factor = limits(plan).free_factor
    needed = int(size * factor)
    free = shutil.disk_usage(plan.backup_root).free
    if free < needed:
        raise StagingFull(
            f"not enough free space under {plan.backup_root} for {backup_set.key}: {free} bytes free, "
            f"{needed} bytes needed ({factor:g} x the last set {last_id}, {size} bytes); nothing was written. "
            "Free space there, or lower plan.staging caps"
        )
    return needed


def prepare(plan: Plan, job: BackupJob, backup_set: BackupSet, now: datetime) -> None:
    """Before a backup (under the job lock): apply the caps, then check the free space."""
    last = last_set_size(plan.backup_root, job, keep=backup_set.backup_id)
    enforce_caps(plan, job, now, incoming=last[1] if last else 0, keep=backup_set.backup_id)
    check_free_space(plan, job, backup_set)


def unshipped_alerts(plan: Plan, job: BackupJob, now: datetime) -> list[str]:
    """The watchdog's `unshipped` reason: data-holding sets not offsite `alert_after` past their capture."""
    cap = limits(plan)
    late = []
    for backup_set in unshipped(plan.backup_root, job):
        captured = _captured(backup_set) if backup_set.state is not SetState.CORRUPT else None
        if captured is not None and now - captured > cap.alert_after:
            late.append(backup_set.backup_id)
    if not late:
        return []
    days = cap.alert_after.total_seconds() / 86400
    return [
        f"{len(late)} {job.service}/{job.backup_type} set(s) never reached offsite {days:g} day(s) after "
        f"capture: {', '.join(late)} (staging holds the only copy; check offsite_upload)"
    ]


def writer_protection(root: Path, service: str, backup_type: str) -> dict[str, str]:
    """Incomplete sets whose writer may still run, as retention's `protected` {backup_id: reason}."""
    incomplete = [s for s in list_sets(root, service, backup_type) if s.state is SetState.INCOMPLETE]
    if not incomplete:
        return {}
    if not locks.lock_free_or_mine(root, service, backup_type):
        holder = locks.read_holder(locks.lock_path(root, service, backup_type))
        by = holder.describe() if holder else "another process"
        return {s.backup_id: f"incomplete, and the job is locked by {by}: may be its set" for s in incomplete}
    protected = {}
    for backup_set in incomplete:
        writer = locks.read_marker(backup_set.path)
        if writer is not None and locks.writer_alive(writer):
            protected[backup_set.backup_id] = f"incomplete, being written by {writer.describe()}"
    return protected
