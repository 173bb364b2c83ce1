"""Retention: which backup sets to delete, on local staging and offsite, and why.

`decide` is the pure policy; `prune` applies it (or only logs it, in dry-run).
Every decision, keep or delete, carries the reason that is logged.

The policy, checked in this order for each set:

1. The running backup's own set (`current_id`) is kept.
2. Protected sets (`protected`: backup id -> reason, e.g. a WAL chain) are kept; `prune`
   adds incomplete sets whose writer may still run (erp_backup.staging.writer_protection).
   Suspect offsite sets (their manifest disagrees with its upload record, see
   erp_backup.offsite_trust) are kept: their age cannot be believed.
3. The newest good set (verified, by manifest capture time) is kept whatever its age.
4. Age comes from the manifest's `captured_finished_at`. Only an incomplete set
   (no manifest) falls back to the timestamp in its backup id. A set whose
   manifest exists but gave no capture time has no known age and is kept.
5. A set no older than the window is kept.
6. On staging (`require_offsite=True`), a set that may hold restorable data
   (unverified, verified or offsite) is deleted only when its offsite copy
   exists and was verified. Incomplete and corrupt sets hold nothing
   restorable, so they are deleted once past the window.
7. Anything else is past the window and is deleted.

Offsite, a set the policy would delete is kept while the store still retains it (S3 Object
Lock, `Offsite.locked_until`, compared with the real clock): prune never asks to delete early.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from erp_backup import staging
from erp_backup.manifest import Manifest, ManifestError
from erp_backup.offsite_trust import check_offsite_sets
from erp_backup.runs import utcnow
from erp_backup.sets import BACKUP_ID_FORMAT, BackupSet, SetState, is_backup_id, list_sets

if TYPE_CHECKING:
    from erp_backup.plan import BackupJob

log = logging.getLogger(__name__)

_HOLDS_DATA = frozenset({SetState.UNVERIFIED, SetState.VERIFIED, SetState.OFFSITE})


class Offsite(Protocol):
    """What retention needs from the offsite store (implemented in erp_backup.offsite)."""

    description: str

    def list_backup_ids(self, service: str, backup_type: str) -> list[str]: ...

    def read_manifest(self, service: str, backup_type: str, backup_id: str) -> Manifest | None: ...

    def manifest_object(self, service: str, backup_type: str, backup_id: str) -> Any: ...

    def delete_set(self, service: str, backup_type: str, backup_id: str) -> int: ...

    def locked_until(self, service: str, backup_type: str, backup_id: str) -> datetime | None: ...


class PruneError(RuntimeError):
    """Some sets the policy chose to delete could not be deleted. The message names them."""


@dataclass(frozen=True)
class SetRecord:
    backup_id: str
    state: SetState
    captured_at: datetime | None  # manifest.captured_finished_at; None when there is none to read
    offsite_verified: bool  # staging: the offsite copy exists and was verified
    note: str = ""  # why a set is suspect


@dataclass(frozen=True)
class Decision:
    backup_id: str
    delete: bool
    reason: str


def decide(
    records: Iterable[SetRecord],
    retention: timedelta,
    now: datetime,
    *,
    require_offsite: bool,
    protected: Mapping[str, str] | None = None,
    current_id: str | None = None,
) -> list[Decision]:
    """One decision per record, in input order. Pure: reads nothing, deletes nothing."""
    records = list(records)
    if now.tzinfo is None:
        raise ValueError("retention needs a timezone-aware 'now'")
    if retention <= timedelta(0):
        raise ValueError(f"retention must be positive, got {retention}")
    seen: set[str] = set()
    for record in records:
        if record.backup_id in seen:
            raise ValueError(f"backup id {record.backup_id} is listed twice; retention decides each set once")
        seen.add(record.backup_id)
        if record.captured_at is not None and record.captured_at.tzinfo is None:
            raise ValueError(f"backup {record.backup_id}: capture time {record.captured_at} has no timezone")

    newest_good = newest_good_id(records)
    protected = protected or {}
    return [
        Decision(
            record.backup_id,
            *_decide_one(record, retention, now, require_offsite, protected, current_id, newest_good),
        )
        for record in records
    ]


def newest_good_id(records: Iterable[SetRecord]) -> str | None:
    """The verified set with the latest capture time (ties: the latest id)."""
    good = [r for r in records if r.state.is_good and r.captured_at is not None]
    if not good:
        return None
    return max(good, key=lambda r: (r.captured_at, r.backup_id)).backup_id


def _decide_one(
    record: SetRecord,
    retention: timedelta,
    now: datetime,
    require_offsite: bool,
    protected: Mapping[str, str],
    current_id: str | None,
    newest_good: str | None,
) -> tuple[bool, str]:
    keep, delete = False, True
    if record.backup_id == current_id:
        return keep, "set of the running backup (current_id); never pruned while it runs"
    if record.backup_id in protected:
        return keep, f"protected: {protected[record.backup_id]}"
    if record.state is SetState.SUSPECT:
        return keep, f"suspect, never pruned: {record.note}; check it by hand"

    if record.captured_at is not None:
        age = now - record.captured_at
        age_text = f"captured {record.captured_at.isoformat()}, {_span(age)} old"
    elif record.state is SetState.INCOMPLETE:
        id_time = backup_id_time(record.backup_id)
        if id_time is None:
            return keep, "incomplete (no manifest) and its backup id is not a timestamp: age unknown, remove by hand"
        age = now - id_time
        age_text = f"{_span(age)} old by its backup id (no manifest, so no capture time)"
    else:
        return keep, f"{record.state.value} but its manifest gave no capture time: age unknown, check it by hand"

    if record.backup_id == newest_good:
        return keep, f"newest verified set, kept whatever its age ({age_text})"
    state_prefix = "" if record.state.is_good else f"{record.state.value}, "
    if age <= retention:
        return keep, f"{state_prefix}{age_text} <= {_span(retention)}"
    if require_offsite and record.state in _HOLDS_DATA and not record.offsite_verified:
        return keep, (
            f"{state_prefix}{age_text} > {_span(retention)}, but no verified offsite copy: kept until one exists"
        )
    offsite_note = "; offsite copy verified" if require_offsite and record.state in _HOLDS_DATA else ""
    return delete, f"{state_prefix}{age_text} > {_span(retention)}{offsite_note}"


def backup_id_time(backup_id: str) -> datetime | None:
    """The UTC instant a backup id names, or None if it is not a valid id."""
    if not is_backup_id(backup_id):
        return None
    try:
        return datetime.strptime(backup_id, BACKUP_ID_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def _span(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    days = seconds / 86400
    if seconds % 86400 == 0:
        return f"{int(days)} day" if abs(days) == 1 else f"{int(days)} days"
    if abs(seconds) >= 86400:
        return f"{days:.1f} days"
    if abs(seconds) >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes"


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def staging_records(
    root: Path, service: str, backup_type: str, *, offsite_ids: Collection[str] | None = None
) -> list[SetRecord]:
    """Records for every staging set of a type.

    A set counts as offsite-verified when it holds the offsite receipt (state
    OFFSITE) and, if `offsite_ids` is given, the offsite store still has it.
    """
    records = []
    for backup_set in list_sets(root, service, backup_type):
        state = backup_set.state
        captured_at = None
        if state is not SetState.INCOMPLETE:
            try:
                captured_at = _aware(backup_set.manifest().captured_finished_at)
            except ManifestError as exc:
                log.warning("retention: %s: %s", backup_set.key, exc)
        present = offsite_ids is None or backup_set.backup_id in offsite_ids
        records.append(SetRecord(backup_set.backup_id, state, captured_at, state is SetState.OFFSITE and present))
    return records


def offsite_records(offsite: Offsite, service: str, backup_type: str, root: Path | None = None) -> list[SetRecord]:
    """Records for every offsite set, each checked against staging's receipt in `root` or the store's record.

    A manifest that matches its record is good (OFFSITE), no manifest is INCOMPLETE, one that
    cannot be parsed is CORRUPT with no known age, and one that disagrees is SUSPECT (kept).
    """
    records = []
    for check in check_offsite_sets(offsite, service, backup_type, root):
        if check.state is SetState.CORRUPT:
            log.warning("retention: offsite %s: %s", check.key, check.why)
        captured_at = check.captured_at if check.state is SetState.OFFSITE else None
        records.append(SetRecord(check.backup_id, check.state, captured_at, check.state is SetState.OFFSITE,
                                 note=check.why))
    return records


@dataclass
class PruneReport:
    dag_id: str
    dry_run: bool
    staging: list[Decision] = field(default_factory=list)
    offsite: list[Decision] = field(default_factory=list)
    staging_deleted: list[str] = field(default_factory=list)
    offsite_deleted: list[str] = field(default_factory=list)
    offsite_objects_deleted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def prune(
    job: BackupJob,
    root: Path,
    offsite: Offsite | None,
    now: datetime,
    *,
    dry_run: bool,
    current_id: str | None = None,
    protected: Mapping[str, str] | None = None,
) -> PruneReport:
    """Apply the policy to staging, then offsite. Dry-run logs the same decisions and deletes nothing.

    Offsite is listed first so a staging set is only deleted while its offsite
    copy is actually there (without an offsite store, the receipt alone counts).
    Failed deletions are collected and raised at the end, naming each set.
    """
    report = PruneReport(dag_id=job.dag_id, dry_run=dry_run)
    remote = offsite_records(offsite, job.service, job.backup_type, root) if offsite is not None else None
    remote_good = {r.backup_id for r in remote or [] if r.state.is_good}
    local = staging_records(root, job.service, job.backup_type, offsite_ids=remote_good if remote is not None else None)
    # After the listing: a set a backup started while offsite was listed is in `local`, and its writer holds the lock.
    protected = {**staging.writer_protection(root, job.service, job.backup_type), **(protected or {})}
    failures: list[str] = []

    report.staging = decide(
        local, job.retention, now, require_offsite=True, protected=protected, current_id=current_id
    )
    listed = {record.backup_id: record.state for record in local}
    for decision in _log_decisions(job, "staging", report.staging, dry_run):
        if _incomplete_now_written(root, job, decision.backup_id, listed):
            continue
        try:
            BackupSet(root, job.service, job.backup_type, decision.backup_id).remove(decision.reason)
            report.staging_deleted.append(decision.backup_id)
        except OSError as exc:
            failures.append(f"staging {job.service}/{job.backup_type}/{decision.backup_id}: {exc}")

    if offsite is not None and remote is not None:
        log.info("retention %s: offsite is %s", job.dag_id, offsite.description)
        report.offsite = _respect_locks(offsite, job, decide(
            remote, job.retention, now, require_offsite=False, protected={**protected, **_uploads_pending(local, remote)},
            current_id=current_id,
        ))
        for decision in _log_decisions(job, "offsite", report.offsite, dry_run):
            try:
                report.offsite_objects_deleted += offsite.delete_set(job.service, job.backup_type, decision.backup_id)
                report.offsite_deleted.append(decision.backup_id)
            except Exception as exc:  # any store error: keep pruning the rest, report at the end
                where = f"{job.service}/{job.backup_type}/{decision.backup_id}"
                failures.append(f"offsite {offsite.description} {where}: {exc}")

    if failures:
        raise PruneError(f"retention {job.dag_id}: could not delete {len(failures)} set(s): " + "; ".join(failures))
    return report


def _respect_locks(offsite: Offsite, job: BackupJob, decisions: list[Decision]) -> list[Decision]:
    """Turn each deletion of a set the store still retains (Object Lock) into a keep, naming the date."""
    clock = utcnow()
    result = []
    for decision in decisions:
        if decision.delete:
            try:
                until = offsite.locked_until(job.service, job.backup_type, decision.backup_id)
            except Exception as exc:  # an unreadable lock is no licence to delete
                until, why = None, f"its Object Lock could not be read ({exc}); kept"
                decision = Decision(decision.backup_id, False, f"{decision.reason}, but {why}")
            if until is not None and until > clock:
                decision = Decision(decision.backup_id, False, f"{decision.reason}, but under Object Lock until "
                                                                f"{until.isoformat()}: kept until then")
        result.append(decision)
    return result


def _uploads_pending(local: list[SetRecord], remote: list[SetRecord]) -> dict[str, str]:
    """Offsite sets without a manifest whose set is still staged: another run may be uploading it right now.

    Their age comes from the backup id alone, which for a backfilled window is months old:
    without this, one window's prune would delete another window's upload in flight. The
    staged set counts whatever its state, since its upload may finish (and write the receipt)
    between this prune's offsite listing and its staging listing.
    """
    staged = {record.backup_id for record in local if record.state in _HOLDS_DATA}
    return {record.backup_id: "its set is still staged and its upload may be in flight; kept until it has a manifest"
            for record in remote if record.state is SetState.INCOMPLETE and record.backup_id in staged}


def _incomplete_now_written(root: Path, job: BackupJob, backup_id: str, listed: Mapping[str, SetState]) -> bool:
    """Whether a set listed as incomplete has since gained a manifest or a live writer: then it is kept."""
    if listed.get(backup_id) is not SetState.INCOMPLETE:
        return False
    state = BackupSet(root, job.service, job.backup_type, backup_id).state
    writer = staging.writer_protection(root, job.service, job.backup_type).get(backup_id)
    if state is SetState.INCOMPLETE and writer is None:
        return False
    log.info("retention %s staging: keep %s after all (%s since it was listed)", job.dag_id, backup_id,
             writer or f"now {state.value}")
    return True


def _log_decisions(job: BackupJob, where: str, decisions: list[Decision], dry_run: bool) -> list[Decision]:
    """Log every decision; return the deletions to carry out (none in dry-run)."""
    to_delete = []
    for decision in decisions:
        if not decision.delete:
            log.info("retention %s %s: keep %s (%s)", job.dag_id, where, decision.backup_id, decision.reason)
        elif dry_run:
            log.info(
                "retention %s %s: dry-run, would delete %s (%s)", job.dag_id, where, decision.backup_id, decision.reason
            )
        else:
            log.info("retention %s %s: delete %s (%s)", job.dag_id, where, decision.backup_id, decision.reason)
            to_delete.append(decision)
    return to_delete
