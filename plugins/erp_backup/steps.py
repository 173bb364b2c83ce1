"""The four steps every backup DAG runs, as plain functions: backup, checksum, offsite upload, prune.

The DAG's tasks are thin wrappers around these; tests call them directly.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable
from datetime import datetime
from typing import Any

from erp_backup import crypto, locks, notify, staging
from erp_backup.checksum import verify_and_seal
from erp_backup.diskio import io_context
from erp_backup.manifest import Manifest, write_manifest
from erp_backup.plan import BackupJob, Plan
from erp_backup.runs import RunInfo, utcnow
from erp_backup.services import get_service
from erp_backup.services.base import BackupContext, BackupOutcome, airflow_connection
from erp_backup.sets import BackupSet, SetState, backup_id_for, remove_incomplete

log = logging.getLogger(__name__)


class BackupFailed(RuntimeError):
    """A step could not complete. The message says which backup and why."""


def backup_set_for(plan: Plan, job: BackupJob, backup_id: str) -> BackupSet:
    return BackupSet(plan.backup_root, job.service, job.backup_type, backup_id)


@locks.holding_job_lock
def backup(
    plan: Plan,
    job: BackupJob,
    run: RunInfo,
    get_connection: Callable[[str], Any] = airflow_connection,
) -> str:
    """Take the backup of `run` into its set and write the manifest last. Returns the backup id.

    Idempotent: a set that is already complete (manifest present, not corrupt) is left alone.
    Runs under the job's lock (erp_backup.locks): a second writer fails at once, naming the holder.
    """
    backup_set = backup_set_for(plan, job, backup_id_for(run.moment))
    state = backup_set.state
    if state in (SetState.UNVERIFIED, SetState.VERIFIED, SetState.OFFSITE):
        log.info("%s already has a complete set (%s); this rerun takes no new backup", backup_set.key, state.value)
        return backup_set.backup_id
    if state is SetState.CORRUPT:
        log.warning("%s was marked corrupt by an earlier checksum run; taking it again", backup_set.key)
    _prepare_set(plan, job, run, backup_set)
    started = utcnow()
    log.info("backing up %s into %s (run %s)", job.dag_id, backup_set.path, run.run_id)
    outcome, manifest = _take(plan, job, run, backup_set, get_connection, started)
    log.info(
        "%s complete: %d files, %d bytes, captured %s → %s", backup_set.key, len(manifest.files),
        manifest.total_size, started.isoformat(), manifest.captured_finished_at.isoformat(),
    )
    for warning in outcome.warnings:
        log.warning("%s: %s", backup_set.key, warning)
        notify.send(plan.slack_conn_id, f":warning: *{job.dag_id}* `{backup_set.backup_id}`: {warning}")
    return backup_set.backup_id


def _prepare_set(plan: Plan, job: BackupJob, run: RunInfo, backup_set: BackupSet) -> None:
    """Clear dead writers' leftovers, check space and type, then make the set's directory and writer marker."""
    for stale in remove_incomplete(plan.backup_root, job.service, job.backup_type):
        log.warning("removed incomplete set %s/%s left by an earlier failed run", job.dag_id, stale)
    staging.prepare(plan, job, backup_set, utcnow())
    if job.backup_type not in get_service(job.service).SUPPORTED_TYPES:
        raise BackupFailed(f"{job.dag_id}: the {job.service} module does not implement {job.backup_type!r} backups")
    recipients = crypto.recipients_from_connection(plan.encryption.recipients_conn_id, airflow_connection) if job.encrypt else []
    try:
        with io_context(backup_set.path, set_dir=backup_set.path, action="creating"):
            backup_set.create_dir()
        locks.write_marker(backup_set.path, run.run_id)
        if recipients:
            crypto.prepare_set(backup_set.path, recipients)
    except OSError as exc:
        _discard_partial(backup_set)
        raise BackupFailed(f"cannot create {backup_set.path}: {exc} (check BACKUP_ROOT / ERP_BACKUP_ROOT)") from exc


def _take(plan: Plan, job: BackupJob, run: RunInfo, backup_set: BackupSet, get_connection: Callable[[str], Any],
          started: datetime) -> tuple[BackupOutcome, Manifest]:
    """The service's backup, then the manifest, last; anything partial is removed on any failure."""
    try:
        outcome = get_service(job.service).backup(BackupContext(job, backup_set, run, get_connection))
        manifest = Manifest(
            service=job.service, backup_type=job.backup_type, backup_id=backup_set.backup_id,
            captured_started_at=started, captured_finished_at=utcnow(), run=run.as_dict(),
            source=outcome.source, tools=outcome.tools, files=outcome.files, details=outcome.details,
        )
        write_manifest(backup_set.path, manifest)
        locks.clear_marker(backup_set.path)
    except BaseException as exc:
        _discard_partial(backup_set)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(plan.backup_root).free
            raise BackupFailed(
                f"disk full under {plan.backup_root} while writing {backup_set.key} "
                f"({free} bytes free); the partial set was removed, no earlier backup was touched. {exc}"
            ) from exc
        raise
    return outcome, manifest


def _discard_partial(backup_set: BackupSet) -> None:
    try:
        if backup_set.path.exists() and backup_set.state is SetState.INCOMPLETE:
            shutil.rmtree(backup_set.path)
            log.warning("removed the partial set %s after the failure", backup_set.key)
    except OSError as exc:
        log.error("could not remove partial set %s (the next run will): %s", backup_set.key, exc)


def checksum(plan: Plan, job: BackupJob, backup_id: str) -> dict[str, Any]:
    """Re-read every file, compare with the manifest, run the service's checks, write SHA256SUMS."""
    backup_set = backup_set_for(plan, job, backup_id)
    service = get_service(job.service)
    report = verify_and_seal(backup_set, deep_verify=service.verify, clear_details=service.CLEAR_DETAILS)
    return {"backup_id": backup_id, "files": report.files, "bytes": report.bytes}


def offsite_upload(plan: Plan, job: BackupJob, backup_id: str, offsite: Any = None) -> dict[str, Any]:
    """Upload a verified set (manifest last), verify the copies, and record the receipt."""
    from erp_backup.offsite import offsite_from_plan

    backup_set = backup_set_for(plan, job, backup_id)
    if not backup_set.path.is_dir():
        raise BackupFailed(f"{backup_set.key} is no longer on staging (removed by retention or the staging cap: "
                           "the backup and prune logs say why); nothing to upload")
    if not backup_set.state.is_good:
        raise BackupFailed(f"{backup_set.key} is {backup_set.state.value}; only verified sets go offsite")
    store = offsite or offsite_from_plan(plan)
    report = store.upload_set(backup_set)
    manifest = backup_set.manifest()
    log.info(
        "%s offsite at %s: %d uploaded (%d bytes), %d already present (%d bytes)",
        backup_set.key, store.description, len(report.uploaded), report.bytes_uploaded,
        len(report.skipped), report.bytes_skipped,
    )
    return {
        "backup_id": backup_id,
        "offsite": store.description,
        "size": manifest.total_size,
        "captured_at": manifest.captured_finished_at.isoformat(),
        "bytes_uploaded": report.bytes_uploaded,
        "bytes_skipped": report.bytes_skipped,
    }


def retention_prune(
    plan: Plan, job: BackupJob, backup_id: str, *, dry_run: bool = False, offsite: Any = None, now: datetime | None = None
) -> dict[str, Any]:
    """Apply the plan's retention to staging and offsite. Every decision is logged with its reason."""
    from erp_backup import retention
    from erp_backup.offsite import offsite_from_plan

    service = get_service(job.service)
    store = offsite or offsite_from_plan(plan, prune=True)  # the one connection allowed to delete
    now = now or utcnow()
    protected = service.protected_sets(plan, job, now=now, offsite=store)
    report = retention.prune(
        job, plan.backup_root, store, now, dry_run=dry_run, current_id=backup_id, protected=protected,
    ).as_dict()
    report["after_prune"] = service.after_prune(plan, job, now=now, dry_run=dry_run)
    return report
