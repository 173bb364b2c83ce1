"""Least privilege offsite: uploads never delete; retention_prune deletes with its own connection.

moto has no IAM-like separation, so every S3 call is recorded per connection through
botocore's `before-call` event on the real S3Hook's client, and the test asserts which
connection made which calls: no DeleteObject(s) from `backup_offsite`, the prune's
deletions from `backup_offsite_prune`. The IAM policies themselves are docs/iam/*.json.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pytest

from erp_backup import steps
from erp_backup.offsite import OffsiteError
from erp_backup.offsite_s3 import S3Offsite
from erp_backup.plan import load_plan
from erp_backup.sets import BackupSet, SetState
from tests.fixtures.s3 import PRUNE_ACCESS_KEY, PRUNE_CONN_ENV, S3Endpoint
from tests.integration.dagrun import write_plan
from tests.unit.test_offsite_fs import make_verified_set

pytestmark = pytest.mark.integration

IDS = ("20260101T020000Z", "20260102T020000Z", "20260103T020000Z")
DELETES = {"DeleteObject", "DeleteObjects"}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "iam"


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """conn id -> the S3 operations its client sent, recorded by botocore's own event hook."""
    calls: dict[str, list[str]] = defaultdict(list)
    real_client = S3Offsite.client

    def recording_client(self: S3Offsite):
        client = real_client.fget(self)
        if not getattr(client, "_erp_recorded", False):
            client.meta.events.register(
                "before-call.s3", lambda model, **_: calls[self.conn_id].append(model.name))
            client._erp_recorded = True
        return client

    monkeypatch.setattr(S3Offsite, "client", property(recording_client))
    return calls


@pytest.fixture
def env(tmp_path: Path, s3_endpoint: S3Endpoint, s3_bucket, monkeypatch: pytest.MonkeyPatch):
    bucket = s3_bucket("least-privilege")
    root = tmp_path / "staging"
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(write_plan(tmp_path / "plan.yaml", bucket=bucket, prefix="erp")))
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(root))
    monkeypatch.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", s3_endpoint.conn_json())
    monkeypatch.setenv(PRUNE_CONN_ENV, s3_endpoint.conn_json(login=PRUNE_ACCESS_KEY))
    sets = [make_verified_set(root, {"globals.sql.zst": b"g" * (i + 1), "databases/erp.dump.zst": b"d"}, backup_id=i_d)
            for i, i_d in enumerate(IDS)]
    return load_plan(), sets, s3_endpoint, bucket


def test_upload_never_deletes_and_prune_deletes_only_with_its_own_connection(env, recorded):
    plan, sets, s3, bucket = env
    job = plan.job("postgres", "full")
    assert (plan.offsite.conn_id, plan.offsite.prune_conn_id) == ("backup_offsite", "backup_offsite_prune")
    for backup_set in sets:
        steps.offsite_upload(plan, job, backup_set.backup_id)
    # A damaged object under a manifest, and a rerun: refused, naming the prune connection; nothing deleted.
    key = f"erp/postgres/full/{IDS[0]}/databases/erp.dump.zst"
    s3.client().put_object(Bucket=bucket, Key=key, Body=b"damaged")
    with pytest.raises(OffsiteError, match=f"backup postgres/full/{IDS[0]} .*databases/erp.dump.zst must be "
                                           "rewritten; the upload connection never deletes.*backup_offsite_prune"):
        steps.offsite_upload(plan, job, IDS[0])
    assert s3.client().get_object(Bucket=bucket, Key=f"erp/postgres/full/{IDS[0]}/manifest.json")
    uploads = recorded["backup_offsite"]
    assert "PutObject" in uploads and not DELETES & set(uploads), uploads
    assert "backup_offsite_prune" not in recorded

    report = steps.retention_prune(plan, job, IDS[-1], now=datetime(2026, 6, 1, tzinfo=timezone.utc))

    assert DELETES & set(recorded["backup_offsite_prune"]), recorded["backup_offsite_prune"]
    assert not DELETES & set(recorded["backup_offsite"])
    offsite_ids = {key.split("/")[3] for key in (o["Key"] for o in s3.client().list_objects_v2(
        Bucket=bucket, Prefix="erp/postgres/full/").get("Contents", []))}
    assert offsite_ids == {IDS[-1]}, report
    assert BackupSet(plan.backup_root, "postgres", "full", IDS[-1]).state is SetState.OFFSITE


def test_a_prune_without_its_connection_fails_naming_it_and_deletes_nothing(env, recorded, monkeypatch):
    plan, sets, s3, bucket = env
    job = plan.job("postgres", "full")
    for backup_set in sets:
        steps.offsite_upload(plan, job, backup_set.backup_id)
    before = s3.client().list_objects_v2(Bucket=bucket)["KeyCount"]
    monkeypatch.delenv(PRUNE_CONN_ENV)

    with pytest.raises(Exception, match="backup_offsite_prune"):
        steps.retention_prune(plan, job, IDS[-1], now=datetime(2026, 6, 1, tzinfo=timezone.utc))

    assert s3.client().list_objects_v2(Bucket=bucket)["KeyCount"] == before
    assert not DELETES & {name for calls in recorded.values() for name in calls}


def test_the_shipped_policies_give_delete_to_the_prune_role_only():
    upload = json.loads((DOCS / "offsite-upload-policy.json").read_text())
    prune = json.loads((DOCS / "offsite-prune-policy.json").read_text())
    minio_upload = json.loads((DOCS / "minio-offsite-upload-policy.json").read_text())

    def actions(policy: dict) -> set[str]:
        allowed = [s for s in policy["Statement"] if s["Effect"] == "Allow"]
        return {a for s in allowed for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}

    for policy in (upload, minio_upload):
        assert not {a for a in actions(policy) if "Delete" in a or a in ("s3:*", "*")}
        assert {"s3:PutObject", "s3:GetObject", "s3:ListBucket"} <= actions(policy)
    assert "s3:DeleteObject" in actions(prune) and "s3:PutObject" not in actions(prune)
    denied = [s for s in upload["Statement"] if s["Effect"] == "Deny"]
    assert denied and any("s3:DeleteObject" in s["Action"] for s in denied)
    # Object Lock: uploads set retention; prune reads it and deletes versions, never bypassing governance.
    minio_prune = json.loads((DOCS / "minio-offsite-prune-policy.json").read_text())
    for policy in (upload, minio_upload):
        assert {"s3:PutObjectRetention", "s3:GetObjectRetention"} <= actions(policy)
    for policy in (prune, minio_prune):
        assert {"s3:GetObjectRetention", "s3:ListBucketVersions", "s3:GetObjectVersion",
                "s3:DeleteObjectVersion"} <= actions(policy)
        assert not {"s3:BypassGovernanceRetention", "s3:PutObjectRetention"} & actions(policy)
        assert any("s3:BypassGovernanceRetention" in s["Action"] for s in policy["Statement"] if s["Effect"] == "Deny")
