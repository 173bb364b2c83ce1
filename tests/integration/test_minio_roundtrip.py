"""MinIO round trips against a real S3 API (moto server standing in for MinIO): back up → change the
source → back up again → restore into another bucket → compare with what was uploaded.

The source connection is `AIRFLOW_CONN_ERP_MINIO`, read through the Task SDK (`airflow_connection`),
and the backups run through the same steps a DAG runs (backup, checksum).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk import Connection
from boto3.s3.transfer import TransferConfig

from erp_backup import steps
from erp_backup.checksum import ChecksumMismatch, verify_and_seal
from erp_backup.manifest import FILE_MODE, Manifest
from erp_backup.offsite import FilesystemOffsite
from erp_backup.plan import BackupJob, Plan, load_plan
from erp_backup.scratch.base import free_port
from erp_backup.services import minio as svc
from erp_backup.services.base import BackupContext, CheckContext, RunInfo, SourceUnavailable, airflow_connection
from erp_backup.sets import BackupSet, SetState
from tests.fixtures.factories import make_backup_context
from tests.fixtures.s3 import SECRET_KEY, S3Endpoint

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
CONN_ENV = "AIRFLOW_CONN_ERP_MINIO"
DAY1 = datetime(2026, 1, 1, 3, 0, tzinfo=timezone.utc)
DAY2 = datetime(2026, 1, 2, 3, 0, tzinfo=timezone.utc)
DAY3 = datetime(2026, 1, 3, 3, 0, tzinfo=timezone.utc)
ODD_KEYS = {
    "계약서/2026년 1월 견적서.pdf": ("application/pdf", {"tenant": "acme", "doc-id": "q-2026-01"}),
    "reports/Q1 summary (final).xlsx": ("application/vnd.ms-excel", {"tenant": "beta"}),
    "a+b=c.txt": ("text/plain; charset=utf-8", {}),
    "100% done.txt": ("text/plain", {"progress": "100%"}),
    "percent%2Fencoded/../not-a-parent": ("application/octet-stream", {}),
    "  spaces  everywhere .txt": ("text/plain", {}),
}


@dataclasses.dataclass
class Source:
    bucket: str
    data: dict[str, bytes]
    content_types: dict[str, str]
    metadata: dict[str, dict[str, str]]


@pytest.fixture
def minio_env(s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    monkeypatch.setenv(CONN_ENV, s3_endpoint.conn_json())
    return s3_endpoint


@pytest.fixture
def plan(tmp_path: Path) -> Plan:
    return dataclasses.replace(load_plan(), backup_root=tmp_path / "staging")


def minio_job(plan: Plan, backup_type: str, **options: object) -> BackupJob:
    """The plan's job with `encrypt: false`: this module covers the clear layout and its incremental reuse.

    Encrypted MinIO sets (full copies, sealed) are backed up and drilled in tests/integration/test_drill.py's
    weekly run of every service.
    """
    job = plan.job("minio", backup_type)
    return dataclasses.replace(job, options={**job.options, **options}, encrypt=False)


def run_backup(plan: Plan, job: BackupJob, moment: datetime) -> tuple[BackupSet, Manifest]:
    """The DAG's backup and checksum steps, with the connection from AIRFLOW_CONN_ERP_MINIO."""
    run = RunInfo(job.dag_id, f"scheduled__{moment.isoformat()}", moment)
    backup_id = steps.backup(plan, job, run, get_connection=airflow_connection)
    steps.checksum(plan, job, backup_id)
    backup_set = BackupSet(plan.backup_root, "minio", job.backup_type, backup_id)
    assert backup_set.state is SetState.VERIFIED
    return backup_set, backup_set.manifest()


def put(endpoint: S3Endpoint, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None, **extra: object) -> None:
    endpoint.client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type,
                                 Metadata=metadata or {}, **extra)


def make_source(endpoint: S3Endpoint, bucket: str, objects: dict[str, tuple[bytes, str, dict[str, str]]]) -> Source:
    client = endpoint.client()

    def upload(item: tuple[str, tuple[bytes, str, dict[str, str]]]) -> None:
        key, (data, content_type, metadata) = item
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, Metadata=metadata)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(upload, objects.items()))
    return Source(
        bucket=bucket,
        data={key: value[0] for key, value in objects.items()},
        content_types={key: value[1] for key, value in objects.items()},
        metadata={key: value[2] for key, value in objects.items()},
    )


def listing(endpoint: S3Endpoint, bucket: str, prefix: str = "") -> dict[str, dict]:
    paginator = endpoint.client().get_paginator("list_objects_v2")
    return {
        item["Key"]: item
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
    }


def fetch(endpoint: S3Endpoint, bucket: str, key: str) -> tuple[bytes, str, dict[str, str]]:
    response = endpoint.client().get_object(Bucket=bucket, Key=key)
    return response["Body"].read(), response["ContentType"], response["Metadata"]


def objects_by_key(manifest: Manifest) -> dict[str, dict]:
    return {entry["key"]: entry for entry in manifest.details["objects"]}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- many objects, multipart, odd keys, no-change rerun, restore with a prefix -------------------------


@pytest.fixture
def big_source(minio_env: S3Endpoint, s3_bucket: Callable[[str], str]) -> Source:
    bucket = s3_bucket("erp-documents")
    objects: dict[str, tuple[bytes, str, dict[str, str]]] = {
        f"tenants/t{i % 7}/invoices/inv-{i:05d}.txt": (f"invoice {i}\n".encode() * (1 + i % 5), "text/plain", {"n": str(i)})
        for i in range(2000)
    }
    for index, (key, (content_type, metadata)) in enumerate(ODD_KEYS.items()):
        objects[key] = (f"odd key {index}: {key}".encode(), content_type, metadata)
    source = make_source(minio_env, bucket, objects)
    big = os.urandom(12 * MIB)
    minio_env.client().upload_fileobj(
        io.BytesIO(big), bucket, "scans/archive 2025.zip",
        ExtraArgs={"ContentType": "application/zip", "Metadata": {"scanner": "hq-2"}},
        Config=TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB),
    )
    source.data["scans/archive 2025.zip"] = big
    source.content_types["scans/archive 2025.zip"] = "application/zip"
    source.metadata["scans/archive 2025.zip"] = {"scanner": "hq-2"}
    return source


def test_thousands_of_objects_back_up_rerun_with_nothing_transferred_and_restore_under_a_prefix(
    plan: Plan, big_source: Source, minio_env: S3Endpoint, s3_bucket: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    job = minio_job(plan, "full", buckets=[big_source.bucket])
    multipart_key = "scans/archive 2025.zip"
    assert listing(minio_env, big_source.bucket)[multipart_key]["ETag"].strip('"').endswith("-3")
    total_bytes = sum(len(data) for data in big_source.data.values())

    started = time.monotonic()
    first, first_manifest = run_backup(plan, job, DAY1)
    first_seconds = time.monotonic() - started

    objects = objects_by_key(first_manifest)
    assert set(objects) == set(big_source.data)
    for key, data in big_source.data.items():
        entry = objects[key]
        assert (entry["size"], entry["sha256"]) == (len(data), sha256(data)), key
        assert entry["content_type"] == big_source.content_types[key]
        assert entry["metadata"] == big_source.metadata[key]
        assert (first.path / entry["file"]).read_bytes() == data
    odd_files = [objects[key]["file"] for key in ODD_KEYS]
    assert all(Path(f).parts[:2] == ("objects", big_source.bucket) and len(Path(f).name) == 64 for f in odd_files)
    assert len(set(odd_files)) == len(ODD_KEYS)
    assert all(oct(p.stat().st_mode & 0o777) == oct(FILE_MODE) for p in (first.path / "objects").rglob("*") if p.is_file())
    transfer = first_manifest.details["transfer"]
    assert transfer["base_backup_id"] is None
    assert (transfer["objects_transferred"], transfer["bytes_transferred"]) == (len(big_source.data), total_bytes)
    assert first_manifest.details["buckets"][big_source.bucket]["objects"] == len(big_source.data)
    assert first_manifest.source == {"conn_id": "erp_minio", "endpoint": minio_env.url.split("//")[1],
                                     "buckets": [big_source.bucket]}
    assert svc.verify(first, first_manifest, rehash=True) == []

    caplog.set_level(logging.INFO, logger="erp_backup.services.minio")
    second, second_manifest = run_backup(plan, job, DAY2)
    transfer = second_manifest.details["transfer"]
    assert transfer["base_backup_id"] == first.backup_id
    assert (transfer["objects_transferred"], transfer["bytes_transferred"]) == (0, 0)
    assert (transfer["objects_reused"], transfer["bytes_reused"]) == (len(big_source.data), total_bytes)
    assert (
        f"0 objects / 0 bytes transferred, {len(big_source.data)} objects / {total_bytes} bytes reused "
        f"from {first.backup_id}"
    ) in caplog.text
    reused = objects_by_key(second_manifest)[multipart_key]
    assert reused["reused_from"] == first.backup_id
    first_file, second_file = first.path / reused["file"], second.path / reused["file"]
    assert first_file.stat().st_ino == second_file.stat().st_ino  # a hardlink, not a second copy
    assert {e["key"]: e["sha256"] for e in second_manifest.details["objects"]} == {
        e["key"]: e["sha256"] for e in first_manifest.details["objects"]
    }

    # Restore one tenant (a request or two per object on moto is what costs; the smaller tests
    # restore whole sets), then the odd keys and the multipart object, all under a prefix.
    target = s3_bucket("restore-target")
    destination = {"conn_id": "erp_minio", "bucket": target, "prefix": "restored/2026-01-02"}
    wanted = {key for key in big_source.data if key.startswith("tenants/t3/")}
    report = svc.restore(second.path, second_manifest, destination, options={"key_prefix": "tenants/t3/"})
    assert report.ok and report.problems == []
    assert report.details["objects"] == report.details["verified"] == len(wanted) > 250
    assert report.details["bytes"] == report.restored_bytes == sum(len(big_source.data[key]) for key in wanted)
    for key in [multipart_key, *ODD_KEYS]:
        single = svc.restore(second.path, second_manifest, destination, options={"key_prefix": key})
        assert single.details["verified"] == 1 and single.details["verified_by"] == {"checksum": 1}
        wanted.add(key)

    restored = listing(minio_env, target)
    assert set(restored) == {f"restored/2026-01-02/{key}" for key in wanted}
    for key in wanted - {multipart_key}:  # single-part ETags are the MD5 of the content
        assert restored[f"restored/2026-01-02/{key}"]["ETag"].strip('"') == hashlib.md5(big_source.data[key]).hexdigest(), key
    for key in [multipart_key, *ODD_KEYS]:
        body, content_type, metadata = fetch(minio_env, target, f"restored/2026-01-02/{key}")
        assert body == big_source.data[key]
        assert (content_type, metadata) == (big_source.content_types[key], big_source.metadata[key])

    print(
        f"\nMINIO full: {len(big_source.data)} objects, {first_manifest.total_size} bytes on disk, "
        f"first run {first_seconds:.1f} s; rerun {second_manifest.details['transfer']['seconds']:.1f} s, "
        f"transferred {transfer['bytes_transferred']} bytes"
    )


# -- bucket configuration, versions ------------------------------------------------------------------


def test_bucket_configuration_and_version_ids_are_captured_and_absent_parts_recorded(
    plan: Plan, minio_env: S3Endpoint, s3_bucket: Callable[[str], str]
) -> None:
    configured, bare = s3_bucket("erp-configured"), s3_bucket("erp-bare")
    client = minio_env.client()
    policy = {"Version": "2012-10-17", "Statement": [{
        "Sid": "PublicLogos", "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{configured}/logos/*",
    }]}
    client.put_bucket_policy(Bucket=configured, Policy=json.dumps(policy))
    client.put_bucket_versioning(Bucket=configured, VersioningConfiguration={"Status": "Enabled"})
    client.put_bucket_tagging(Bucket=configured, Tagging={"TagSet": [{"Key": "team", "Value": "erp"}]})
    client.put_bucket_lifecycle_configuration(Bucket=configured, LifecycleConfiguration={"Rules": [
        {"ID": "expire-tmp", "Status": "Enabled", "Filter": {"Prefix": "tmp/"}, "Expiration": {"Days": 7}},
    ]})
    put(minio_env, configured, "logos/erp.png", b"v1")
    put(minio_env, configured, "logos/erp.png", b"png v2", "image/png")
    put(minio_env, bare, "readme.txt", b"bare", "text/plain")

    backup_set, manifest = run_backup(plan, minio_job(plan, "snapshot", buckets=[configured, bare]), DAY1)

    summaries = manifest.details["buckets"]
    assert summaries[configured]["config"] == {"policy": True, "versioning": "Enabled", "lifecycle": True, "tags": True}
    assert summaries[bare]["config"] == {"policy": False, "versioning": "Unversioned", "lifecycle": False, "tags": False}
    stored = json.loads((backup_set.path / svc.config_file(configured)).read_text())
    assert stored["policy"] == {"present": True, "policy": policy}
    assert stored["tags"] == {"present": True, "tags": {"team": "erp"}}
    assert stored["lifecycle"]["rules"][0]["ID"] == "expire-tmp"
    bare_config = json.loads((backup_set.path / svc.config_file(bare)).read_text())
    assert (bare_config["policy"], bare_config["lifecycle"], bare_config["tags"]) == ({"present": False},) * 3

    by_bucket = {(e["bucket"], e["key"]): e for e in manifest.details["objects"]}
    current_version = client.head_object(Bucket=configured, Key="logos/erp.png")["VersionId"]
    assert by_bucket[(configured, "logos/erp.png")]["version_id"] == current_version
    assert by_bucket[(configured, "logos/erp.png")]["sha256"] == sha256(b"png v2")  # the current version only
    assert by_bucket[(bare, "readme.txt")]["version_id"] is None

    with pytest.raises(svc.MinioError, match="pass source_bucket="):
        svc.restore(backup_set.path, manifest, {"conn_id": "erp_minio", "bucket": s3_bucket("never-written")})
    target = f"erp-rebuilt-{configured[-8:]}"
    report = svc.restore(backup_set.path, manifest, {"conn_id": "erp_minio", "bucket": target, "create_bucket": True},
                         options={"source_bucket": configured, "restore_config": True})
    restored = report.details["buckets"][configured]
    assert restored["bucket_created"] and report.details["verified"] == 1
    assert sorted(restored["config_restored"]) == ["lifecycle", "policy", "tags", "versioning"]
    restored_policy = json.loads(client.get_bucket_policy(Bucket=target)["Policy"])
    assert restored_policy["Statement"][0]["Resource"] == f"arn:aws:s3:::{target}/logos/*"
    assert client.get_bucket_versioning(Bucket=target)["Status"] == "Enabled"
    assert client.get_bucket_tagging(Bucket=target)["TagSet"] == [{"Key": "team", "Value": "erp"}]
    assert fetch(minio_env, target, "logos/erp.png") == (b"png v2", "image/png", {})


# -- deletions, self-contained sets, conflicts and dry run -------------------------------------------


def test_a_deleted_object_stays_restorable_from_the_older_set_and_every_set_stands_alone(
    plan: Plan, minio_env: S3Endpoint, s3_bucket: Callable[[str], str]
) -> None:
    source = make_source(minio_env, s3_bucket("erp-documents"), {
        "keep/a.txt": (b"alpha", "text/plain", {"v": "1"}),
        "keep/b.txt": (b"bravo", "text/plain", {}),
        "gone/contract.pdf": (b"%PDF signed contract", "application/pdf", {"signed": "yes"}),
    })
    job = minio_job(plan, "full", buckets=[source.bucket])
    older, older_manifest = run_backup(plan, job, DAY1)
    minio_env.client().delete_object(Bucket=source.bucket, Key="gone/contract.pdf")
    newer, newer_manifest = run_backup(plan, job, DAY2)

    assert set(objects_by_key(older_manifest)) == {"keep/a.txt", "keep/b.txt", "gone/contract.pdf"}
    assert set(objects_by_key(newer_manifest)) == {"keep/a.txt", "keep/b.txt"}
    assert newer_manifest.details["transfer"]["objects_transferred"] == 0
    assert not (newer.path / objects_by_key(older_manifest)["gone/contract.pdf"]["file"]).exists()

    target = s3_bucket("restore-old")
    report = svc.restore(older.path, older_manifest, {"conn_id": "erp_minio", "bucket": target, "prefix": "day1/"})
    assert report.details["verified"] == 3
    assert fetch(minio_env, target, "day1/gone/contract.pdf") == (b"%PDF signed contract", "application/pdf", {"signed": "yes"})

    # Restoring again onto the same keys is refused; a dry run only reports; overwrite replaces.
    with pytest.raises(svc.MinioError, match="3 object\\(s\\) already exist"):
        svc.restore(older.path, older_manifest, {"conn_id": "erp_minio", "bucket": target, "prefix": "day1/"})
    put(minio_env, target, "day1/keep/a.txt", b"edited after the restore")
    dry = svc.restore(older.path, older_manifest, {"conn_id": "erp_minio", "bucket": target, "prefix": "day1/"},
                      dry_run=True, options={"overwrite": True})
    assert dry.dry_run and dry.details["conflicts"] == 3 and dry.details["verified"] == 0
    assert fetch(minio_env, target, "day1/keep/a.txt")[0] == b"edited after the restore"
    svc.restore(older.path, older_manifest, {"conn_id": "erp_minio", "bucket": target, "prefix": "day1/"},
                options={"overwrite": True, "key_prefix": "keep/"})
    assert fetch(minio_env, target, "day1/keep/a.txt")[0] == b"alpha"

    # Pruning the older set leaves the newer one whole: nothing in it points elsewhere.
    assert svc.protected_sets(plan, job, now=DAY2) == {}
    older.remove("test: the older set expired")
    assert svc.verify(newer, newer_manifest, rehash=True) == []
    report = svc.restore(newer.path, newer_manifest, {"conn_id": "erp_minio", "bucket": target, "prefix": "day2/"})
    assert report.details["verified"] == 2
    assert fetch(minio_env, target, "day2/keep/a.txt") == (b"alpha", "text/plain", {"v": "1"})


def test_changed_objects_are_transferred_and_identical_reuploads_are_reused_by_sha256(
    plan: Plan, minio_env: S3Endpoint, s3_bucket: Callable[[str], str]
) -> None:
    bucket = s3_bucket("erp-documents")
    put(minio_env, bucket, "changed.txt", b"version one")
    put(minio_env, bucket, "same-content-sha256.bin", b"identical bytes", metadata={"rev": "1"}, ChecksumAlgorithm="SHA256")
    put(minio_env, bucket, "same-content-crc.bin", b"identical too")
    put(minio_env, bucket, "untouched.txt", b"never changes")
    job = minio_job(plan, "full", buckets=[bucket])
    first, _ = run_backup(plan, job, DAY1)

    time.sleep(1.1)  # so the rewrites below get a later LastModified (S3 keeps whole seconds)
    put(minio_env, bucket, "changed.txt", b"version two")  # same size, new content
    put(minio_env, bucket, "same-content-sha256.bin", b"identical bytes", "application/x-new",
        metadata={"rev": "2"}, ChecksumAlgorithm="SHA256")
    put(minio_env, bucket, "same-content-crc.bin", b"identical too")
    second, manifest = run_backup(plan, job, DAY2)

    transfer = manifest.details["transfer"]
    assert (transfer["objects_transferred"], transfer["bytes_transferred"]) == (2, len(b"version two") + len(b"identical too"))
    objects = objects_by_key(manifest)
    assert "reused_from" not in objects["changed.txt"] and "reused_from" not in objects["same-content-crc.bin"]
    assert objects["changed.txt"]["sha256"] == sha256(b"version two")
    assert (second.path / objects["changed.txt"]["file"]).read_bytes() == b"version two"
    assert objects["untouched.txt"]["reused_from"] == first.backup_id
    # Reused by its whole-object SHA-256 (HEAD), with the metadata of the new upload.
    sha_entry = objects["same-content-sha256.bin"]
    assert sha_entry["reused_from"] == first.backup_id
    assert (sha_entry["metadata"], sha_entry["content_type"]) == ({"rev": "2"}, "application/x-new")
    assert (second.path / sha_entry["file"]).stat().st_nlink == 2


def test_an_incremental_set_fetched_alone_from_offsite_restores_after_staging_is_lost(
    plan: Plan, minio_env: S3Endpoint, s3_bucket: Callable[[str], str], tmp_path: Path
) -> None:
    source = make_source(minio_env, s3_bucket("erp-documents"), {
        "old/unchanged.pdf": (b"%PDF from day one", "application/pdf", {"tenant": "acme"}),
        "new/added.txt": (b"placeholder", "text/plain", {}),
    })
    job = minio_job(plan, "full", buckets=[source.bucket])
    run_backup(plan, job, DAY1)
    put(minio_env, source.bucket, "new/added-on-day-two.txt", b"day two", "text/plain")
    newer, newer_manifest = run_backup(plan, job, DAY2)
    assert newer_manifest.details["transfer"]["objects_reused"] == 2

    nas = tmp_path / "nas"
    nas.mkdir()
    offsite = FilesystemOffsite(nas)
    offsite.upload_set(newer)
    shutil.rmtree(plan.backup_root)  # the staging disk is gone, with every earlier set

    fetched = BackupSet(tmp_path / "dr", "minio", "full", newer.backup_id)
    fetched_manifest = offsite.fetch_set("minio", "full", newer.backup_id, fetched.path)
    assert fetched.state is SetState.VERIFIED
    assert svc.verify(fetched, fetched_manifest, rehash=True) == []
    target = s3_bucket("restore-dr")
    report = svc.restore(fetched.path, fetched_manifest, {"conn_id": "erp_minio", "bucket": target})
    assert report.details["verified"] == 3
    assert fetch(minio_env, target, "old/unchanged.pdf") == (b"%PDF from day one", "application/pdf", {"tenant": "acme"})
    assert fetch(minio_env, target, "new/added-on-day-two.txt")[0] == b"day two"


# -- snapshot ------------------------------------------------------------------------------------------


def test_snapshot_is_a_self_contained_full_copy_even_after_a_full_backup(
    plan: Plan, minio_env: S3Endpoint, s3_bucket: Callable[[str], str]
) -> None:
    text = b"".join(f"line {i}: ERP ledger entry, tenant acme\n".encode() for i in range(20000))
    source = make_source(minio_env, s3_bucket("erp-documents"), {
        "ledger.csv": (text, "text/csv", {"period": "2025-12"}),
        "photo.jpg": (os.urandom(9 * MIB), "image/jpeg", {}),  # above the restore part size: multipart restore
        "빈 파일": (b"", "application/octet-stream", {}),
    })
    run_backup(plan, minio_job(plan, "full", buckets=[source.bucket]), DAY1)

    started = time.monotonic()
    snapshot, manifest = run_backup(plan, minio_job(plan, "snapshot", buckets=[source.bucket], compress=True), DAY2)
    seconds = time.monotonic() - started

    transfer = manifest.details["transfer"]
    assert transfer["base_backup_id"] is None and transfer["objects_reused"] == 0
    assert transfer["objects_transferred"] == 3
    objects = objects_by_key(manifest)
    assert all("reused_from" not in entry and entry["compressed"] for entry in objects.values())
    for entry in objects.values():
        stored = snapshot.path / entry["file"]
        assert stored.name.endswith(".zst") and stored.stat().st_nlink == 1
    ledger_file = snapshot.path / objects["ledger.csv"]["file"]
    assert ledger_file.stat().st_size < len(text) / 5
    assert svc.verify(snapshot, manifest) == []

    target = s3_bucket("restore-snapshot")
    report = svc.restore(snapshot.path, manifest, {"conn_id": "erp_minio", "bucket": target},
                         options={"verify_mode": "download"})
    assert report.details["verified_by"] == {"download": 3}
    for key, data in source.data.items():
        assert fetch(minio_env, target, key) == (data, source.content_types[key], source.metadata[key])
    print(f"\nMINIO snapshot (compressed): {sum(map(len, source.data.values()))} bytes of objects, "
          f"{manifest.total_size} bytes on disk, {seconds:.1f} s")


# -- corruption ---------------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupted_stored_object_is_detected_and_never_restored(
    plan: Plan, minio_env: S3Endpoint, s3_bucket: Callable[[str], str]
) -> None:
    source = make_source(minio_env, s3_bucket("erp-documents"), {
        "small.txt": (b"a small document", "text/plain", {}),
        "large.bin": (os.urandom(9 * MIB), "application/octet-stream", {}),
        "fine.txt": (b"this one is intact", "text/plain", {}),
    })
    backup_set, manifest = run_backup(plan, minio_job(plan, "full", buckets=[source.bucket]), DAY1)
    objects = objects_by_key(manifest)
    flip_byte(backup_set.path / objects["small.txt"]["file"], 3)
    flip_byte(backup_set.path / objects["large.bin"]["file"], 9 * MIB - 10)  # in the last part

    problems = svc.verify(backup_set, manifest, rehash=True)
    assert len(problems) == 2 and all("sha256" in p for p in problems)
    assert {p.split(":")[0] for p in problems} == {f"{source.bucket}/small.txt", f"{source.bucket}/large.bin"}
    with pytest.raises(ChecksumMismatch):
        verify_and_seal(backup_set, svc.verify)
    assert backup_set.state is SetState.CORRUPT

    target = s3_bucket("restore-corrupt")
    report = svc.restore(backup_set.path, manifest, {"conn_id": "erp_minio", "bucket": target})
    assert report.details["verified"] == 1 and not report.ok
    assert sorted(p.split(":")[0] for p in report.problems) == [f"{source.bucket}/large.bin", f"{source.bucket}/small.txt"]
    assert all("is corrupt" in p for p in report.problems)
    assert set(listing(minio_env, target)) == {"fine.txt"}  # nothing corrupt was committed
    assert minio_env.client().list_multipart_uploads(Bucket=target).get("Uploads", []) == []

    # A truncated file is found before anything is written, and by verify without re-hashing.
    with open(backup_set.path / objects["fine.txt"]["file"], "r+b") as handle:
        handle.truncate(4)
    assert any("fine.txt" in p and "bytes" in p for p in svc.verify(backup_set, manifest))
    other = s3_bucket("restore-truncated")
    truncated = svc.restore(backup_set.path, manifest, {"conn_id": "erp_minio", "bucket": other})
    assert truncated.problems and "nothing was written" in truncated.details["buckets"][source.bucket]["failed"]
    assert listing(minio_env, other) == {}


# -- the drill: dry run, restore of every bucket, check ------------------------------------------------


def drop_bucket(endpoint: S3Endpoint, source: Source) -> None:
    client = endpoint.client()
    for key in source.data:
        client.delete_object(Bucket=source.bucket, Key=key)
    client.delete_bucket(Bucket=source.bucket)


def test_a_dry_run_writes_nothing_then_every_bucket_is_restored_under_its_name_and_checked(
    plan: Plan, minio_env: S3Endpoint, s3_bucket: Callable[[str], str]
) -> None:
    first = make_source(minio_env, s3_bucket("erp-lost-a"), {
        "a/one.txt": (b"one", "text/plain", {}),
        "big.bin": (os.urandom(9 * MIB), "application/octet-stream", {"kind": "scan"}),  # multipart
    })
    second = make_source(minio_env, s3_bucket("erp-lost-b"), {"two.pdf": (b"%PDF two", "application/pdf", {"t": "x"})})
    backup_set, manifest = run_backup(plan, minio_job(plan, "snapshot", buckets=[first.bucket, second.bucket]), DAY1)
    for source in (first, second):  # the disaster: both buckets are gone
        drop_bucket(minio_env, source)
    host = minio_env.url.split("//")[1]
    scratch = svc.scratch_target(SimpleNamespace(kind="s3", uri=minio_env.url, secret=SECRET_KEY))
    sizes = {source.bucket: sum(map(len, source.data.values())) for source in (first, second)}

    dry = svc.restore(backup_set.path, manifest, scratch, dry_run=True)
    assert dry.dry_run and dry.problems == [] and dry.restored_bytes == 0
    assert dry.actions == [
        f"create bucket {first.bucket} at {host}",
        f"write 2 objects ({sizes[first.bucket]} bytes) of backup {manifest.backup_id} bucket {first.bucket} "
        f"into s3://{first.bucket}/ at {host}",
        f"create bucket {second.bucket} at {host}",
        f"write 1 objects ({sizes[second.bucket]} bytes) of backup {manifest.backup_id} bucket {second.bucket} "
        f"into s3://{second.bucket}/ at {host}",
    ]
    existing = {bucket["Name"] for bucket in minio_env.client().list_buckets()["Buckets"]}
    assert not existing & {first.bucket, second.bucket}  # nothing was created

    report = svc.restore(backup_set.path, manifest, scratch)
    assert report.ok and report.restored_bytes == sum(sizes.values()) and report.details["verified"] == 3
    for source in (first, second):
        for key, data in source.data.items():
            assert fetch(minio_env, source.bucket, key) == (data, source.content_types[key], source.metadata[key])

    guarded: list[tuple[str, int]] = []
    context = CheckContext(guard=lambda host, port: guarded.append((host, port)))
    found = svc.check_restored(scratch, backup_set.path, manifest, report, context)
    assert found.problems == []
    assert found.checks == [f"{first.bucket} → s3://{first.bucket}/: 2/2 objects match their SHA-256",
                            f"{second.bucket} → s3://{second.bucket}/: 1/1 objects match their SHA-256"]
    assert guarded == [("127.0.0.1", int(host.split(":")[1]))] * 2

    put(minio_env, second.bucket, "two.pdf", b"%PDF tampered")
    minio_env.client().delete_object(Bucket=first.bucket, Key="a/one.txt")
    found = svc.check_restored(scratch, backup_set.path, manifest, report, context)
    assert found.problems == [f"s3://{first.bucket}/a/one.txt: missing after restore (NoSuchKey)",
                              f"s3://{second.bucket}/two.pdf: SHA-256 differs from the manifest"]


# -- unreachable source, missing bucket --------------------------------------------------------------


def context_for(plan: Plan, job: BackupJob, conn: Connection, tmp_path: Path) -> BackupContext:
    return make_backup_context(tmp_path / "ctx", job=job, run=RunInfo(job.dag_id, "manual", DAY1),
                               backup_id="20260101T030000Z", connection=conn)


def test_unreachable_source_raises_source_unavailable_naming_connection_and_host(plan: Plan, tmp_path: Path) -> None:
    port = free_port()
    conn = Connection(conn_id="erp_minio", conn_type="aws", login="key", password="secret-value",
                      extra=json.dumps({"endpoint_url": f"http://127.0.0.1:{port}"}))
    with pytest.raises(SourceUnavailable) as raised:
        svc.backup(context_for(plan, plan.job("minio", "full"), conn, tmp_path))
    message = str(raised.value)
    assert "'erp_minio'" in message and f"127.0.0.1:{port}" in message and "secret-value" not in message


def test_a_missing_bucket_is_named_with_the_plan_field_to_fix(
    plan: Plan, minio_env: S3Endpoint, tmp_path: Path
) -> None:
    job = minio_job(plan, "full", buckets=["erp-no-such-bucket"])
    with pytest.raises(svc.BucketMissing, match="'erp-no-such-bucket' does not exist .*services.minio.options.buckets"):
        svc.backup(context_for(plan, job, airflow_connection("erp_minio"), tmp_path))


@pytest.fixture(autouse=True)
def _quiet_stream_logs() -> Iterator[None]:
    """The stream module logs every file written; thousands of lines would drown the test output."""
    stream_log = logging.getLogger("erp_backup.stream")
    level = stream_log.level
    stream_log.setLevel(logging.WARNING)
    yield
    stream_log.setLevel(level)
