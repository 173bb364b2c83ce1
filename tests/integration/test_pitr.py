"""PITR on real clusters: snapshot, WAL shipping, gaps, backfill, archiver health, restore to a time.

One module-scoped history: a cluster archiving through archive_wal.sh, a base
backup, bulk WAL, rows committed at T1, the target T, rows committed at T2
(pg_switch_wal between), and one WAL set over the whole window.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pyrage import x25519

from erp_backup.manifest import Manifest, sha256_file
from erp_backup.scratch.base import scratch_root
from erp_backup.scratch.postgres import ScratchPostgres
from erp_backup.services import postgres
from erp_backup.services.base import CheckContext, RestoreReport
from erp_backup.services.postgres import pitr as postgres_pitr
from erp_backup.services.postgres import segments as wal_names
from erp_backup.services.postgres import snapshot as postgres_snapshot
from erp_backup.services.postgres import wal as postgres_wal
from erp_backup.services.postgres.chain import chain_protection
from erp_backup.services.postgres.pitr import TargetOutsideArchive, restore_to_time
from erp_backup.services.postgres.segments import Segment
from erp_backup.services.postgres.wal import ArchiverError, WalGapError
from erp_backup.services.postgres.wal import read_archive_log
from erp_backup.sets import BackupSet, list_sets
from tests.conftest import AGE_KEYS
from tests.fixtures.pitr import (
    ARCHIVE_SUBDIR,
    ArchivingCluster,
    make_backup_root,
    manual_run,
    postgres_job,
    take_backup,
    wait_until_after,
    wal_job,
    wal_run,
)

pytestmark = pytest.mark.integration

BULK_ROWS = int(os.environ.get("ERP_PITR_TEST_ROWS", "200000"))
UTC = timezone.utc


@dataclass
class History:
    pg: ArchivingCluster
    base_set: BackupSet
    base: Manifest
    wal_set: BackupSet
    wal: Manifest
    target: datetime
    window: tuple[datetime, datetime]


def rows_by_phase(cluster: ScratchPostgres) -> dict[str, int]:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as db:
        return dict(db.execute("SELECT phase, count(*) FROM ledger GROUP BY phase").fetchall())


@pytest.fixture(scope="module")
def history(archiving_pg: ArchivingCluster) -> History:
    pg = archiving_pg
    window_start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    pg.sql("CREATE TABLE ledger (id bigserial PRIMARY KEY, phase text NOT NULL, payload text)")
    pg.sql("INSERT INTO ledger (phase) VALUES ('before-base')")
    base_set, base = take_backup(
        postgres_snapshot, postgres_job("snapshot"), pg.root, manual_run("backup_postgres_snapshot"), pg.connection()
    )
    pg.sql(
        "INSERT INTO ledger (phase, payload) SELECT 'bulk', repeat(md5(g::text), 4) FROM generate_series(1, %s) g",
        (BULK_ROWS,),
    )
    pg.sql("INSERT INTO ledger (phase) SELECT 't1' FROM generate_series(1, 10)")
    pg.switch_wal()
    target = pg.sql("SELECT clock_timestamp()")[0][0]
    pg.sql("INSERT INTO ledger (phase) SELECT 't2' FROM generate_series(1, 10)")
    pg.switch_wal()
    window_end = datetime.now(UTC)
    wal_set, wal = take_backup(postgres_wal, wal_job(pg.root), pg.root, wal_run(window_start, window_end), pg.connection())
    return History(pg, base_set, base, wal_set, wal, target, (window_start, window_end))


def copy_archive(source: ArchivingCluster, root: Path) -> Path:
    archive = root / ARCHIVE_SUBDIR
    shutil.rmtree(archive)
    shutil.copytree(source.archive_dir, archive)
    return archive


# --- snapshot ----------------------------------------------------------------------------------


def test_snapshot_records_its_wal_range_and_passes_pg_verifybackup(history: History) -> None:
    details = history.base.details
    assert [f.path for f in history.base.files] == ["base.tar.zst"]
    assert details["verification"]["status"] == "ok", details["verification"]
    assert "backup successfully verified" in details["verification"]["output"]
    start, end = Segment.parse(details["start_segment"]), Segment.parse(details["end_segment"])
    assert start.timeline == end.timeline == details["timeline"] == 1
    assert Segment.of_lsn(wal_names.parse_lsn(details["start_lsn"]), 1).name == details["start_segment"]
    assert wal_names.parse_lsn(details["start_lsn"]) < wal_names.parse_lsn(details["end_lsn"])
    assert details["system_identifier"] and details["wal_segment_size"] == 16 * 1024 * 1024
    assert postgres_snapshot.verify(history.base_set, history.base) == []


def test_snapshot_verify_reports_a_damaged_archive(history: History, tmp_path: Path) -> None:
    damaged = BackupSet(tmp_path, "postgres", "snapshot", history.base.backup_id)
    shutil.copytree(history.base_set.path, damaged.path)
    with open(damaged.path / "base.tar.zst", "r+b") as handle:
        handle.seek(4096)
        handle.write(b"\0" * 4096)
    problems = postgres_snapshot.verify(damaged, history.base)
    assert problems and "base.tar.zst" in problems[0]


def test_snapshot_restore_alone_reaches_the_backup_end(history: History, scratch_cluster: Any) -> None:
    cluster = scratch_cluster("base-only")
    report = postgres_snapshot.restore(history.base_set.path, history.base, cluster)
    assert rows_by_phase(cluster) == {"before-base": 1}
    assert report["end_lsn"] == history.base.details["end_lsn"] and report["port"] == cluster.port
    with psycopg.connect(cluster.conninfo(), autocommit=True) as db:
        assert db.execute("SHOW archive_mode").fetchone() == ("off",)


# --- WAL shipping ------------------------------------------------------------------------------


def test_wal_set_ships_every_segment_of_the_window_with_its_details(history: History) -> None:
    details = history.wal.details
    archived = {line.split()[1]: line.split() for line in history.pg.archive_log_lines()}
    shipped = {record["name"]: record for record in details["wal"]}
    assert set(shipped) == set(archived)
    assert any(name.endswith(".backup") for name in shipped)
    for name, record in shipped.items():
        assert record["raw_sha256"] == archived[name][2] and record["raw_size"] == int(archived[name][3])
        assert history.wal.file(record["file"]).sha256 == sha256_file(history.wal_set.path / record["file"])[1]
    segments = sorted(n for n in shipped if len(n) == 24)
    assert details["first_segment"] == segments[0] and details["last_segment"] == segments[-1]
    assert details["segment_count"] == len(segments) == Segment.parse(segments[-1]).segno - Segment.parse(segments[0]).segno + 1
    assert details["start_lsn"] == wal_names.format_lsn(Segment.parse(segments[0]).start_lsn)
    assert details["end_lsn"] == wal_names.format_lsn(Segment.parse(segments[-1]).end_lsn)
    assert details["timeline"] == 1
    check = details["archive_check"]
    assert check["status"] == "ok" and check["continuity"]["status"] == "ok"
    assert check["archiver"]["failed_count"] == 0 and check["archiver"]["archive_mode"] == "on"
    assert postgres_wal.verify(history.wal_set, history.wal) == []


def test_deleted_segment_in_the_middle_fails_with_a_gap_error(history: History) -> None:
    root = make_backup_root()
    try:
        archive = copy_archive(history.pg, root)
        segments = sorted(r["name"] for r in history.wal.details["wal"] if r["kind"] == "segment")
        lost = segments[len(segments) // 2]
        (archive / lost).unlink()
        with pytest.raises(WalGapError, match=lost):
            take_backup(postgres_wal, wal_job(root), root, wal_run(*history.window), history.pg.connection())

        # The same hole with its archive.log line gone too: found by the sequence check alone.
        log_file = archive / "archive.log"
        log_file.write_text("".join(line + "\n" for line in log_file.read_text().splitlines() if lost not in line))
        with pytest.raises(WalGapError, match=f"missing {lost}"):
            take_backup(postgres_wal, wal_job(root), root, wal_run(*history.window), history.pg.connection())
    finally:
        shutil.rmtree(root)


def test_gap_after_the_previous_set_is_named(history: History) -> None:
    root = make_backup_root()
    try:
        archive = copy_archive(history.pg, root)
        lines = (archive / "archive.log").read_text().splitlines()
        segments = sorted(line.split()[1] for line in lines if len(line.split()[1]) == 24)
        first_window, lost = segments[:2], segments[2]
        # Rewrite archive times: the first two segments in window 1, the rest in window 2.
        w1 = datetime(2026, 1, 10, 0, 0, tzinfo=UTC)
        rewritten = [
            " ".join([(w1 + timedelta(hours=1 if line.split()[1] in first_window else 7)).strftime("%Y-%m-%dT%H:%M:%SZ"), *line.split()[1:]])
            for line in lines
        ]
        (archive / "archive.log").write_text("\n".join(rewritten) + "\n")
        (archive / lost).unlink()
        job = wal_job(root, check_archiver=False)
        take_backup(postgres_wal, job, root, wal_run(w1, w1 + timedelta(hours=6)), None)
        with pytest.raises(WalGapError, match=f"after {first_window[-1]} .*missing {lost}"):
            take_backup(postgres_wal, job, root, wal_run(w1 + timedelta(hours=6), w1 + timedelta(hours=12)), None)
    finally:
        shutil.rmtree(root)


def test_backfilled_windows_ship_each_segment_once_and_reruns_are_identical(history: History) -> None:
    root = make_backup_root()
    try:
        archive = copy_archive(history.pg, root)
        lines = (archive / "archive.log").read_text().splitlines()
        day = datetime(2026, 1, 10, tzinfo=UTC)
        windows = [(day + timedelta(hours=6 * k), day + timedelta(hours=6 * (k + 1))) for k in range(3)]
        # Spread the archived files over three past 6-hour windows, in archive order.
        spread = []
        for index, line in enumerate(lines):
            start = windows[index * 3 // len(lines)][0]
            spread.append(" ".join([(start + timedelta(minutes=index)).strftime("%Y-%m-%dT%H:%M:%SZ"), *line.split()[1:]]))
        (archive / "archive.log").write_text("\n".join(spread) + "\n")
        expected = [{line.split()[1] for line in spread if start <= datetime.fromisoformat(line.split()[0]) < end} for start, end in windows]

        job = wal_job(root)
        manifests = {}
        for start, end in reversed(windows):  # a backfill may run in any order
            _, manifest = take_backup(postgres_wal, job, root, wal_run(start, end), history.pg.connection())
            manifests[end] = manifest
        shipped = [{r["name"] for r in manifests[end].details["wal"]} for _, end in windows]
        assert shipped == expected
        assert all(shipped) and set().union(*shipped) == {line.split()[1] for line in lines}
        assert sum(len(s) for s in shipped) == len(lines)
        assert [m.backup_id for m in manifests.values()] == ["20260110T180000Z", "20260110T120000Z", "20260110T060000Z"]
        assert manifests[windows[1][1]].details["archive_check"]["continuity"]["previous_set"] is None

        rerun_start, rerun_end = windows[1]
        _, rerun = take_backup(postgres_wal, job, root, wal_run(rerun_start, rerun_end), history.pg.connection())
        assert rerun.backup_id == manifests[rerun_end].backup_id
        # Now the earlier window exists, so the rerun also checks continuity from it.
        assert rerun.details["archive_check"]["continuity"]["previous_set"] == "20260110T060000Z"
        assert [(f.path, f.size, f.sha256) for f in rerun.files] == [(f.path, f.size, f.sha256) for f in manifests[rerun_end].files]
        assert len(list_sets(root, "postgres", "wal")) == 3
    finally:
        shutil.rmtree(root)


def test_a_window_that_has_not_closed_is_refused(history: History, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    with pytest.raises(postgres_wal.WalBackupError, match="has not closed yet"):
        take_backup(postgres_wal, wal_job(tmp_path), tmp_path, wal_run(now, now + timedelta(hours=6)), history.pg.connection())


def test_failing_archiver_fails_the_backup_and_a_recovered_one_is_recorded(archiving_pg_factory: Any) -> None:
    pg: ArchivingCluster = archiving_pg_factory(name="archfail")
    job = wal_job(pg.root)
    pg.switch_wal()
    first_end = datetime.now(UTC)
    take_backup(postgres_wal, job, pg.root, wal_run(first_end - timedelta(hours=6), first_end), pg.connection())

    pg.sql("CREATE TABLE t AS SELECT 1 AS x")
    current = pg.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]
    (pg.archive_dir / current).write_bytes(b"not this segment")
    pg.sql("SELECT pg_switch_wal()")
    deadline = datetime.now(UTC) + timedelta(seconds=60)
    while pg.sql("SELECT failed_count FROM pg_stat_archiver")[0][0] == 0:
        assert datetime.now(UTC) < deadline, "the archiver never reported the failure"
        time.sleep(0.1)
    assert "DIFFERENT content" in pg.cluster.server_log()

    wait_until_after(first_end)
    second_end = datetime.now(UTC)
    second = wal_run(second_end - timedelta(hours=6), second_end)
    with pytest.raises(ArchiverError, match=f"WAL archiving is failing: last failure on {current}"):
        take_backup(postgres_wal, job, pg.root, second, pg.connection())

    (pg.archive_dir / current).unlink()
    pg.sql("SELECT pg_reload_conf()")  # wakes the archiver for an immediate retry
    pg.wait_archived(current)
    _, manifest = take_backup(postgres_wal, job, pg.root, second, pg.connection())  # the cleared task reruns
    check = manifest.details["archive_check"]
    assert check["status"] == "warning" and check["failed_count_grew_by"] >= 1
    assert any("failed_count grew" in w for w in check["warnings"])
    assert check["archiver"]["failed_count"] >= 1 and check["archiver"]["last_failed_wal"] == current


def test_local_archive_is_pruned_only_after_an_offsite_verified_set_holds_the_file(history: History) -> None:
    root = make_backup_root()
    try:
        archive = copy_archive(history.pg, root)
        staged = BackupSet(root, "postgres", "wal", history.wal.backup_id)
        shutil.copytree(history.wal_set.path, staged.path)
        (archive / "00000001000000000000FFFF").write_bytes(b"x")  # never shipped: must stay
        later = datetime.now(UTC) + timedelta(days=3)
        assert postgres_wal.prune_local_archive(root, archive, later, timedelta(days=2), dry_run=False) == []  # not offsite yet

        (staged.path / "SHA256SUMS").write_text("verified by the checksum task\n")
        staged.write_offsite_receipt({"verified": True})
        shipped = {r["name"] for r in history.wal.details["wal"]}
        assert set(postgres_wal.prune_local_archive(root, archive, later, timedelta(days=2), dry_run=True)) == shipped
        assert all((archive / name).exists() for name in shipped)  # dry run deletes nothing
        assert postgres_wal.prune_local_archive(root, archive, later, timedelta(days=5), dry_run=False) == []  # too recent
        removed = postgres_wal.prune_local_archive(root, archive, later, timedelta(days=2), dry_run=False)
        assert set(removed) == shipped and not any((archive / name).exists() for name in shipped)
        assert (archive / "00000001000000000000FFFF").exists() and (archive / "archive.log").exists()

        with pytest.raises(WalGapError, match="set is safe offsite"):
            take_backup(postgres_wal, wal_job(root), root, wal_run(*history.window), history.pg.connection())
    finally:
        shutil.rmtree(root)


def test_unreachable_server_is_source_unavailable_naming_the_connection(history: History, tmp_path: Path) -> None:
    from airflow.sdk import Connection

    from erp_backup.scratch.base import free_port
    from erp_backup.services.base import SourceUnavailable

    closed = Connection(conn_id="erp_postgres", conn_type="postgres", host="127.0.0.1", port=free_port(), login="postgres")
    (tmp_path / ARCHIVE_SUBDIR).mkdir()
    now = datetime.now(UTC)
    with pytest.raises(SourceUnavailable, match=r"'erp_postgres' at 127\.0\.0\.1"):
        take_backup(postgres_wal, wal_job(tmp_path), tmp_path, wal_run(now - timedelta(hours=6), now), closed)
    with pytest.raises(SourceUnavailable, match=r"pg_basebackup cannot reach PostgreSQL connection 'erp_postgres' at 127\.0\.0\.1"):
        take_backup(postgres_snapshot, postgres_job("snapshot"), tmp_path, manual_run("backup_postgres_snapshot"), closed)


# --- chain retention on real manifests ---------------------------------------------------------


def test_chain_protection_keeps_the_base_and_its_wal_once_they_age(history: History) -> None:
    later = datetime.now(UTC) + timedelta(days=30)
    protected = chain_protection(history.pg.root, later, timedelta(days=7))
    assert set(protected["snapshot"]) == {history.base.backup_id}
    assert set(protected["wal"]) == {history.wal.backup_id}
    assert history.base.backup_id in protected["wal"][history.wal.backup_id]


# --- point-in-time restore ---------------------------------------------------------------------


def test_pitr_to_T_has_the_T1_rows_and_not_the_T2_rows(history: History, scratch_cluster: Any) -> None:
    cluster = scratch_cluster("pitr")
    report = restore_to_time(history.target, root=history.pg.root, cluster=cluster, use_local_archive=False)
    assert rows_by_phase(cluster) == {"before-base": 1, "bulk": BULK_ROWS, "t1": 10}
    assert report["base_backup_id"] == history.base.backup_id
    assert report["wal_sets"] == [history.wal.backup_id] and report["wal_from_local_archive"] == 0
    assert report["recovered_to_end_of_wal"] is False and "recovery stopping before commit" in report["stop"]
    assert datetime.fromisoformat(report["last_replayed_commit"]) <= history.target
    assert report["wal_bytes_replayed"] > BULK_ROWS * 100
    print("\nPITR replay:", json.dumps({k: report[k] for k in ("wal_bytes_replayed", "redo_seconds", "wall_seconds", "replay_mb_per_s")}))


def test_service_verbs_plan_restore_and_check_a_point_in_time(history: History, scratch_cluster: Any) -> None:
    chain = postgres.plan_point_in_time([history.wal, history.base], history.target)
    assert chain.sets == (("snapshot", history.base.backup_id), ("wal", history.wal.backup_id))
    assert chain.base.backup_id == history.base.backup_id and chain.replay_bytes == history.wal.total_size

    dry = postgres.restore_to_time(history.pg.root, history.target, None, dry_run=True)
    assert dry.dry_run and dry.restored_bytes == 0 and dry.details["base_backup_id"] == history.base.backup_id
    assert dry.actions[0].startswith(f"restore base backup {history.base.backup_id}")

    cluster = scratch_cluster("pitr-verb")
    report = postgres.restore_to_time(history.pg.root, history.target, cluster, owner="pytest")
    assert rows_by_phase(cluster) == {"before-base": 1, "bulk": BULK_ROWS, "t1": 10}
    assert report.problems == [] and report.restored_bytes == report.details["wal_bytes_replayed"] > 0
    assert "recovery stopping before commit" in report.details["stop"]
    assert datetime.fromisoformat(report.details["last_replayed_commit"]) <= history.target

    ctx = CheckContext(guard=lambda host, port: None, at=history.target)
    found = postgres.check_restored(cluster, history.base_set.path, history.base, report, ctx)
    assert found.problems == []
    assert "recovery finished and the cluster was promoted" in found.checks
    assert any(check.startswith("last replayed commit") and "<= target" in check for check in found.checks)
    late = (history.target + timedelta(minutes=1)).isoformat()
    claimed = RestoreReport(details={**report.details, "last_replayed_commit": late})
    assert postgres.check_restored(cluster, history.base_set.path, history.base, claimed, ctx).problems == [
        f"last replayed commit {late} is after the target time {history.target.isoformat()}"]


def test_pitr_from_offsite_after_the_last_commit_replays_all_wal(history: History, scratch_cluster: Any, tmp_path: Path) -> None:
    class DirectoryOffsite:
        """The offsite interface over a plain directory copy of the sets."""

        def __init__(self, root: Path):
            self.root = root
            self.fetched: list[str] = []

        def list_backup_ids(self, service: str, backup_type: str) -> list[str]:
            return sorted(p.name for p in (self.root / service / backup_type).iterdir())

        def read_manifest(self, service: str, backup_type: str, backup_id: str) -> Manifest | None:
            return Manifest.read(self.root / service / backup_type / backup_id / "manifest.json")

        def fetch_set(self, service: str, backup_type: str, backup_id: str, dest: Path) -> Manifest:
            self.fetched.append(f"{backup_type}/{backup_id}")
            shutil.copytree(self.root / service / backup_type / backup_id, dest, dirs_exist_ok=True)
            return Manifest.read(dest / "manifest.json")

    remote = tmp_path / "offsite"
    for backup_set in (history.base_set, history.wal_set):
        shutil.copytree(backup_set.path, remote / backup_set.key)
    offsite = DirectoryOffsite(remote)
    last_archived = datetime.fromisoformat(history.wal.details["last_archived_at"])
    cluster = scratch_cluster("pitr-offsite")
    report = restore_to_time(last_archived, root=tmp_path / "empty-staging", cluster=cluster, offsite=offsite)
    assert rows_by_phase(cluster)["t2"] == 10
    assert report["recovered_to_end_of_wal"] is True
    assert sorted(offsite.fetched) == [f"snapshot/{history.base.backup_id}", f"wal/{history.wal.backup_id}"]


def test_wal_set_restore_verb_targets_the_end_of_its_window(history: History, tmp_path: Path) -> None:
    plan = postgres_pitr.restore(history.wal_set.path, history.wal, tmp_path / "cluster", dry_run=True, use_local_archive=False)
    assert plan["dry_run"] is True and plan["base_backup_id"] == history.base.backup_id
    assert plan["target_time"] == history.wal.details["last_archived_at"] and plan["wal_sets"] == [history.wal.backup_id]


def test_pitr_rejects_a_target_outside_the_archive(history: History) -> None:
    for target in (history.base.captured_started_at - timedelta(hours=1), datetime.now(UTC) + timedelta(days=1)):
        with pytest.raises(TargetOutsideArchive, match=r"outside what the backups cover: \d{4}-.* \.\. \d{4}-") as caught:
            restore_to_time(target, root=history.pg.root, use_local_archive=False)
        assert history.base.details["backup_end_time"][:16] in str(caught.value)


def test_runbook_script_dry_run_and_coverage(history: History) -> None:
    script = Path(__file__).resolve().parents[2] / "include" / "scripts" / "pitr_restore.sh"
    env = {**os.environ, "ERP_PYTHON": sys.executable}
    where = ["--root", str(history.pg.root), "--archive-dir", str(history.pg.archive_dir)]
    done = subprocess.run([str(script), *where, "--target-time", history.target.isoformat(), "--dry-run"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert (plan["dry_run"], plan["base_backup_id"], plan["wal_sets"]) == (True, history.base.backup_id, [history.wal.backup_id])
    coverage = subprocess.run([str(script), "coverage", *where], capture_output=True, text=True, env=env)
    assert coverage.returncode == 0 and history.base.backup_id in json.loads(coverage.stdout)[0]
    outside = subprocess.run([str(script), *where, "--target-time", "2020-01-01T00:00:00+09:00"], capture_output=True, text=True, env=env)
    assert outside.returncode == 2 and "outside what the backups cover" in outside.stderr


def test_pitr_refuses_a_base_whose_checksum_does_not_match(history: History, scratch_cluster: Any) -> None:
    root = make_backup_root()
    try:
        for backup_set in (history.base_set, history.wal_set):
            shutil.copytree(backup_set.path, root / backup_set.key)
        with open(root / history.base_set.key / "base.tar.zst", "r+b") as handle:
            handle.seek(100)
            handle.write(b"corrupt")
        with pytest.raises(Exception, match="base.tar.zst does not match its manifest"):
            restore_to_time(history.target, root=root, cluster=scratch_cluster("pitr-bad"), use_local_archive=False)
    finally:
        shutil.rmtree(root)


def test_runbook_script_restores_through_a_sealed_archive_with_the_identity_file(archiving_pg_factory, tmp_path: Path) -> None:
    """archive_wal.sh sealed the segments on the database host; pitr_restore.sh --identity FILE opens them."""
    pg = archiving_pg_factory(name="pitr-sealed", sealed=True)
    pg.sql("CREATE TABLE ledger (id bigserial PRIMARY KEY, phase text NOT NULL)")
    take_backup(postgres_snapshot, postgres_job("snapshot"), pg.root, manual_run("backup_postgres_snapshot"), pg.connection())
    pg.sql("INSERT INTO ledger (phase) SELECT 't1' FROM generate_series(1, 10)")
    pg.switch_wal()
    target = pg.sql("SELECT clock_timestamp()")[0][0]
    pg.sql("INSERT INTO ledger (phase) VALUES ('t2')")
    pg.switch_wal()
    segments = [e for e in read_archive_log(pg.archive_dir) if wal_names.wal_file_kind(e.name) == "segment"]
    assert segments and all(e.sealed and not (pg.archive_dir / e.name).exists() for e in segments)

    script = Path(__file__).resolve().parents[2] / "include" / "scripts" / "pitr_restore.sh"
    env = {**os.environ, "ERP_PYTHON": sys.executable}
    where = ["--root", str(pg.root), "--archive-dir", str(pg.archive_dir), "--target-time", target.isoformat()]
    stranger = tmp_path / "stranger.key"
    stranger.write_text(f"{x25519.Identity.generate()}\n")
    before = set(scratch_root().glob("erp-scratch-pitr-*"))
    refused = subprocess.run([str(script), *where, "--identity", str(stranger)], capture_output=True, text=True, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "in the local WAL archive was sealed on the database host" in refused.stderr
    assert set(scratch_root().glob("erp-scratch-pitr-*")) == before  # the half-staged cluster was removed

    mine = tmp_path / "mine.key"
    mine.write_text(f"{AGE_KEYS.identity}\n")
    done = subprocess.run([str(script), *where, "--identity", str(mine)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    cluster = ScratchPostgres(Path(report["data_dir"]).parent, port=report["port"])
    try:
        assert report["wal_from_local_archive"] > 0 and report["wal_sets"] == []
        assert rows_by_phase(cluster) == {"t1": 10}
    finally:
        cluster.destroy()
