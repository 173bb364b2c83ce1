"""Milvus etcd snapshots against a real etcd: snapshot → verify → restore into a new data dir → read back."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from erp_backup.manifest import sha256_file
from erp_backup.runner import Command, CommandError, LocalExecutor
from erp_backup.scratch.base import free_port
from erp_backup.scratch.etcd import ScratchEtcd, default_pid_file, start_scratch_etcd
from erp_backup.services import milvus
from erp_backup.services.base import CheckContext, SourceUnavailable
from tests.fixtures.milvus import (
    ETCD_CONN_ID,
    FILLER_ETCD_KEYS,
    KNOWN_ETCD_KEY,
    KNOWN_ETCD_VALUE,
    Backup,
    etcd_connection,
    etcd_get,
    etcd_revision,
    make_context,
    write_outcome_manifest,
)

pytestmark = pytest.mark.integration


def _backup(root: Path, connection) -> Backup:
    ctx = make_context("etcd", root, {ETCD_CONN_ID: connection})
    started = datetime.now(timezone.utc)
    clock = time.monotonic()
    outcome = milvus.backup(ctx)
    seconds = time.monotonic() - clock
    manifest = write_outcome_manifest(ctx, outcome, started, datetime.now(timezone.utc))
    return Backup(ctx.backup_set, manifest, outcome, seconds)


def test_snapshot_verify_restore_and_read_back(etcd_server: ScratchEtcd, tmp_path: Path) -> None:
    backup = _backup(tmp_path / "backups", etcd_connection(etcd_server.endpoint))

    [entry] = backup.outcome.files
    assert entry.path == "etcd/snapshot.db.zst"
    assert sha256_file(backup.backup_set.path / entry.path) == (entry.size, entry.sha256)
    assert (backup.backup_set.path / entry.path).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in backup.backup_set.path.iterdir()) == ["etcd", "manifest.json"]  # temp file gone
    snapshot = backup.outcome.details["snapshot"]
    assert snapshot["total_keys"] >= 1 + FILLER_ETCD_KEYS
    assert snapshot["revision"] == etcd_revision(etcd_server.endpoint)
    assert entry.size < snapshot["total_size"]  # zstd pays off on a bbolt file
    assert backup.outcome.tools["etcdctl"].startswith("3.")
    assert backup.manifest.source == {"conn_id": ETCD_CONN_ID, "endpoint": etcd_server.endpoint}

    assert milvus.verify(backup.backup_set, backup.manifest) == []

    data_dir = tmp_path / "restored-etcd"
    report = milvus.restore(backup.backup_set.path, backup.manifest, data_dir)
    assert report.details["snapshot"]["hash"] == snapshot["hash"] and report.details["data_dir"] == str(data_dir)
    assert (data_dir / "member" / "wal").is_dir()
    with start_scratch_etcd(data_dir) as restored:
        assert restored.endpoint != etcd_server.endpoint
        assert etcd_get(restored.endpoint, KNOWN_ETCD_KEY) == KNOWN_ETCD_VALUE
        assert etcd_get(restored.endpoint, "by-dev/meta/datacoord-meta/s/00499") is not None
    assert not restored.pid_file.exists()


def test_verify_names_a_corrupt_snapshot_and_a_changed_revision(etcd_server: ScratchEtcd, tmp_path: Path) -> None:
    backup = _backup(tmp_path / "backups", etcd_connection(etcd_server.endpoint))
    details = dict(backup.manifest.details, snapshot={**backup.outcome.details["snapshot"], "revision": 1})
    problems = milvus.verify(backup.backup_set, replace(backup.manifest, details=details))
    assert problems == [
        f"backup {backup.backup_set.key}: snapshot revision is {backup.outcome.details['snapshot']['revision']}, "
        "the manifest says 1"
    ]

    (backup.backup_set.path / "etcd" / "snapshot.db.zst").write_bytes(b"\x28\xb5\x2f\xfdnot a zstd frame")
    [problem] = milvus.verify(backup.backup_set, backup.manifest)
    assert "etcd/snapshot.db.zst is not a readable etcd snapshot" in problem
    assert not list(backup.backup_set.path.parent.glob(".*verify*"))  # scratch space removed


def test_restore_refuses_an_existing_data_dir_and_dry_run_touches_nothing(
    etcd_server: ScratchEtcd, tmp_path: Path
) -> None:
    backup = _backup(tmp_path / "backups", etcd_connection(etcd_server.endpoint))
    existing = tmp_path / "etcd-data"
    existing.mkdir()
    with pytest.raises(milvus.RestoreConflict, match=f"etcd data dir {existing} already exists"):
        milvus.restore(backup.backup_set.path, backup.manifest, existing)
    planned = milvus.restore(backup.backup_set.path, backup.manifest, tmp_path / "new-data", dry_run=True)
    assert planned.dry_run is True and not (tmp_path / "new-data").exists()


def test_credentials_travel_in_the_environment(tmp_path: Path) -> None:
    with start_scratch_etcd(tmp_path / "etcd-auth") as etcd:
        executor = LocalExecutor()
        env = {"ETCDCTL_API": "3"}
        executor.run(Command(("etcdctl", f"--endpoints={etcd.endpoint}", "user", "add", "root:etcd-Secret-1"), env))
        executor.run(Command(("etcdctl", f"--endpoints={etcd.endpoint}", "auth", "enable"), env))

        backup = _backup(tmp_path / "ok", etcd_connection(etcd.endpoint, login="root", password="etcd-Secret-1"))
        assert backup.outcome.details["snapshot"]["total_keys"] >= 1
        assert "etcd-Secret-1" not in (backup.backup_set.path / "manifest.json").read_text()

        with pytest.raises(CommandError, match="authentication failed"):
            _backup(tmp_path / "bad", etcd_connection(etcd.endpoint, login="root", password="wrong"))
        assert not list((tmp_path / "bad").rglob(".etcd-snapshot.db*"))  # no temp file left behind


def test_unreachable_etcd_names_connection_and_endpoint(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SourceUnavailable, match=f"etcd connection '{ETCD_CONN_ID}' \\({endpoint}\\) is unreachable"):
        _backup(tmp_path, etcd_connection(endpoint))


def test_the_drill_check_starts_etcd_on_the_restored_dir_and_stops_it(etcd_server: ScratchEtcd, tmp_path: Path) -> None:
    backup = _backup(tmp_path / "backups", etcd_connection(etcd_server.endpoint))
    snapshot = backup.outcome.details["snapshot"]
    data_dir = tmp_path / "restored-etcd"
    report = milvus.restore(backup.backup_set.path, backup.manifest, data_dir)
    assert report.problems == [] and report.details["restored"] is True
    assert report.restored_bytes == snapshot["total_size"] and report.actions[0].startswith("decompress etcd/snapshot.db.zst")

    guarded: list[tuple[str, int]] = []
    context = CheckContext(guard=lambda host, port: guarded.append((host, port)))
    found = milvus.check_restored(str(data_dir), backup.backup_set.path, backup.manifest, report, context)
    assert found.problems == []
    assert found.checks[0] == f"revision {snapshot['revision']} matches the snapshot"
    assert [host for host, _ in guarded] == ["127.0.0.1"] and guarded[0][1] != urlsplit(etcd_server.endpoint).port
    assert not default_pid_file(data_dir).exists()  # the scratch etcd was stopped

    missing = milvus.check_restored(str(tmp_path / "never-restored"), backup.backup_set.path, backup.manifest, report,
                                    context)
    assert missing.problems == [f"etcd data dir {tmp_path / 'never-restored'} does not exist: the snapshot was not restored"]


def test_a_snapshot_that_differs_from_its_manifest_is_reported_and_not_restored(
    etcd_server: ScratchEtcd, tmp_path: Path
) -> None:
    backup = _backup(tmp_path / "backups", etcd_connection(etcd_server.endpoint))
    actual = backup.outcome.details["snapshot"]
    tampered = replace(backup.manifest, details={**backup.manifest.details, "snapshot": {**actual, "total_keys": 1}})
    report = milvus.restore(backup.backup_set.path, tampered, tmp_path / "etcd-data")
    assert report.problems == [
        f"backup {backup.manifest.backup_id}: snapshot total_keys is {actual['total_keys']}, the manifest says 1"
    ]
    assert report.details["restored"] is False and not (tmp_path / "etcd-data").exists()
