"""Point-in-time restore of PostgreSQL from a base backup plus WAL.

Owns: what the backups cover (per base: from its consistency point to the
last unbroken WAL), choosing the newest base before a target time, checking
checksums against the manifests, filling a local WAL directory the server's
`restore_command` decompresses from, writing the recovery settings, starting
the scratch cluster and measuring the replay. The runbook CLI is ``pitr_cli.py``.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pyrage
import zstandard
from pyrage import x25519

from erp_backup import crypto
from erp_backup.checksum import entry_problem
from erp_backup.manifest import MANIFEST_NAME, Manifest, ManifestError
from erp_backup.scratch.base import ScratchError
from erp_backup.scratch.postgres import ScratchPostgres, chown_to_cluster_user
from erp_backup.sealing import UnsealingOffsite, plan_identities, unsealed_copy
from erp_backup.services.base import PointInTimeUnavailable
from erp_backup.services.postgres.chain import SNAPSHOT_TYPE, WAL_TYPE, BaseInfo
from erp_backup.services.postgres.segments import DEFAULT_SEGMENT_SIZE, Segment, parse_lsn, wal_file_kind
from erp_backup.services.postgres.snapshot import BASE_FILE, extract_base, prepare_data_dir, scratch_cluster
from erp_backup.services.postgres.wal import SEALED_SUFFIX, SERVICE, archive_dir_for, read_archive_log, usable_sets

log = logging.getLogger(__name__)

DEFAULT_LOOKAHEAD = timedelta(hours=6)
DEFAULT_TIMEOUT_S = 2 * 3600
WAL_DIR_NAME = "wal_restore"
POLL_S = 0.2
NOT_REACHED = "recovery ended before configured recovery target was reached"
_REDO_DONE = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+).*?elapsed: ([0-9.]+) s")
_STOPPING = re.compile(r"recovery stopping (?:before|after) .*")


class RestoreError(RuntimeError):
    """The restore failed. The message names the backup, file or setting to look at."""


class TargetOutsideArchive(RestoreError, PointInTimeUnavailable):
    """No base + unbroken WAL reaches the target time. The message lists what is covered."""


class SetFetcher(Protocol):
    """The offsite store as the restore uses it (implemented by erp_backup.offsite)."""

    def list_backup_ids(self, service: str, backup_type: str) -> list[str]: ...

    def read_manifest(self, service: str, backup_type: str, backup_id: str) -> Manifest | None: ...

    def fetch_set(self, service: str, backup_type: str, backup_id: str, dest: Path) -> Manifest: ...


# --- what is available -------------------------------------------------------------------------


@dataclass(frozen=True)
class WalFile:
    """One WAL file a restore can use: in a WAL set (compressed) or in the local archive (raw)."""

    name: str
    archived_at: datetime
    set_id: str | None  # None: the local archive
    path: str  # relative to the set dir, or the file name in the archive
    sealed: bool = False  # zstd then age, sealed on the database host by archive_wal.sh

    @property
    def kind(self) -> str | None:
        return wal_file_kind(self.name)


@dataclass
class Inventory:
    bases: list[tuple[BaseInfo, Manifest]]
    wal: dict[str, WalFile]
    wal_manifests: dict[str, Manifest]
    segment_size: int = DEFAULT_SEGMENT_SIZE


def build_inventory(
    base_manifests: Iterable[Manifest],
    wal_manifests: Iterable[Manifest],
    archive_entries: Iterable[tuple[str, datetime] | tuple[str, datetime, bool]] = (),
) -> Inventory:
    """Everything restorable: bases, and WAL files from sets first, then the local archive.

    An archive entry is (name, archive time[, sealed]).
    """
    bases = []
    for manifest in base_manifests:
        try:
            bases.append((BaseInfo.from_manifest(manifest), manifest))
        except (KeyError, ValueError) as exc:
            log.warning("base %s has no usable WAL range in its manifest: %s", manifest.backup_id, exc)
    wal: dict[str, WalFile] = {}
    sets: dict[str, Manifest] = {}
    size = DEFAULT_SEGMENT_SIZE
    for manifest in sorted(wal_manifests, key=lambda m: m.backup_id):
        sets[manifest.backup_id] = manifest
        size = int(manifest.details.get("wal_segment_size", size))
        for record in manifest.details.get("wal", []):
            when = datetime.fromisoformat(record["archived_at"])
            wal.setdefault(record["name"], WalFile(record["name"], when, manifest.backup_id, record["file"],
                                                   bool(record.get("sealed"))))
    for entry in archive_entries:
        name, when, *stored = entry
        sealed = bool(stored and stored[0])
        wal.setdefault(name, WalFile(name, when, None, f"{name}.{SEALED_SUFFIX}" if sealed else name, sealed))
    if bases:
        size = bases[0][0].start.size
    return Inventory(sorted(bases, key=lambda b: (b[0].consistent_at, b[0].backup_id)), wal, sets, size)


@dataclass(frozen=True)
class Coverage:
    """A base and the span of targets it reaches with unbroken WAL."""

    base_id: str
    earliest: datetime  # the base's consistency point (backup end)
    latest: datetime  # archive time of the last segment of the unbroken run after the base
    last_segment: str

    def contains(self, moment: datetime) -> bool:
        return self.earliest <= moment <= self.latest

    def describe(self) -> str:
        return f"{self.earliest.isoformat()} .. {self.latest.isoformat()} (base {self.base_id}, WAL to {self.last_segment})"


def coverage(inventory: Inventory) -> list[Coverage]:
    """Per base: from its consistency point to the archive time of the last segment reached without a gap."""
    by_position: dict[int, list[WalFile]] = {}
    for wal_file in inventory.wal.values():
        if wal_file.kind == "segment":
            by_position.setdefault(Segment.parse(wal_file.name, inventory.segment_size).segno, []).append(wal_file)
    spans = []
    for base, _ in inventory.bases:
        position, latest, last = base.end.segno, base.consistent_at, base.end.name
        while position + 1 in by_position:
            position += 1
            newest = max(by_position[position], key=lambda f: (f.name[:8], f.archived_at))
            latest, last = max(latest, newest.archived_at), newest.name
        spans.append(Coverage(base.backup_id, base.consistent_at, latest, last))
    return spans


def describe_coverage(spans: list[Coverage]) -> str:
    if not spans:
        return "nothing: there is no usable base backup (backup_postgres_snapshot)"
    merged: list[list[datetime]] = []
    for span in sorted(spans, key=lambda s: s.earliest):
        if merged and span.earliest <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], span.latest)
        else:
            merged.append([span.earliest, span.latest])
    return "; ".join(f"{start.isoformat()} .. {end.isoformat()}" for start, end in merged)


@dataclass
class RecoveryPlan:
    target_time: datetime
    base: BaseInfo
    base_manifest: Manifest
    coverage: Coverage
    wal: list[WalFile] = field(default_factory=list)

    @property
    def wal_sets(self) -> list[str]:
        return sorted({f.set_id for f in self.wal if f.set_id})

    def as_dict(self) -> dict[str, Any]:
        return {
            "target_time": self.target_time.isoformat(),
            "base_backup_id": self.base.backup_id,
            "base_start_segment": self.base.start.name,
            "base_consistent_at": self.base.consistent_at.isoformat(),
            "covered": self.coverage.describe(),
            "wal_sets": self.wal_sets,
            "wal_files": len(self.wal),
            "wal_from_local_archive": sum(1 for f in self.wal if f.set_id is None),
            "base_bytes": int(self.base_manifest.details.get("tar_bytes") or self.base_manifest.total_size),
        }


def plan_recovery(inventory: Inventory, target_time: datetime, lookahead: timedelta = DEFAULT_LOOKAHEAD) -> RecoveryPlan:
    """Pick the newest base whose unbroken WAL reaches the target, and the WAL files to stage. Pure."""
    if target_time.tzinfo is None:
        raise RestoreError(f"target time {target_time} has no timezone; give one, e.g. 2026-11-26T10:15:00+09:00")
    spans = {span.base_id: span for span in coverage(inventory)}
    for base, manifest in reversed(inventory.bases):
        span = spans[base.backup_id]
        if not span.contains(target_time):
            continue
        horizon = target_time + lookahead
        chosen = [
            f
            for f in inventory.wal.values()
            if f.kind == "history"
            or (f.kind == "segment" and Segment.parse(f.name, inventory.segment_size).segno >= base.start.segno and f.archived_at <= horizon)
        ]
        return RecoveryPlan(target_time, base, manifest, span, sorted(chosen, key=lambda f: f.name))
    raise TargetOutsideArchive(
        f"target time {target_time.isoformat()} is outside what the backups cover: {describe_coverage(list(spans.values()))}. "
        f"Choose a target in that range (a base backup's end is the earliest point; the last archived WAL is the latest)"
    )


# --- server settings (pure) --------------------------------------------------------------------


def restore_command(wal_dir: Path) -> str:
    """restore_command: decompress `<wal_dir>/%f.zst` into %p (fails, as it must, when absent)."""
    return f"zstd -d -q -f --no-progress -o %p {shlex.quote(str(wal_dir))}/%f.zst"


def _conf_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def recovery_settings(wal_dir: Path, target_time: datetime | None) -> dict[str, str]:
    """postgresql.auto.conf lines for archive recovery to `target_time` (None: to the end of the WAL)."""
    settings = {
        "restore_command": _conf_string(restore_command(wal_dir)),
        "recovery_target_timeline": "'latest'",
        "recovery_target_action": "'promote'",
    }
    if target_time is not None:
        stamp = target_time.astimezone(UTC).isoformat(sep=" ")
        settings["recovery_target_time"] = _conf_string(stamp)
    else:
        settings["recovery_target_time"] = "''"
    return settings


# --- staging the files -------------------------------------------------------------------------


def verify_set_files(set_dir: Path, manifest: Manifest, only: Iterable[str] | None = None) -> int:
    """Check files against the manifest's SHA-256; raise naming the first bad file. Returns files checked."""
    wanted = set(only) if only is not None else None
    checked = 0
    for entry in manifest.files:
        if wanted is not None and entry.path not in wanted:
            continue
        problem = entry_problem(set_dir, entry)
        if problem:
            raise RestoreError(
                f"backup {manifest.service}/{manifest.backup_type}/{manifest.backup_id}: {entry.path} does not match "
                f"its manifest ({problem}); use another backup"
            )
        checked += 1
    return checked


def _compress_into(source: Path, target: Path) -> None:
    compressor = zstandard.ZstdCompressor(level=1)
    with open(source, "rb") as src, open(target, "wb") as dst:
        compressor.copy_stream(src, dst)


class SetLocator:
    """Where a set's clear files are: staging, or fetched from offsite into a work dir on first use.

    A sealed set (erp_backup.sealing) is decrypted into the work dir with the plan's identity.
    """

    def __init__(self, root: Path, offsite: SetFetcher | None, work: Path,
                 identities: Callable[[], Sequence[x25519.Identity]] = plan_identities):
        self.root, self.work, self.identities = root, work, identities
        self.offsite = UnsealingOffsite(offsite, identities) if offsite is not None else None
        self._fetched: dict[tuple[str, str], Path] = {}

    def set_dir(self, backup_type: str, backup_id: str) -> Path:
        key = (backup_type, backup_id)
        if key not in self._fetched:
            dest = self.work / "fetched" / backup_type / backup_id
            if self.offsite is None:
                staged = self.root / SERVICE / backup_type / backup_id
                dest, _ = unsealed_copy(staged, Manifest.read(staged / MANIFEST_NAME), dest, self.identities)
            else:
                dest.mkdir(parents=True, exist_ok=True)
                log.info("fetching %s/%s/%s from offsite", SERVICE, backup_type, backup_id)
                self.offsite.fetch_set(SERVICE, backup_type, backup_id, dest)
            self._fetched[key] = dest
        return self._fetched[key]

    def manifest(self, backup_type: str, backup_id: str, listed: Manifest) -> Manifest:
        """The manifest of the clear files in `set_dir`: `listed` itself unless the set was sealed."""
        return Manifest.read(self.set_dir(backup_type, backup_id) / MANIFEST_NAME) if listed.encryption else listed


def stage_wal(plan: RecoveryPlan, inventory: Inventory, locator: SetLocator, archive_dir: Path | None, wal_dir: Path) -> int:
    """Fill `wal_dir` with `<name>.zst` for every planned WAL file, checking set files' checksums.

    A file sealed on the database host is decrypted with the locator's identities on the way.
    """
    wal_dir.mkdir(parents=True, exist_ok=True)
    by_set: dict[str, list[WalFile]] = {}
    for wal_file in plan.wal:
        by_set.setdefault(wal_file.set_id or "", []).append(wal_file)
    staged = 0
    for set_id, files in sorted(by_set.items()):
        if set_id:
            set_dir = locator.set_dir(WAL_TYPE, set_id)
            verify_set_files(set_dir, locator.manifest(WAL_TYPE, set_id, inventory.wal_manifests[set_id]),
                             [f.path for f in files])
            source_dir = set_dir
        else:
            assert archive_dir is not None
            source_dir = archive_dir
        for wal_file in files:
            target = wal_dir / f"{wal_file.name}.zst"
            if wal_file.sealed:
                _unseal_into(source_dir / wal_file.path, target, wal_file, locator)
            elif set_id:
                shutil.copyfile(source_dir / wal_file.path, target)
            else:
                _compress_into(source_dir / wal_file.path, target)
            staged += 1
    return staged


def _unseal_into(source: Path, target: Path, wal_file: WalFile, locator: SetLocator) -> None:
    identities = list(locator.identities())
    try:
        crypto.decrypt_file(source, target, identities)
    except (pyrage.DecryptError, OSError) as exc:
        where = f"WAL set {wal_file.set_id}" if wal_file.set_id else "the local WAL archive"
        raise RestoreError(
            f"{wal_file.name} in {where} was sealed on the database host and cannot be opened with the identities "
            f"given ({', '.join(crypto.identity_fingerprints(identities)) or 'none'}): {exc}"
        ) from exc


# --- running the recovery ----------------------------------------------------------------------


def _query(cluster: ScratchPostgres, sql: str) -> tuple[Any, ...] | None:
    import psycopg

    with psycopg.connect(cluster.conninfo(), autocommit=True, connect_timeout=5) as db:
        return db.execute(sql).fetchone()


def wait_for_promotion(cluster: ScratchPostgres, timeout: float) -> None:
    """Poll pg_is_in_recovery() until false; raise with the server log if the server stops instead."""
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not cluster.is_running():
            raise RestoreError(f"PostgreSQL stopped during recovery: {_log_tail(cluster)}")
        try:
            row = _query(cluster, "SELECT pg_is_in_recovery()")
            if row is not None and row[0] is False:
                return
        except psycopg.OperationalError:
            pass
        time.sleep(POLL_S)
    raise RestoreError(f"recovery did not finish within {timeout:.0f} s (raise --timeout): {_log_tail(cluster)}")


def _log_tail(cluster: ScratchPostgres, lines: int = 15) -> str:
    return " | ".join(cluster.server_log().strip().splitlines()[-lines:])


def _start_recovery(cluster: ScratchPostgres, wal_dir: Path, target_time: datetime | None, timeout: float) -> None:
    cluster.configure(recovery_settings(wal_dir, target_time))
    (cluster.data_dir / "recovery.signal").touch()
    chown_to_cluster_user(cluster.data_dir)
    try:
        cluster.start(timeout=timeout)
    except ScratchError as exc:
        raise RestoreError(f"{exc} | server log: {_log_tail(cluster)}") from exc
    wait_for_promotion(cluster, timeout)


def gather_inventory(root: Path, offsite: SetFetcher | None, archive_dir: Path, use_local_archive: bool) -> Inventory:
    """The bases and WAL of staging under `root` (or of `offsite`), plus the local archive when asked."""
    if offsite is not None:
        base_manifests = _offsite_manifests(offsite, SNAPSHOT_TYPE)
        wal_manifests = _offsite_manifests(offsite, WAL_TYPE)
    else:
        base_manifests = [m for _, m in usable_sets(root, SNAPSHOT_TYPE)]
        wal_manifests = [m for _, m in usable_sets(root, WAL_TYPE)]
    entries: list[tuple[str, datetime, bool]] = []
    if use_local_archive and archive_dir.is_dir():
        entries = [(e.name, e.archived_at, e.sealed) for e in read_archive_log(archive_dir)
                   if (archive_dir / e.stored_name).is_file()]
    return build_inventory(base_manifests, wal_manifests, entries)


def _replay(cluster: ScratchPostgres, wal_dir: Path, target_time: datetime, timeout: float) -> tuple[float, bool]:
    """Recover to the target time: (wall seconds, whether it fell back to the end of the WAL)."""
    started = time.monotonic()
    fallback = False
    try:
        _start_recovery(cluster, wal_dir, target_time, timeout)
    except RestoreError:
        if NOT_REACHED not in cluster.server_log():
            raise
        # No commit after the target exists in the WAL we have: replaying all of it gives the same state.
        log.warning("no commit after %s in the available WAL; recovering to the end of the WAL instead", target_time)
        fallback = True
        if cluster.is_running():
            cluster.stop("immediate")
        _start_recovery(cluster, wal_dir, None, timeout)
    return time.monotonic() - started, fallback


def _replay_report(cluster: ScratchPostgres, plan: RecoveryPlan, wall_seconds: float, fallback: bool) -> dict[str, Any]:
    """Where the replay stopped and how fast it went, from the server and its log."""
    row = _query(cluster, "SELECT pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()")
    assert row is not None
    base_start_lsn = parse_lsn(plan.base_manifest.details["start_lsn"])
    replayed = max(0, parse_lsn(row[0]) - base_start_lsn) if row[0] else 0
    server_log = cluster.server_log()
    redo = _REDO_DONE.findall(server_log)  # one line per start (two after a fallback)
    redo_seconds = sum(float(elapsed) for _, elapsed in redo) if redo else wall_seconds
    stop = _STOPPING.findall(server_log)
    return {
        "data_dir": str(cluster.data_dir),
        "port": cluster.port,
        "conninfo": cluster.conninfo(),
        "replay_lsn": row[0],
        "last_replayed_commit": row[1].isoformat() if row[1] else None,
        "stop": stop[-1] if stop else "end of available WAL",
        "recovered_to_end_of_wal": fallback,
        "wal_bytes_replayed": replayed,
        "redo_seconds": round(redo_seconds, 3),
        "wall_seconds": round(wall_seconds, 3),
        "replay_mb_per_s": round(replayed / 1e6 / redo_seconds, 1) if redo_seconds > 0 else None,
    }


def restore_to_time(
    target_time: datetime,
    *,
    root: Path,
    cluster: ScratchPostgres | None = None,
    offsite: SetFetcher | None = None,
    archive_dir: Path | None = None,
    use_local_archive: bool = True,
    lookahead: timedelta = DEFAULT_LOOKAHEAD,
    timeout: float = DEFAULT_TIMEOUT_S,
    dry_run: bool = False,
    owner: str = "pitr",
    superuser: str = "postgres",
    identities: Callable[[], Sequence[x25519.Identity]] = plan_identities,
) -> dict[str, Any]:
    """Restore the cluster as it was at `target_time` into a scratch cluster, and report the replay.

    Sets come from staging under `root`, or from `offsite` when given (fetched
    into the cluster's work dir). The local WAL archive adds what no set holds
    yet (the current window). The cluster is left running; the caller destroys it.
    `superuser` is a superuser role of the source cluster (to check the recovery).
    `identities` opens sealed sets and WAL files sealed on the database host; it is called
    only when one is met.
    """
    archive_dir = archive_dir or archive_dir_for(root, {})
    inventory = gather_inventory(root, offsite, archive_dir, use_local_archive)
    plan = plan_recovery(inventory, target_time, lookahead)
    report: dict[str, Any] = {**plan.as_dict(), "dry_run": dry_run}
    log.info("PITR plan: %s", json.dumps(report))
    if dry_run:
        return report

    made_here = cluster is None
    cluster = cluster or ScratchPostgres.new("pitr", owner=owner)
    cluster.user = superuser
    try:
        locator = SetLocator(root, offsite, cluster.base_dir, identities)
        base_dir = locator.set_dir(SNAPSHOT_TYPE, plan.base.backup_id)
        report["base_files_verified"] = verify_set_files(
            base_dir, locator.manifest(SNAPSHOT_TYPE, plan.base.backup_id, plan.base_manifest))
        wal_dir = cluster.base_dir / WAL_DIR_NAME
        report["wal_files_staged"] = stage_wal(plan, inventory, locator, archive_dir, wal_dir)
    except BaseException:
        if made_here:  # nothing was started yet: no half-staged cluster directory is left behind
            cluster.destroy()
        raise

    extract_base(base_dir / BASE_FILE, cluster.data_dir)
    prepare_data_dir(cluster)
    chown_to_cluster_user(cluster.base_dir)
    wall_seconds, fallback = _replay(cluster, wal_dir, target_time, timeout)
    report.update(_replay_report(cluster, plan, wall_seconds, fallback))
    log.info("PITR finished: %s", json.dumps(report))
    return report


def restore(set_dir: Path, manifest: Manifest, target: ScratchPostgres | str | Path, **options: Any) -> dict[str, Any]:
    """PITR to the end of a `wal` set's window (or options["target_time"]).

    The base and the other WAL sets come from the same backup root as `set_dir`.
    """
    if manifest.backup_type != WAL_TYPE:
        raise RestoreError(f"pitr.restore takes a wal set, got {manifest.backup_type} {manifest.backup_id}")
    target_time = options.pop("target_time", None) or manifest.details.get("last_archived_at")
    if target_time is None:
        raise RestoreError(f"WAL set {manifest.backup_id} shipped no WAL; give target_time")
    if isinstance(target_time, str):
        target_time = datetime.fromisoformat(target_time)
    root = Path(set_dir).resolve().parents[2]
    return restore_to_time(target_time, root=root, cluster=scratch_cluster(target, options.pop("port", None)), **options)


def _offsite_manifests(offsite: SetFetcher, backup_type: str) -> list[Manifest]:
    found = []
    for backup_id in sorted(offsite.list_backup_ids(SERVICE, backup_type)):
        try:
            manifest = offsite.read_manifest(SERVICE, backup_type, backup_id)
        except ManifestError as exc:
            log.warning("offsite %s/%s/%s: %s", SERVICE, backup_type, backup_id, exc)
            continue
        if manifest is not None:
            found.append(manifest)
    return found
