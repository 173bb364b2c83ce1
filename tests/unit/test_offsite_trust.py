"""erp_backup.offsite_trust on the filesystem store: offsite manifests edited, back-dated, copied or deleted."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from erp_backup.manifest import MANIFEST_NAME
from erp_backup.offsite import RECORDS_DIR, FilesystemOffsite
from erp_backup.offsite_trust import CLOCK_SKEW, UPLOAD_MARGIN, check_offsite_set, check_offsite_sets
from erp_backup.sets import BackupSet, SetState
from tests.unit.test_watchdog import make_offsite_set

UTC = timezone.utc


@pytest.fixture
def nas(tmp_path: Path) -> FilesystemOffsite:
    (tmp_path / "nas").mkdir()
    return FilesystemOffsite(tmp_path / "nas")


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    return tmp_path / "staging"


@pytest.fixture
def uploaded(nas: FilesystemOffsite, staging: Path) -> BackupSet:
    """A set captured an hour ago, uploaded now: staging holds its receipt."""
    return make_offsite_set(staging, nas, datetime.now(UTC) - timedelta(hours=1))


def manifest_path(nas: FilesystemOffsite, backup_set: BackupSet) -> Path:
    return nas.root / backup_set.key / MANIFEST_NAME


def rewrite(nas: FilesystemOffsite, backup_set: BackupSet, edit, *, forge_record: bool = False) -> bytes:
    """Edit the offsite manifest in place; with `forge_record`, also store its new SHA-256 as the upload record."""
    path = manifest_path(nas, backup_set)
    data = json.loads(path.read_text())
    edit(data)
    body = json.dumps(data, indent=2).encode()
    path.write_bytes(body)
    if forge_record:
        (nas.root / RECORDS_DIR / backup_set.key / MANIFEST_NAME).write_text(hashlib.sha256(body).hexdigest())
    return body


def check(nas: FilesystemOffsite, backup_set: BackupSet, staging: Path | None):
    return check_offsite_set(nas, backup_set.service, backup_set.backup_type, backup_set.backup_id, staging)


def back_date(days: int):
    def edit(data: dict) -> None:
        for field in ("captured_started_at", "captured_finished_at"):
            data[field] = (datetime.fromisoformat(data[field]) - timedelta(days=days)).isoformat()
    return edit


def edit_one_hash(data: dict) -> None:
    data["files"][0]["sha256"] = "0" * 64


def test_an_untouched_set_is_offsite_vouched_by_the_receipt_then_by_the_store_record(nas, staging, uploaded):
    with_receipt = check(nas, uploaded, staging)
    assert with_receipt.state is SetState.OFFSITE and with_receipt.vouched_by == "staging receipt"
    assert with_receipt.manifest is not None and with_receipt.manifest.backup_id == uploaded.backup_id
    assert json.loads((uploaded.path / "offsite.json").read_text())["manifest_sha256"] == hashlib.sha256(
        manifest_path(nas, uploaded).read_bytes()).hexdigest()

    shutil.rmtree(uploaded.path)  # staging pruned it: only the store's record is left
    without = check(nas, uploaded, staging)
    assert without.state is SetState.OFFSITE and without.vouched_by == "store record" and without.problems == ()


def test_one_edited_hash_is_suspect_with_or_without_a_receipt(nas, staging, uploaded):
    rewrite(nas, uploaded, edit_one_hash)

    result = check(nas, uploaded, staging)
    assert result.state is SetState.SUSPECT and not result.manifest_missing
    assert "but staging's offsite receipt says" in result.why and "it changed after upload" in result.why
    assert "the SHA-256 recorded with it at upload says" in result.why

    shutil.rmtree(uploaded.path)
    assert check(nas, uploaded, staging).state is SetState.SUSPECT  # the store's record still disagrees


def test_a_back_dated_capture_is_suspect_even_with_a_forged_record(nas, staging, uploaded):
    rewrite(nas, uploaded, back_date(489), forge_record=True)

    assert "staging's offsite receipt" in check(nas, uploaded, staging).why
    shutil.rmtree(uploaded.path)  # no receipt: the forged record matches, the object's timestamp does not
    result = check(nas, uploaded, staging)
    assert result.state is SetState.SUSPECT
    assert f"more than the {UPLOAD_MARGIN.days}-day upload margin" in result.why and "back-dated?" in result.why


def test_a_capture_after_the_upload_is_suspect(nas, staging, uploaded):
    rewrite(nas, uploaded, back_date(-3), forge_record=True)  # moved 3 days into the future
    shutil.rmtree(uploaded.path)
    result = check(nas, uploaded, staging)
    assert result.state is SetState.SUSPECT and "after its manifest object was written" in result.why


def test_a_small_clock_skew_is_tolerated(nas, staging, uploaded):
    def a_minute_later(data: dict) -> None:
        finished = datetime.now(UTC) + CLOCK_SKEW / 5
        data["captured_started_at"] = (finished - timedelta(minutes=5)).isoformat()
        data["captured_finished_at"] = finished.isoformat()

    rewrite(nas, uploaded, a_minute_later, forge_record=True)
    shutil.rmtree(uploaded.path)
    assert check(nas, uploaded, staging).state is SetState.OFFSITE


def test_a_manifest_copied_from_another_set_is_suspect(nas, staging, uploaded):
    other = make_offsite_set(staging, nas, datetime.now(UTC) - timedelta(hours=2))
    body = manifest_path(nas, other).read_bytes()
    manifest_path(nas, uploaded).write_bytes(body)
    (nas.root / RECORDS_DIR / uploaded.key / MANIFEST_NAME).write_text(hashlib.sha256(body).hexdigest())
    shutil.rmtree(uploaded.path)

    result = check(nas, uploaded, staging)
    assert result.state is SetState.SUSPECT and f"describes {other.key}: copied from another set" in result.why


def test_a_deleted_manifest_is_suspect_while_staging_has_the_receipt_else_incomplete(nas, staging, uploaded):
    manifest_path(nas, uploaded).unlink()

    result = check(nas, uploaded, staging)
    assert result.state is SetState.SUSPECT and result.manifest_missing
    assert "missing offsite, yet staging's receipt says the copy was verified" in result.why
    shutil.rmtree(uploaded.path)
    assert check(nas, uploaded, staging).state is SetState.INCOMPLETE


def test_an_unparseable_manifest_that_matches_its_record_is_corrupt(nas, staging, uploaded):
    body = b"{not json"
    manifest_path(nas, uploaded).write_bytes(body)
    (nas.root / RECORDS_DIR / uploaded.key / MANIFEST_NAME).write_text(hashlib.sha256(body).hexdigest())
    shutil.rmtree(uploaded.path)
    assert check(nas, uploaded, staging).state is SetState.CORRUPT


def test_a_receipt_for_another_store_is_not_used(nas, staging, uploaded, tmp_path):
    receipt = json.loads((uploaded.path / "offsite.json").read_text())
    (uploaded.path / "offsite.json").write_text(json.dumps({**receipt, "description": "s3://elsewhere/erp"}))
    rewrite(nas, uploaded, back_date(489), forge_record=True)

    result = check(nas, uploaded, staging)
    assert "staging's offsite receipt" not in result.why and "back-dated?" in result.why


def test_an_old_receipt_without_the_manifest_sha256_uses_the_staging_manifest(nas, staging, uploaded):
    receipt = json.loads((uploaded.path / "offsite.json").read_text())
    del receipt["manifest_sha256"]
    (uploaded.path / "offsite.json").write_text(json.dumps(receipt))
    assert check(nas, uploaded, staging).state is SetState.OFFSITE

    rewrite(nas, uploaded, edit_one_hash)
    assert "staging's offsite receipt says" in check(nas, uploaded, staging).why


def test_without_any_record_the_manifest_cannot_be_trusted_and_a_rerun_upload_restores_the_record(nas, staging, uploaded):
    shutil.rmtree(nas.root / RECORDS_DIR)  # a set uploaded before records existed
    (uploaded.path / "offsite.json").rename(uploaded.path / "offsite.json.bak")
    result = check(nas, uploaded, staging)
    assert result.state is SetState.SUSPECT and "no SHA-256 was recorded" in result.why

    (uploaded.path / "offsite.json.bak").unlink()
    report = nas.upload_set(uploaded)  # the missing record makes the uploader store the manifest again
    assert report.uploaded == [f"{uploaded.key}/{MANIFEST_NAME}"]
    shutil.rmtree(uploaded.path)
    assert check(nas, uploaded, staging).state is SetState.OFFSITE


def test_deleting_a_set_removes_its_record(nas, staging, uploaded):
    assert nas.delete_set(uploaded.service, uploaded.backup_type, uploaded.backup_id) == 3
    assert not (nas.root / RECORDS_DIR / uploaded.key).exists()
    assert check_offsite_sets(nas, uploaded.service, uploaded.backup_type, staging) == []
