"""S3 Object Lock on a moto bucket created with ObjectLockEnabledForBucket=True.

What moto enforces (as S3 does): deleting a retained object *version* is AccessDenied
(DeleteObject and DeleteObjects alike); a delete without a version id only adds a delete
marker, and an overwrite adds a new version, in both cases the locked version stays intact.
Retain-until dates are real: the set that expires does so a few seconds after upload, and
the prune after that uses no governance bypass.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from erp_backup import retention, steps
from erp_backup.offsite import OffsiteError, offsite_from_plan
from erp_backup.plan import load_plan
from erp_backup.runs import utcnow
from erp_backup.sets import BACKUP_ID_FORMAT, SUMS_NAME, BackupSet
from tests.fixtures.s3 import PRUNE_ACCESS_KEY, PRUNE_CONN_ENV, S3Endpoint
from tests.integration.dagrun import write_plan
from tests.unit.test_offsite_fs import make_verified_set

pytestmark = pytest.mark.integration

MARGIN = timedelta(minutes=1)  # the plan's object_lock.margin: "1m"
RETENTION = timedelta(days=1)  # postgres full, retention_days: 1
LOCK_SECONDS = 12
FILES = {"globals.sql.zst": b"globals", "databases/erp.dump.zst": b"dump"}


def staged_set(root: Path, captured: datetime) -> BackupSet:
    """A verified postgres/full set captured at `captured` (its id is that instant)."""
    return make_verified_set(root, FILES, backup_id=captured.strftime(BACKUP_ID_FORMAT),
                             captured=(captured - timedelta(minutes=1), captured))


@pytest.fixture
def locked(tmp_path: Path, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch):
    """A plan on an Object Lock bucket (mode from the test's parameter), and the bucket's name."""
    bucket = f"objlock-{tmp_path.name[-20:].lower().replace('_', '-')}-{int(time.time() * 1000) % 10**6}"
    s3_endpoint.client().create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tmp_path / "staging"))
    monkeypatch.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", s3_endpoint.conn_json())
    monkeypatch.setenv(PRUNE_CONN_ENV, s3_endpoint.conn_json(login=PRUNE_ACCESS_KEY))

    def plan(mode: str):
        def edit(data):
            data["services"]["postgres"]["backups"]["full"]["retention_days"] = 1
        path = write_plan(tmp_path / "plan.yaml", edit, bucket=bucket, prefix="erp",
                          object_lock={"mode": mode, "margin": "1m"})
        monkeypatch.setenv("ERP_BACKUP_PLAN", str(path))
        return load_plan()

    return plan, bucket


def versions(client, bucket: str, prefix: str) -> list[dict]:
    return client.list_object_versions(Bucket=bucket, Prefix=prefix).get("Versions", [])


def test_uploaded_objects_are_locked_and_s3_refuses_to_delete_them(locked, s3_endpoint: S3Endpoint):
    plan_for, bucket = locked
    plan = plan_for("COMPLIANCE")
    captured = utcnow().replace(microsecond=0) - timedelta(hours=2)
    backup_set = staged_set(plan.backup_root, captured)
    steps.offsite_upload(plan, plan.job("postgres", "full"), backup_set.backup_id)

    client = s3_endpoint.client()
    prefix = f"erp/postgres/full/{backup_set.backup_id}/"
    stored = versions(client, bucket, prefix)
    assert sorted(v["Key"][len(prefix):] for v in stored) == sorted([*FILES, SUMS_NAME, "manifest.json"])
    for version in stored:
        head = client.head_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ObjectLockRetainUntilDate"] == captured + RETENTION + MARGIN

    manifest = next(v for v in stored if v["Key"].endswith("manifest.json"))
    with pytest.raises(ClientError, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key=manifest["Key"], VersionId=manifest["VersionId"])
    refused = client.delete_objects(Bucket=bucket, Delete={"Objects": [
        {"Key": v["Key"], "VersionId": v["VersionId"]} for v in stored]})
    assert {e["Code"] for e in refused["Errors"]} == {"AccessDenied"} and not refused.get("Deleted")

    # An overwrite and a delete without a version id succeed as S3 says, yet the locked version stays.
    dump = f"{prefix}databases/erp.dump.zst"
    dump_version = next(v["VersionId"] for v in stored if v["Key"] == dump)
    client.put_object(Bucket=bucket, Key=dump, Body=b"ransom")
    client.delete_object(Bucket=bucket, Key=f"{prefix}globals.sql.zst")
    assert client.get_object(Bucket=bucket, Key=dump, VersionId=dump_version)["Body"].read() == b"dump"
    assert len(versions(client, bucket, prefix)) == len(stored) + 1


def test_prune_keeps_a_locked_set_whole_and_deletes_it_once_the_lock_expires(locked, s3_endpoint, caplog):
    plan_for, bucket = locked
    plan = plan_for("GOVERNANCE")
    job = plan.job("postgres", "full")
    newest = staged_set(plan.backup_root, utcnow().replace(microsecond=0) - timedelta(minutes=5))
    # Past the 1-day window, and retained (captured + 1 day + 1 minute) until LOCK_SECONDS from now:
    # enough for two uploads and a prune on a loaded machine.
    retain_until = utcnow().replace(microsecond=0) + timedelta(seconds=LOCK_SECONDS)
    expiring = staged_set(plan.backup_root, retain_until - RETENTION - MARGIN)
    for backup_set in (newest, expiring):
        steps.offsite_upload(plan, job, backup_set.backup_id)
    client = s3_endpoint.client()
    prefix = f"erp/postgres/full/{expiring.backup_id}/"
    before = versions(client, bucket, prefix)
    store = offsite_from_plan(plan, prune=True)
    assert store.conn_id == "backup_offsite_prune"

    with caplog.at_level(logging.INFO, logger="erp_backup.retention"):
        report = retention.prune(job, plan.backup_root, store, utcnow(), dry_run=False)
    kept = {d.backup_id: d for d in report.offsite}[expiring.backup_id]
    assert not kept.delete and "under Object Lock until" in kept.reason
    assert report.offsite_deleted == []
    assert f"keep {expiring.backup_id}" in caplog.text and "under Object Lock until" in caplog.text
    assert versions(client, bucket, prefix) == before
    with pytest.raises(OffsiteError, match=f"{expiring.backup_id} is under Object Lock until .*nothing deleted"):
        store.delete_set("postgres", "full", expiring.backup_id)  # asked directly, it refuses before deleting
    assert versions(client, bucket, prefix) == before
    assert store.read_manifest("postgres", "full", expiring.backup_id) is not None

    assert f"under Object Lock until {retain_until.isoformat()}" in kept.reason
    time.sleep(max(0.0, (retain_until - utcnow()).total_seconds()) + 1)
    report = retention.prune(job, plan.backup_root, store, utcnow(), dry_run=False)
    assert report.offsite_deleted == [expiring.backup_id]
    assert report.offsite_objects_deleted == len(before)
    listing = client.list_object_versions(Bucket=bucket, Prefix=prefix)
    assert not listing.get("Versions") and not listing.get("DeleteMarkers")
    assert versions(client, bucket, f"erp/postgres/full/{newest.backup_id}/"), "the newest set stays"
