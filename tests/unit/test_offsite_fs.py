"""The filesystem (NAS) offsite store: upload, verify, fetch, list, delete and ledger files on tmp dirs."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from erp_backup.checksum import ChecksumMismatch
from erp_backup.manifest import FileEntry, sha256_file, write_atomic, write_manifest
from erp_backup.offsite import (
    FilesystemOffsite,
    Offsite,
    OffsiteError,
    S3Offsite,
    offsite_from_plan,
)
from erp_backup.plan import DEFAULT_PLAN_PATH, OFFSITE_PATH_ENV, parse_plan
from erp_backup.sets import SUMS_NAME, BackupSet, SetState
from tests.fixtures.factories import make_manifest

BACKUP_ID = "20260101T020000Z"


def make_verified_set(
    root: Path,
    files: dict[str, bytes],
    *,
    service: str = "postgres",
    backup_type: str = "full",
    backup_id: str = BACKUP_ID,
    captured: tuple[datetime, datetime] | None = None,
) -> BackupSet:
    """A real local set: data files, manifest and SHA256SUMS, so its state is VERIFIED.

    `captured` is (start, end) of the capture; by default 2026-01-01 02:00 to 02:03 UTC.
    """
    backup_set = BackupSet(root, service, backup_type, backup_id)
    backup_set.create_dir()
    entries = []
    for relative, data in files.items():
        path = backup_set.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        size, sha256 = sha256_file(path)
        entries.append(FileEntry(relative, size, sha256))
    default_start = datetime(2026, 1, 1, 2, 0, tzinfo=timezone.utc)
    started, finished = captured or (default_start, default_start + timedelta(minutes=3))
    write_manifest(backup_set.path, make_manifest(
        service=service, backup_type=backup_type, backup_id=backup_id,
        captured_started_at=started, captured_finished_at=finished,
        source={"host": "db.test"}, tools={"pg_dump": "15"}, files=entries,
    ))
    write_atomic(backup_set.path / SUMS_NAME, "".join(f"{e.sha256}  {e.path}\n" for e in entries).encode())
    assert backup_set.state is SetState.VERIFIED
    return backup_set


def flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


FILES = {"globals.sql.zst": b"roles" * 100, "db/erp.dump.zst": os.urandom(300_000), "db/empty.zst": b""}


@pytest.fixture
def nas(tmp_path: Path) -> FilesystemOffsite:
    root = tmp_path / "nas"
    root.mkdir()
    return FilesystemOffsite(root)


@pytest.fixture
def local_set(tmp_path: Path) -> BackupSet:
    return make_verified_set(tmp_path / "staging", FILES)


def test_upload_copies_the_set_verifies_it_and_marks_it_offsite(nas: FilesystemOffsite, local_set: BackupSet) -> None:
    report = nas.upload_set(local_set)

    base = f"postgres/full/{BACKUP_ID}"
    assert report.uploaded == [f"{base}/{name}" for name in [*FILES, SUMS_NAME, "manifest.json"]]
    assert report.skipped == [] and report.verified
    local_bytes = sum(len(data) for data in FILES.values())
    local_bytes += (local_set.path / SUMS_NAME).stat().st_size + local_set.manifest_path.stat().st_size
    assert report.bytes_uploaded == local_bytes
    for relative, data in FILES.items():
        copy = nas.root / base / relative
        assert copy.read_bytes() == data
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    for directory in (nas.root / "postgres", nas.root / base, nas.root / base / "db"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert not list((nas.root / base).glob(".*"))  # no temp files left

    assert local_set.state is SetState.OFFSITE
    receipt = local_set.offsite_receipt()
    assert receipt["description"] == nas.description == nas.root.as_uri()
    assert receipt["keys"] == report.uploaded and receipt["bytes"] == local_bytes
    assert nas.verify_set("postgres", "full", BACKUP_ID, local_set.manifest()) == []
    assert isinstance(nas, Offsite)


def test_rerun_skips_everything_and_never_uploads_local_markers(nas: FilesystemOffsite, local_set: BackupSet) -> None:
    first = nas.upload_set(local_set)
    assert (local_set.path / "offsite.json").is_file()

    again = nas.upload_set(local_set)

    assert again.uploaded == [] and again.bytes_uploaded == 0
    assert again.skipped == first.uploaded and again.bytes_skipped == first.bytes_uploaded
    stored = sorted(p.name for p in (nas.root / local_set.key).rglob("*") if p.is_file())
    assert stored == sorted(["globals.sql.zst", "erp.dump.zst", "empty.zst", SUMS_NAME, "manifest.json"])


@pytest.mark.parametrize("break_it", ["no sums", "corrupt"])
def test_upload_refuses_a_set_that_is_not_verified(nas: FilesystemOffsite, local_set: BackupSet, break_it: str) -> None:
    if break_it == "no sums":
        (local_set.path / SUMS_NAME).unlink()
    else:
        local_set.mark_corrupt(["db/erp.dump.zst: sha256 mismatch"])

    with pytest.raises(OffsiteError, match=f"backup postgres/full/{BACKUP_ID} is (unverified|corrupt)"):
        nas.upload_set(local_set)
    assert not (nas.root / "postgres").exists()


def test_a_file_changed_after_verification_fails_and_the_manifest_is_not_uploaded(
    nas: FilesystemOffsite, local_set: BackupSet
) -> None:
    flip_byte(local_set.path / "db/erp.dump.zst", 1000)

    with pytest.raises(OffsiteError, match=r"db/erp.dump.zst: sha256 .* expected"):
        nas.upload_set(local_set)

    assert (nas.root / local_set.key / "db/erp.dump.zst").is_file()
    assert not (nas.root / local_set.key / "manifest.json").exists()
    assert nas.read_manifest("postgres", "full", BACKUP_ID) is None
    assert local_set.state is SetState.VERIFIED  # no receipt


def test_rewriting_a_damaged_set_removes_its_offsite_manifest_first(nas: FilesystemOffsite, local_set: BackupSet) -> None:
    nas.upload_set(local_set)
    base = local_set.key
    flip_byte(nas.root / base / "globals.sql.zst")
    flip_byte(local_set.path / "globals.sql.zst")  # the rerun cannot repair it from this copy

    with pytest.raises(OffsiteError, match="globals.sql.zst: sha256"):
        nas.upload_set(local_set)
    assert nas.read_manifest("postgres", "full", BACKUP_ID) is None

    flip_byte(local_set.path / "globals.sql.zst")  # local copy good again
    report = nas.upload_set(local_set)

    assert report.uploaded == [f"{base}/globals.sql.zst", f"{base}/manifest.json"]
    assert (nas.root / base / "globals.sql.zst").read_bytes() == FILES["globals.sql.zst"]
    assert nas.read_manifest("postgres", "full", BACKUP_ID) == local_set.manifest()


def test_verify_set_reports_missing_and_changed_files(nas: FilesystemOffsite, local_set: BackupSet) -> None:
    nas.upload_set(local_set)
    (nas.root / local_set.key / "globals.sql.zst").unlink()
    flip_byte(nas.root / local_set.key / "db/erp.dump.zst", 5)

    problems = nas.verify_set("postgres", "full", BACKUP_ID, local_set.manifest())

    assert any(p.startswith(f"{local_set.key}/globals.sql.zst: missing") for p in problems)
    assert any(p.startswith(f"{local_set.key}/db/erp.dump.zst: sha256") for p in problems)
    assert len(problems) == 2


def test_fetch_restores_a_verified_set(nas: FilesystemOffsite, local_set: BackupSet, tmp_path: Path) -> None:
    nas.upload_set(local_set)
    fetched = BackupSet(tmp_path / "restore", "postgres", "full", BACKUP_ID)

    manifest = nas.fetch_set("postgres", "full", BACKUP_ID, fetched.path)

    assert manifest.files == local_set.manifest().files
    assert fetched.state is SetState.VERIFIED
    for relative, data in FILES.items():
        assert (fetched.path / relative).read_bytes() == data
        assert stat.S_IMODE((fetched.path / relative).stat().st_mode) == 0o600
    assert (fetched.path / SUMS_NAME).read_bytes() == (local_set.path / SUMS_NAME).read_bytes()
    assert not (fetched.path / "offsite.json").exists()


def test_fetch_of_a_flipped_byte_names_the_file_and_leaves_nothing(
    nas: FilesystemOffsite, local_set: BackupSet, tmp_path: Path
) -> None:
    nas.upload_set(local_set)
    flip_byte(nas.root / local_set.key / "db/erp.dump.zst", 4242)
    dest = tmp_path / "restore" / BACKUP_ID

    with pytest.raises(ChecksumMismatch, match=f"backup {BACKUP_ID}: file db/erp.dump.zst .*does not match the manifest"):
        nas.fetch_set("postgres", "full", BACKUP_ID, dest)
    assert not dest.exists()


def test_fetch_refuses_a_set_without_manifest(nas: FilesystemOffsite, local_set: BackupSet, tmp_path: Path) -> None:
    nas.upload_set(local_set)
    (nas.root / local_set.key / "manifest.json").unlink()

    with pytest.raises(OffsiteError, match=f"backup postgres/full/{BACKUP_ID} .* is incomplete: it has no manifest.json"):
        nas.fetch_set("postgres", "full", BACKUP_ID, tmp_path / "restore")
    assert not (tmp_path / "restore").exists()
    assert nas.list_backup_ids("postgres", "full") == [BACKUP_ID]
    assert nas.read_manifest("postgres", "full", BACKUP_ID) is None


def test_fetch_refuses_a_manifest_pointing_outside_its_set(nas: FilesystemOffsite, local_set: BackupSet, tmp_path: Path) -> None:
    nas.upload_set(local_set)
    manifest_path = nas.root / local_set.key / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["files"][0]["path"] = "../../../escaped"
    manifest_path.write_text(json.dumps(data))

    with pytest.raises(OffsiteError, match="unsafe file path '../../../escaped'"):
        nas.fetch_set("postgres", "full", BACKUP_ID, tmp_path / "restore" / BACKUP_ID)
    assert not (tmp_path / "escaped").exists()


def test_fetch_refuses_a_non_empty_destination(nas: FilesystemOffsite, local_set: BackupSet, tmp_path: Path) -> None:
    nas.upload_set(local_set)
    dest = tmp_path / "restore"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")

    with pytest.raises(OffsiteError, match="not an empty directory"):
        nas.fetch_set("postgres", "full", BACKUP_ID, dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_list_and_delete_sets(nas: FilesystemOffsite, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    for backup_id in ("20260103T020000Z", "20260101T020000Z", "20260102T020000Z"):
        nas.upload_set(make_verified_set(staging, FILES, backup_id=backup_id))
    nas.upload_set(make_verified_set(staging, FILES, service="redis", backup_type="rdb"))

    assert nas.list_backup_ids("postgres", "full") == ["20260101T020000Z", "20260102T020000Z", "20260103T020000Z"]
    assert nas.list_backup_ids("postgres", "wal") == []

    assert nas.delete_set("postgres", "full", "20260102T020000Z") == len(FILES) + 2
    assert nas.list_backup_ids("postgres", "full") == ["20260101T020000Z", "20260103T020000Z"]
    assert not (nas.root / "postgres/full/20260102T020000Z").exists()
    assert nas.list_backup_ids("redis", "rdb") == [BACKUP_ID]
    assert nas.delete_set("postgres", "full", "20260102T020000Z") == 0


def test_put_and_get_ledger_files(nas: FilesystemOffsite, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    ledger.write_text('{"drills": []}')

    nas.put_file("drill/ledger.json", ledger)

    assert (nas.root / "drill/ledger.json").read_text() == '{"drills": []}'
    copy = tmp_path / "out" / "ledger.json"
    assert nas.get_file("drill/ledger.json", copy) is True
    assert copy.read_text() == '{"drills": []}'
    assert nas.get_file("drill/absent.json", tmp_path / "absent.json") is False
    assert not (tmp_path / "absent.json").exists()


def test_an_unmounted_nas_is_an_error_not_a_local_copy(tmp_path: Path, local_set: BackupSet) -> None:
    missing = tmp_path / "mnt" / "nas"
    offsite = FilesystemOffsite(missing)

    with pytest.raises(OffsiteError, match=f"{missing} is not a directory \\(is the NAS mounted"):
        offsite.upload_set(local_set)
    assert not missing.exists()
    assert local_set.state is SetState.VERIFIED
    with pytest.raises(OffsiteError, match="is the NAS mounted"):
        offsite.list_backup_ids("postgres", "full")
    with pytest.raises(OffsiteError, match="is the NAS mounted"):
        offsite.fetch_set("postgres", "full", BACKUP_ID, tmp_path / "restore")


def test_offsite_from_plan_builds_the_configured_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OFFSITE_PATH_ENV, raising=False)
    data = yaml.safe_load(DEFAULT_PLAN_PATH.read_text())

    from_s3 = offsite_from_plan(parse_plan(DEFAULT_PLAN_PATH, data))
    assert isinstance(from_s3, S3Offsite)
    assert from_s3.description == f"s3://{data['offsite']['bucket']}/{data['offsite']['prefix']}"
    assert from_s3.conn_id == data["offsite"]["conn_id"]

    data["offsite"].update(kind="filesystem", path=str(tmp_path / "nas"))
    from_fs = offsite_from_plan(parse_plan(DEFAULT_PLAN_PATH, data))
    assert isinstance(from_fs, FilesystemOffsite)
    assert from_fs.description == (tmp_path / "nas").as_uri()
