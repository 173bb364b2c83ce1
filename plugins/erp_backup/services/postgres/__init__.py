"""PostgreSQL: the daily logical `full`, the 6-hourly `wal` and the weekly `snapshot` backups.

This module declares the verbs of the service contract (``erp_backup.services.base``);
the work is done in its submodules:

- ``commands``: endpoints and the exact client-tool commands (pure);
- ``dump``: the `full` backup (pg_dumpall globals, one pg_dump per database) and its verification;
- ``restore``: the restore of a `full` set, one database at a time, checked against the manifest;
- ``checks``: the drill's checks of a restored scratch target; ``conninfo``: CLI targets;
- ``segments``, ``wal``, ``archiver``: WAL names and LSNs, the `wal` backup, pg_stat_archiver;
- ``snapshot``: the `snapshot` base backup (pg_basebackup);
- ``chain``: chain-aware retention; ``pitr``: point-in-time restore; ``pitr_cli``: its runbook CLI.

Only `full` sets restore alone. `snapshot` and `wal` sets restore together, as a
base plus the WAL replayed on it, to a point in time (``restore_to_time``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg.conninfo import make_conninfo

from erp_backup.manifest import Manifest
from erp_backup.plan import BackupJob, Plan
from erp_backup.scratch.postgres import ScratchPostgres, pg_bindir
from erp_backup.sealing import plan_identities
from erp_backup.services.base import (
    BackupContext,
    BackupOutcome,
    CheckContext,
    Checks,
    CliTarget,
    ContainerSpec,
    PointInTimeChain,
    PointInTimeUnavailable,
    RestoreReport,
    ScratchSpec,
    TargetUsageError,
)
from erp_backup.services.base import newest_set_at as sets_at
from erp_backup.services.postgres import chain, pitr, snapshot, wal
from erp_backup.services.postgres.checks import check_full_restore, check_point_in_time
from erp_backup.services.postgres.commands import (
    PgEndpoint,
    PostgresBackupError,
    RestoreConflict,
    RestoreError,
    SourceServer,
)
from erp_backup.services.postgres.conninfo import conninfo_from_cli, redact_conninfo
from erp_backup.services.postgres.dump import backup_full, verify_full
from erp_backup.services.postgres.records import read_records
from erp_backup.services.postgres.restore import OPTION_NAMES, restore_full
from erp_backup.sets import BackupSet

if TYPE_CHECKING:
    from erp_backup.scratch.base import TargetInfo

__all__ = [
    "DRILL_TYPES",
    "PITR_TYPES",
    "RESTORE_OPTIONS",
    "RESTORE_TYPES",
    "SUPPORTED_TYPES",
    "PgEndpoint",
    "PostgresBackupError",
    "RestoreConflict",
    "RestoreError",
    "SourceServer",
    "after_prune",
    "backup",
    "backup_full",
    "check_restored",
    "plan_point_in_time",
    "protected_sets",
    "read_records",
    "restore",
    "restore_full",
    "restore_to_time",
    "scratch_spec",
    "scratch_target",
    "sets_at",
    "source_size",
    "target_from_cli",
    "verify",
    "verify_full",
    "versions",
]

FULL_TYPE = "full"
DEFAULT_MAJOR = 15
SCRATCH_PORT = 5432

_BACKUPS: dict[str, Callable[[BackupContext], BackupOutcome]] = {
    FULL_TYPE: backup_full,
    chain.WAL_TYPE: wal.backup,
    chain.SNAPSHOT_TYPE: snapshot.backup,
}
_VERIFIES: dict[str, Callable[[BackupSet, Manifest], list[str]]] = {
    FULL_TYPE: verify_full,
    chain.WAL_TYPE: wal.verify,
    chain.SNAPSHOT_TYPE: snapshot.verify,
}
_RESTORES: dict[str, Callable[..., RestoreReport]] = {FULL_TYPE: restore_full}

SUPPORTED_TYPES = frozenset(_BACKUPS)
RESTORE_TYPES = frozenset(_RESTORES)
DRILL_TYPES = frozenset({FULL_TYPE})
PITR_TYPES = frozenset({chain.SNAPSHOT_TYPE, chain.WAL_TYPE})
RESTORE_OPTIONS = frozenset(OPTION_NAMES)
DEFAULT_PORTS = {"source": SCRATCH_PORT}
# WAL positions and sizes for the chain's retention, gap detection and PITR planning; no database or table names
CLEAR_DETAILS = frozenset({
    "wal_segment_size", "wal", "first_segment", "last_segment", "segment_count", "timeline", "timelines",
    "continuity", "first_archived_at", "last_archived_at", "start_segment", "end_segment", "start_time",
    "start_lsn", "end_lsn", "checkpoint_lsn", "system_identifier", "backup_start_time", "backup_end_time",
    "archive_check", "raw_bytes", "tar_bytes", "server_version_num",
})
POINT_IN_TIME_HINT = ("they restore together, to a point in time: restore_to_time, or "
                      "include/scripts/pitr_restore.sh --target-time ...")


def _handler(table: Mapping[str, Callable[..., Any]], backup_type: str, verb: str) -> Callable[..., Any]:
    try:
        return table[backup_type]
    except KeyError:
        raise ValueError(
            f"postgres cannot {verb} backup type {backup_type!r} (supported: {', '.join(sorted(table))})"
        ) from None


def backup(ctx: BackupContext) -> BackupOutcome:
    return _handler(_BACKUPS, ctx.job.backup_type, "back up")(ctx)


def verify(backup_set: BackupSet, manifest: Manifest) -> list[str]:
    return _handler(_VERIFIES, manifest.backup_type, "verify")(backup_set, manifest)


def restore(set_dir: Path, manifest: Manifest, target: str, *, dry_run: bool = False,
            options: Mapping[str, Any] | None = None) -> RestoreReport:
    """Restore a full set into the server `target` (libpq conninfo or URL); options: jobs, schema, databases."""
    if manifest.backup_type in PITR_TYPES:
        raise ValueError(f"postgres cannot restore a {manifest.backup_type} set alone ({manifest.backup_id}): "
                         + POINT_IN_TIME_HINT)
    return _handler(_RESTORES, manifest.backup_type, "restore")(set_dir, manifest, target, dry_run=dry_run,
                                                                 options=options)


def check_restored(target: Any, set_dir: Path, manifest: Manifest, report: RestoreReport,
                   ctx: CheckContext) -> Checks:
    """With ctx.at: the point-in-time checks of a recovered cluster; else the full set's content, database by database."""
    if ctx.at is not None:
        return check_point_in_time(target, ctx.at, report, ctx)
    return check_full_restore(target, manifest, ctx)


def target_from_cli(backup_type: str, target: str | None, target_conn: str | None,
                    get_connection: Callable[[str], Any]) -> CliTarget:
    if backup_type not in RESTORE_TYPES:
        raise TargetUsageError(f"postgres {backup_type} backups are not restored one set at a time: "
                               + POINT_IN_TIME_HINT)
    conninfo = conninfo_from_cli(target, target_conn, get_connection)
    return CliTarget(conninfo, redact_conninfo(conninfo))


def scratch_spec(backup_type: str, versions: Mapping[str, Any], *, pitr: bool = False) -> ScratchSpec:
    """A PostgreSQL server of the backed-up major (full), or an initdb'd cluster left stopped (point in time)."""
    recorded = versions.get("postgres_major")
    if pitr:
        return ScratchSpec("postgres_cluster", None, major=recorded)
    major = recorded or DEFAULT_MAJOR
    return ScratchSpec("postgres", ContainerSpec(f"postgres:{major}", SCRATCH_PORT, {}, None,
                                                 secret_env=("POSTGRES_PASSWORD",)), major=recorded)


def scratch_target(info: TargetInfo) -> Any:
    """A conninfo for a started scratch server; a ScratchPostgres for a point-in-time cluster."""
    if info.kind == "postgres":
        password = {"password": info.secret} if info.secret else {}
        return make_conninfo("", host=info.host, port=str(info.port), user="postgres", dbname="postgres", **password)
    if info.kind == "postgres_cluster":
        if not info.base_dir:
            raise ValueError(f"scratch target {info.kind} of {info.owner} has no base_dir")
        return ScratchPostgres(Path(info.base_dir), port=info.port, bindir=pg_bindir())
    raise ValueError(f"postgres has no scratch target of kind {info.kind!r} (postgres, postgres_cluster)")


def versions(manifest: Manifest) -> dict[str, Any]:
    """The server's major version, as full sets record it (server_version_num)."""
    number = manifest.details.get("server_version_num")
    if isinstance(number, int) and not isinstance(number, bool):
        return {"postgres_major": number // 10000}
    return {}


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def source_size(manifest: Manifest) -> int | None:
    """The data a set restores, uncompressed: the dumps (full) or the base tar (snapshot); None for WAL."""
    if manifest.backup_type == FULL_TYPE:
        return _positive_int(manifest.details.get("raw_bytes"))
    if manifest.backup_type == chain.SNAPSHOT_TYPE:
        return _positive_int(manifest.details.get("tar_bytes"))
    return None


def protected_sets(plan: Plan, job: BackupJob, *, now: datetime, offsite: Any = None) -> Mapping[str, str]:
    """WAL and base backups retention must keep so the PITR chain stays whole (chain.py)."""
    if job.backup_type not in (chain.WAL_TYPE, chain.SNAPSHOT_TYPE):
        return {}
    wal_retention = plan.job(job.service, chain.WAL_TYPE).retention
    return chain.chain_protection(plan.backup_root, now, wal_retention, offsite)[job.backup_type]


def after_prune(plan: Plan, job: BackupJob, *, now: datetime, dry_run: bool) -> dict[str, Any]:
    """For the WAL job: drop raw archive files already held in offsite-verified WAL sets."""
    if job.backup_type != chain.WAL_TYPE:
        return {}
    archive_dir = wal.archive_dir_for(plan.backup_root, job.options)
    keep = wal.duration_option(job.options, "archive_keep", timedelta(days=1))
    removed = wal.prune_local_archive(plan.backup_root, archive_dir, now, keep, dry_run=dry_run)
    return {"archive_dir": str(archive_dir), "archive_files_removed": len(removed), "dry_run": dry_run}


def plan_point_in_time(manifests: Sequence[Manifest], at: datetime) -> PointInTimeChain:
    """The newest base whose unbroken WAL reaches `at`, and the WAL sets to replay on it."""
    bases = [m for m in manifests if m.backup_type == chain.SNAPSHOT_TYPE]
    wals = [m for m in manifests if m.backup_type == chain.WAL_TYPE]
    inventory = pitr.build_inventory(bases, wals)
    try:
        recovery = pitr.plan_recovery(inventory, at)
    except PointInTimeUnavailable:
        raise
    except pitr.RestoreError as exc:
        raise PointInTimeUnavailable(str(exc)) from None
    wal_bytes = sum(inventory.wal_manifests[set_id].total_size for set_id in recovery.wal_sets)
    newest = max((f.archived_at for f in inventory.wal.values()), default=None)
    sets = ((chain.SNAPSHOT_TYPE, recovery.base.backup_id), *((chain.WAL_TYPE, set_id) for set_id in recovery.wal_sets))
    return PointInTimeChain(base=recovery.base_manifest, sets=sets, replay_bytes=wal_bytes,
                            details={**recovery.as_dict(), "wal_bytes": wal_bytes,
                                     "newest_archived_at": newest.isoformat() if newest else None})


def point_in_time_range(manifests: Sequence[Manifest]) -> tuple[datetime, datetime] | None:
    """From the newest usable base's consistency point to the last WAL reached from it without a gap."""
    bases = [m for m in manifests if m.backup_type == chain.SNAPSHOT_TYPE]
    wals = [m for m in manifests if m.backup_type == chain.WAL_TYPE]
    spans = pitr.coverage(pitr.build_inventory(bases, wals))
    if not spans:
        return None
    newest = max(spans, key=lambda span: (span.earliest, span.base_id))
    return newest.earliest, newest.latest


def _recovery_actions(details: Mapping[str, Any]) -> list[str]:
    wal_sets = ", ".join(details.get("wal_sets") or []) or "none"
    return [
        f"restore base backup {details['base_backup_id']} (consistent at {details['base_consistent_at']})",
        f"replay {details['wal_files']} WAL files ({details['wal_from_local_archive']} from the local archive; "
        f"WAL sets: {wal_sets}) up to {details['target_time']}",
    ]


def restore_to_time(root: Path, at: datetime, target: Any, *, dry_run: bool = False,
                    owner: str | None = None, identities: Callable[[], Sequence[Any]] | None = None) -> RestoreReport:
    """Recover the sets under `root` into the scratch cluster `target` (a ScratchPostgres or its directory) as of `at`.

    Only the WAL in sets is replayed (not the local archive). ``details`` is what
    ``pitr.restore_to_time`` reports (last_replayed_commit, stop, wal_bytes_replayed, ...).
    """
    cluster = None if dry_run or target is None else snapshot.scratch_cluster(target)
    details = pitr.restore_to_time(at, root=Path(root), cluster=cluster, offsite=None, use_local_archive=False,
                                   dry_run=dry_run, owner=owner or "pitr", identities=identities or plan_identities)
    report = RestoreReport(dry_run=dry_run, actions=_recovery_actions(details), details=details)
    if not dry_run:
        report.restored_bytes = int(details.get("wal_bytes_replayed") or details.get("base_bytes") or 0)
        report.checks.append(f"{details['base_files_verified']} base files and {details['wal_files_staged']} "
                             f"WAL files match their manifests' SHA-256")
        report.checks.append(f"recovery stopped: {details['stop']}")
    return report
