"""Applying retention (`erp_backup.retention.prune`) to real staging sets and a directory-backed offsite store."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erp_backup.manifest import MANIFEST_NAME, Manifest, write_manifest
from erp_backup.offsite import StoredObject
from erp_backup.plan import BackupJob
from erp_backup.retention import PruneError, prune, staging_records
from erp_backup.sets import SUMS_NAME, BackupSet, SetState, backup_id_for, list_sets
from erp_backup.stream import stream_to_file
from tests.fixtures.factories import make_manifest

UTC = timezone.utc
NOW = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
JOB = BackupJob(
    service="postgres",
    backup_type="full",
    schedule="0 2 * * *",
    timezone="Asia/Seoul",
    retention=timedelta(days=30),
    method="pg_dump",
    rpo=timedelta(hours=6),
    rto=timedelta(hours=2),
    connections={"source": "erp_postgres"},
    enabled=True,
)


class DirectoryOffsite:
    """The offsite store's protocol over a local directory: `<root>/<service>/<type>/<id>/`.

    Like the real stores, it records each manifest's SHA-256 at upload (under `<root>/.records/`)
    and the manifest's mtime is its upload time: a minute after the capture it records.
    """

    def __init__(self, root: Path):
        self.root = root
        self.description = f"directory {root}"

    def _dir(self, service: str, backup_type: str, backup_id: str) -> Path:
        return self.root / service / backup_type / backup_id

    def list_backup_ids(self, service: str, backup_type: str) -> list[str]:
        base = self.root / service / backup_type
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def _record(self, service: str, backup_type: str, backup_id: str) -> Path:
        return self.root / ".records" / service / backup_type / f"{backup_id}.sha256"

    def read_manifest(self, service: str, backup_type: str, backup_id: str) -> Manifest | None:
        path = self._dir(service, backup_type, backup_id) / MANIFEST_NAME
        return Manifest.read(path) if path.is_file() else None

    def manifest_object(self, service: str, backup_type: str, backup_id: str) -> StoredObject | None:
        path = self._dir(service, backup_type, backup_id) / MANIFEST_NAME
        if not path.is_file():
            return None
        record = self._record(service, backup_type, backup_id)
        written = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        return StoredObject(path.read_bytes(), written, record.read_text() if record.is_file() else None)

    def delete_set(self, service: str, backup_type: str, backup_id: str) -> int:
        target = self._dir(service, backup_type, backup_id)
        count = sum(1 for p in target.rglob("*") if p.is_file())
        shutil.rmtree(target)
        self._record(service, backup_type, backup_id).unlink(missing_ok=True)
        return count

    def locked_until(self, service: str, backup_type: str, backup_id: str) -> datetime | None:
        return None  # a directory has no Object Lock

    def upload(self, backup_set: BackupSet, *, with_manifest: bool = True) -> None:
        target = self._dir(backup_set.service, backup_set.backup_type, backup_set.backup_id)
        ignore = shutil.ignore_patterns("offsite.json", *(() if with_manifest else (MANIFEST_NAME,)))
        shutil.copytree(backup_set.path, target, ignore=ignore)
        manifest = target / MANIFEST_NAME
        if manifest.is_file():
            record = self._record(backup_set.service, backup_set.backup_type, backup_set.backup_id)
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(hashlib.sha256(manifest.read_bytes()).hexdigest())
            uploaded = (Manifest.read(manifest).captured_finished_at + timedelta(minutes=1)).timestamp()
            os.utime(manifest, (uploaded, uploaded))


def make_set(root: Path, backup_id: str, state: SetState, captured_at: datetime | None = None) -> BackupSet:
    """A real staging set in `state`, built with the same files the backup and checksum tasks write."""
    backup_set = BackupSet(root, JOB.service, JOB.backup_type, backup_id)
    set_dir = backup_set.create_dir()
    result = stream_to_file([f"dump of {backup_id}\n".encode()], set_dir, "postgres.sql.zst")
    if state is SetState.INCOMPLETE:
        return backup_set
    captured_at = captured_at or datetime.strptime(backup_id, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    write_manifest(set_dir, make_manifest(
        service=JOB.service, backup_type=JOB.backup_type, backup_id=backup_id,
        captured_started_at=captured_at - timedelta(minutes=3), captured_finished_at=captured_at, files=[result.entry],
    ))
    if state is SetState.CORRUPT:
        backup_set.mark_corrupt([f"postgres.sql.zst: sha256 mismatch (expected {result.entry.sha256})"])
    elif state in (SetState.VERIFIED, SetState.OFFSITE):
        (set_dir / SUMS_NAME).write_text(f"{result.entry.sha256}  {result.entry.path}\n")
    if state is SetState.OFFSITE:
        backup_set.write_offsite_receipt({"store": "directory", "objects": 3})
    assert backup_set.state is state
    return backup_set


def days_ago(days: float) -> str:
    return backup_id_for(NOW - timedelta(days=days))


def tree(*roots: Path) -> dict[str, str]:
    """Every file under the roots with its content hash: equal trees mean nothing was touched."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture()
def history(tmp_path: Path) -> tuple[Path, DirectoryOffsite, dict[str, str]]:
    staging, offsite = tmp_path / "staging", DirectoryOffsite(tmp_path / "offsite")
    ids = {
        "uploaded_old": days_ago(60),
        "receipt_but_not_offsite": days_ago(50),
        "verified_not_uploaded": days_ago(45),
        "corrupt_old": days_ago(40),
        "incomplete_old": days_ago(35),
        "incomplete_young": days_ago(5),
        "uploaded_newest": days_ago(2),
        "offsite_only_incomplete": days_ago(70),
    }
    offsite.upload(make_set(staging, ids["uploaded_old"], SetState.OFFSITE))
    make_set(staging, ids["receipt_but_not_offsite"], SetState.OFFSITE)
    make_set(staging, ids["verified_not_uploaded"], SetState.VERIFIED)
    make_set(staging, ids["corrupt_old"], SetState.CORRUPT)
    make_set(staging, ids["incomplete_old"], SetState.INCOMPLETE)
    make_set(staging, ids["incomplete_young"], SetState.INCOMPLETE)
    offsite.upload(make_set(staging, ids["uploaded_newest"], SetState.OFFSITE))
    partial = make_set(staging, ids["offsite_only_incomplete"], SetState.OFFSITE)
    offsite.upload(partial, with_manifest=False)
    shutil.rmtree(partial.path)
    return staging, offsite, ids


def test_prune_deletes_what_the_policy_decides_on_staging_and_offsite(history, caplog):
    staging, offsite, ids = history
    caplog.set_level(logging.INFO, logger="erp_backup.retention")

    report = prune(JOB, staging, offsite, NOW, dry_run=False)

    remaining = {s.backup_id for s in list_sets(staging, JOB.service, JOB.backup_type)}
    assert remaining == {ids[k] for k in ("receipt_but_not_offsite", "verified_not_uploaded", "incomplete_young",
                                          "uploaded_newest")}
    assert report.staging_deleted == [ids["uploaded_old"], ids["corrupt_old"], ids["incomplete_old"]]
    assert offsite.list_backup_ids(JOB.service, JOB.backup_type) == [ids["uploaded_newest"]]
    assert report.offsite_deleted == [ids["offsite_only_incomplete"], ids["uploaded_old"]]
    # uploaded_old: data file + manifest + SHA256SUMS; the incomplete one: no manifest, so 2.
    assert report.offsite_objects_deleted == 5

    assert (f"retention backup_postgres_full staging: delete {ids['uploaded_old']} "
            f"(captured 2025-12-31T02:00:00+00:00, 60 days old > 30 days; offsite copy verified)") in caplog.messages
    assert (f"retention backup_postgres_full staging: keep {ids['receipt_but_not_offsite']} (captured "
            f"2026-01-10T02:00:00+00:00, 50 days old > 30 days, but no verified offsite copy: kept until one exists)"
            ) in caplog.messages
    assert (f"retention backup_postgres_full offsite: delete {ids['offsite_only_incomplete']} "
            "(incomplete, 70 days old by its backup id (no manifest, so no capture time) > 30 days)"
            ) in caplog.messages
    decision_lines = [m for m in caplog.messages if m.startswith("retention backup_postgres_full ")
                      and (" keep " in m or " delete " in m)]
    assert len(decision_lines) == len(report.staging) + len(report.offsite) == 7 + 3


def test_dry_run_logs_the_same_decisions_and_deletes_nothing(history, caplog):
    staging, offsite, ids = history
    caplog.set_level(logging.INFO, logger="erp_backup.retention")
    before = tree(staging, offsite.root)

    dry = prune(JOB, staging, offsite, NOW, dry_run=True)

    assert tree(staging, offsite.root) == before
    assert dry.staging_deleted == dry.offsite_deleted == [] and dry.offsite_objects_deleted == 0
    assert (f"retention backup_postgres_full staging: dry-run, would delete {ids['corrupt_old']} "
            f"(corrupt, captured 2026-01-20T02:00:00+00:00, 40 days old > 30 days)") in caplog.messages
    real = prune(JOB, staging, offsite, NOW, dry_run=False)
    assert (dry.staging, dry.offsite) == (real.staging, real.offsite)
    assert real.staging_deleted == [d.backup_id for d in dry.staging if d.delete]


def test_running_and_protected_sets_survive_on_both_sides(history):
    staging, offsite, ids = history
    protected = {ids["uploaded_old"]: "base backup of the retained WAL chain"}

    report = prune(JOB, staging, offsite, NOW, dry_run=False, protected=protected,
                   current_id=ids["incomplete_old"])

    assert BackupSet(staging, JOB.service, JOB.backup_type, ids["uploaded_old"]).state is SetState.OFFSITE
    assert BackupSet(staging, JOB.service, JOB.backup_type, ids["incomplete_old"]).path.is_dir()
    assert ids["uploaded_old"] in offsite.list_backup_ids(JOB.service, JOB.backup_type)
    reasons = {d.backup_id: d.reason for d in report.staging}
    assert reasons[ids["uploaded_old"]] == "protected: base backup of the retained WAL chain"
    assert "running backup" in reasons[ids["incomplete_old"]]
    assert report.staging_deleted == [ids["corrupt_old"]]


def test_without_an_offsite_store_the_receipt_is_the_evidence(history):
    staging, _, ids = history

    report = prune(JOB, staging, None, NOW, dry_run=False)

    assert ids["receipt_but_not_offsite"] in report.staging_deleted
    assert ids["verified_not_uploaded"] not in report.staging_deleted
    assert report.offsite == []


def test_staging_set_with_unreadable_manifest_is_kept_as_age_unknown(tmp_path, caplog):
    broken = make_set(tmp_path, days_ago(90), SetState.VERIFIED)
    broken.manifest_path.write_text("{not json")
    make_set(tmp_path, days_ago(1), SetState.VERIFIED)

    records = staging_records(tmp_path, JOB.service, JOB.backup_type)
    report = prune(JOB, tmp_path, None, NOW, dry_run=False)

    assert records[0].captured_at is None
    assert broken.path.is_dir() and report.staging_deleted == []
    assert "age unknown" in report.staging[0].reason
    assert any(broken.key in m and "not a valid manifest" in m for m in caplog.messages)


class FlakyOffsite(DirectoryOffsite):
    """The directory store, with one set whose deletion the store refuses."""

    def __init__(self, root: Path, refuse: str):
        super().__init__(root)
        self.refuse = refuse

    def delete_set(self, service: str, backup_type: str, backup_id: str) -> int:
        if backup_id == self.refuse:
            raise PermissionError(f"AccessDenied on {service}/{backup_type}/{backup_id}")
        return super().delete_set(service, backup_type, backup_id)


def test_failed_deletion_is_raised_after_the_rest_is_pruned(history):
    staging, offsite, ids = history
    flaky = FlakyOffsite(offsite.root, refuse=ids["offsite_only_incomplete"])

    refused = ids["offsite_only_incomplete"]
    with pytest.raises(PruneError, match=f"offsite directory .*postgres/full/{refused}.*AccessDenied"):
        prune(JOB, staging, flaky, NOW, dry_run=False)

    assert flaky.list_backup_ids(JOB.service, JOB.backup_type) == sorted(
        [ids["offsite_only_incomplete"], ids["uploaded_newest"]])
    assert not BackupSet(staging, JOB.service, JOB.backup_type, ids["uploaded_old"]).path.exists()


class LockedOffsite(DirectoryOffsite):
    """The directory store, with the retain-until dates (or read errors) an Object Lock store reports."""

    def __init__(self, root: Path, locks: dict[str, datetime | Exception]):
        super().__init__(root)
        self.locks = locks

    def locked_until(self, service: str, backup_type: str, backup_id: str) -> datetime | None:
        lock = self.locks.get(backup_id)
        if isinstance(lock, Exception):
            raise lock
        return lock


def test_prune_keeps_offsite_sets_still_under_object_lock_and_says_until_when(history, caplog):
    staging, offsite, ids = history
    caplog.set_level(logging.INFO, logger="erp_backup.retention")
    until = datetime.now(timezone.utc) + timedelta(days=3)
    locked = LockedOffsite(offsite.root, {ids["uploaded_old"]: until,
                                          ids["offsite_only_incomplete"]: datetime.now(timezone.utc) - timedelta(days=1)})

    report = prune(JOB, staging, locked, NOW, dry_run=True)
    assert [d.backup_id for d in report.offsite if d.delete] == [ids["offsite_only_incomplete"]]
    report = prune(JOB, staging, locked, NOW, dry_run=False)

    assert report.offsite_deleted == [ids["offsite_only_incomplete"]]
    kept = {d.backup_id: d for d in report.offsite}[ids["uploaded_old"]]
    assert not kept.delete and kept.reason.endswith(f"but under Object Lock until {until.isoformat()}: kept until then")
    assert ids["uploaded_old"] in locked.list_backup_ids(JOB.service, JOB.backup_type)
    assert f"keep {ids['uploaded_old']}" in caplog.text

    locked.locks[ids["uploaded_old"]] = PermissionError("AccessDenied on GetObjectRetention")
    report = prune(JOB, staging, locked, NOW, dry_run=False)
    assert report.offsite_deleted == []
    unreadable = {d.backup_id: d for d in report.offsite}[ids["uploaded_old"]]
    assert "its Object Lock could not be read (AccessDenied on GetObjectRetention); kept" in unreadable.reason


# ---- property: random histories on disk ---------------------------------------------------------

@st.composite
def disk_histories(draw):
    """(backup id, staging state or None, offsite copy: None / "complete" / "incomplete", capture days ago)."""
    day_offsets = draw(st.lists(st.integers(0, 90), unique=True, max_size=8))
    sets = []
    for days in day_offsets:
        staging_state = draw(st.sampled_from([None, *(s for s in SetState if s is not SetState.SUSPECT)]))  # offsite-only
        offsite_copy = draw(st.sampled_from([None, "complete", "incomplete"]))
        captured_days = draw(st.integers(0, 90))
        sets.append((days_ago(days), staging_state, offsite_copy, captured_days))
    return sets


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(disk_histories(), st.booleans())
def test_property_dry_run_deletes_nothing_and_real_run_deletes_exactly_the_decisions(sets, with_offsite):
    with tempfile.TemporaryDirectory() as tmp:
        staging, offsite = Path(tmp) / "staging", DirectoryOffsite(Path(tmp) / "offsite")
        for backup_id, staging_state, offsite_copy, captured_days in sets:
            captured_at = NOW - timedelta(days=captured_days)
            backup_set = make_set(staging, backup_id, staging_state or SetState.VERIFIED, captured_at)
            if offsite_copy:
                offsite.upload(backup_set, with_manifest=offsite_copy == "complete")
            if staging_state is None:
                shutil.rmtree(backup_set.path)
        store = offsite if with_offsite else None
        before = tree(staging, offsite.root)

        dry = prune(JOB, staging, store, NOW, dry_run=True)
        assert tree(staging, offsite.root) == before

        real = prune(JOB, staging, store, NOW, dry_run=False)
        assert (real.staging, real.offsite) == (dry.staging, dry.offsite)
        kept_staging = {d.backup_id for d in real.staging if not d.delete}
        assert {s.backup_id for s in list_sets(staging, JOB.service, JOB.backup_type)} == kept_staging
        if with_offsite:
            kept_offsite = {d.backup_id for d in real.offsite if not d.delete}
            assert set(offsite.list_backup_ids(JOB.service, JOB.backup_type)) == kept_offsite
            # A staging set holding data was deleted only while a complete offsite copy exists.
            complete_offsite = {b for b, _, copy, _ in sets if copy == "complete"}
            for backup_id, staging_state, _, _ in sets:
                holds_data = staging_state in (SetState.UNVERIFIED, SetState.VERIFIED, SetState.OFFSITE)
                if holds_data and backup_id in real.staging_deleted:
                    assert staging_state is SetState.OFFSITE and backup_id in complete_offsite


def test_an_upload_in_flight_is_never_pruned_offsite(tmp_path):
    """A backfill: one window's prune must not delete another window's half-uploaded set, however old its id."""
    staging, offsite = tmp_path / "staging", DirectoryOffsite(tmp_path / "offsite")
    uploading = make_set(staging, days_ago(200), SetState.VERIFIED)  # staged, its upload running now
    offsite.upload(uploading, with_manifest=False)  # data objects there, manifest not yet
    abandoned = make_set(staging, days_ago(210), SetState.OFFSITE)
    offsite.upload(abandoned, with_manifest=False)
    shutil.rmtree(abandoned.path)  # nothing staged: an abandoned partial upload
    finished = make_set(staging, days_ago(190), SetState.OFFSITE)  # its receipt was written after the listing
    offsite.upload(finished, with_manifest=False)
    offsite.upload(make_set(staging, days_ago(1), SetState.OFFSITE))

    report = prune(JOB, staging, offsite, NOW, dry_run=False)

    kept = {d.backup_id: d.reason for d in report.offsite if not d.delete}
    assert "upload may be in flight" in kept[uploading.backup_id]
    assert report.offsite_deleted == [abandoned.backup_id]
    assert finished.backup_id in kept
    assert offsite.list_backup_ids(JOB.service, JOB.backup_type) == sorted(
        [uploading.backup_id, finished.backup_id, days_ago(1)])


WRITER = """
import sys
from pathlib import Path
from erp_backup import locks
root = Path(sys.argv[1])
with locks.job_lock(root, "postgres", "full", "backfill__writer"):
    (root / "postgres" / "full" / sys.argv[2]).mkdir(parents=True)
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_a_backup_that_starts_while_offsite_is_listed_is_not_pruned(tmp_path):
    """A backfill: another window's backup takes the job lock and creates its (old-id, incomplete) set while this
    prune lists offsite. Its writer protection is read after the staging listing, so the set is kept."""
    import subprocess
    import sys

    staging = tmp_path / "staging"
    starting = days_ago(270)
    writers: list[subprocess.Popen[str]] = []

    class StartsABackupWhileListed(DirectoryOffsite):
        def list_backup_ids(self, service: str, backup_type: str) -> list[str]:
            if not writers:
                plugins = str(Path(__file__).resolve().parents[2] / "plugins")
                writers.append(subprocess.Popen([sys.executable, "-c", WRITER, str(staging), starting], text=True,
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": plugins}))
                assert writers[0].stdout is not None and writers[0].stdout.readline() == "ready\n"
            return super().list_backup_ids(service, backup_type)

    make_set(staging, days_ago(1), SetState.OFFSITE)
    try:
        report = prune(JOB, staging, StartsABackupWhileListed(tmp_path / "offsite"), NOW, dry_run=False)
        kept = {d.backup_id: d.reason for d in report.staging if not d.delete}
        assert "job is locked" in kept[starting], report.staging
        assert (staging / "postgres" / "full" / starting).is_dir()
    finally:
        for writer in writers:
            writer.communicate("", timeout=30)
