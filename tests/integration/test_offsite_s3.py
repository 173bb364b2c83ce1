"""The S3 offsite store against a real S3 API (moto server), through S3Hook and an AIRFLOW_CONN_* connection."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from erp_backup.checksum import ChecksumMismatch
from erp_backup.offsite import Offsite, OffsiteError, S3Offsite
from erp_backup.sets import SUMS_NAME, BackupSet, SetState
from tests.fixtures.s3 import SECRET_KEY, S3Endpoint, start_s3
from tests.unit.test_offsite_fs import BACKUP_ID, make_verified_set

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
CONN_ENV = "AIRFLOW_CONN_BACKUP_OFFSITE"
FILES = {"globals.sql.zst": b"roles" * 200, "db/erp.dump.zst": os.urandom(12 * MIB)}  # the dump goes multipart
BASE = f"erp/postgres/full/{BACKUP_ID}"


@pytest.fixture
def bucket(s3_endpoint: S3Endpoint, s3_bucket: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(CONN_ENV, s3_endpoint.conn_json())
    return s3_bucket("offsite")


@pytest.fixture
def offsite(bucket: str) -> S3Offsite:
    return S3Offsite("backup_offsite", bucket, "erp", multipart_threshold=5 * MIB, chunksize=5 * MIB, max_concurrency=2)


@pytest.fixture
def local_set(tmp_path: Path) -> BackupSet:
    return make_verified_set(tmp_path / "staging", FILES)


def stored_keys(endpoint: S3Endpoint, bucket: str) -> list[str]:
    response = endpoint.client().list_objects_v2(Bucket=bucket)
    return sorted(obj["Key"] for obj in response.get("Contents", []))


def replace_object(endpoint: S3Endpoint, bucket: str, key: str, data: bytes) -> None:
    endpoint.client().put_object(Bucket=bucket, Key=key, Body=data)


def test_upload_stores_single_and_multipart_objects_with_sha256_and_verifies_them(
    offsite: S3Offsite, local_set: BackupSet, s3_endpoint: S3Endpoint, bucket: str
) -> None:
    report = offsite.upload_set(local_set)

    expected_keys = [f"{BASE}/globals.sql.zst", f"{BASE}/db/erp.dump.zst", f"{BASE}/{SUMS_NAME}", f"{BASE}/manifest.json"]
    assert report.uploaded == expected_keys and report.skipped == [] and report.verified
    assert stored_keys(s3_endpoint, bucket) == sorted(expected_keys)
    assert report.bytes_uploaded == sum(len(d) for d in FILES.values()) + sum(
        (local_set.path / name).stat().st_size for name in (SUMS_NAME, "manifest.json")
    )

    client = s3_endpoint.client()
    small = client.head_object(Bucket=bucket, Key=f"{BASE}/globals.sql.zst", ChecksumMode="ENABLED")
    assert small["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(FILES["globals.sql.zst"]).digest()).decode()
    big = client.head_object(Bucket=bucket, Key=f"{BASE}/db/erp.dump.zst", ChecksumMode="ENABLED")
    assert big["ETag"].strip('"').endswith("-3")  # 12 MiB in 5 MiB parts
    assert big["Metadata"] == {"sha256": hashlib.sha256(FILES["db/erp.dump.zst"]).hexdigest(), "part-size": str(5 * MIB)}
    assert client.get_object(Bucket=bucket, Key=f"{BASE}/db/erp.dump.zst")["Body"].read() == FILES["db/erp.dump.zst"]

    assert local_set.state is SetState.OFFSITE
    receipt = local_set.offsite_receipt()
    assert receipt["description"] == offsite.description == f"s3://{bucket}/erp"
    assert sorted(receipt["keys"]) == sorted(expected_keys)
    assert offsite.verify_set("postgres", "full", BACKUP_ID, local_set.manifest()) == []
    assert isinstance(offsite, Offsite)


def test_rerun_skips_every_object(offsite: S3Offsite, local_set: BackupSet, s3_endpoint: S3Endpoint, bucket: str) -> None:
    first = offsite.upload_set(local_set)
    assert (local_set.path / "offsite.json").is_file()

    again = offsite.upload_set(local_set)

    assert again.uploaded == [] and again.bytes_uploaded == 0 and again.verified
    assert sorted(again.skipped) == sorted(first.uploaded) and again.bytes_skipped == first.bytes_uploaded
    assert not any(key.endswith(("offsite.json", "CHECKSUM_FAILED")) for key in stored_keys(s3_endpoint, bucket))


def test_data_first_then_sums_then_manifest(offsite: S3Offsite, local_set: BackupSet, monkeypatch: pytest.MonkeyPatch) -> None:
    client = offsite.client
    real_upload = client.upload_file
    order: list[str] = []

    def recording_upload(filename: str, bucket: str, key: str, **kwargs: object) -> None:
        order.append(key)
        real_upload(filename, bucket, key, **kwargs)

    monkeypatch.setattr(client, "upload_file", recording_upload)
    offsite.upload_set(local_set)

    assert order[-2:] == [f"{BASE}/{SUMS_NAME}", f"{BASE}/manifest.json"]
    assert sorted(order[:-2]) == sorted(f"{BASE}/{name}" for name in FILES)


def test_a_bad_object_stops_the_upload_before_the_manifest(
    offsite: S3Offsite, local_set: BackupSet, s3_endpoint: S3Endpoint, bucket: str
) -> None:
    dump = local_set.path / "db/erp.dump.zst"
    data = bytearray(dump.read_bytes())
    data[7 * MIB] ^= 0xFF  # changed after the checksum task verified it
    dump.write_bytes(bytes(data))

    with pytest.raises(OffsiteError, match=f"backup postgres/full/{BACKUP_ID}: .*{BASE}/db/erp.dump.zst: "):
        offsite.upload_set(local_set)

    keys = stored_keys(s3_endpoint, bucket)
    assert f"{BASE}/db/erp.dump.zst" in keys and f"{BASE}/manifest.json" not in keys
    assert local_set.state is SetState.VERIFIED  # no receipt


def test_upload_refuses_an_unverified_set(offsite: S3Offsite, local_set: BackupSet, s3_endpoint: S3Endpoint, bucket: str) -> None:
    (local_set.path / SUMS_NAME).unlink()

    with pytest.raises(OffsiteError, match=f"backup postgres/full/{BACKUP_ID} is unverified"):
        offsite.upload_set(local_set)
    assert stored_keys(s3_endpoint, bucket) == []


def test_verify_set_finds_replaced_and_missing_objects(
    offsite: S3Offsite, local_set: BackupSet, s3_endpoint: S3Endpoint, bucket: str
) -> None:
    offsite.upload_set(local_set)
    replace_object(s3_endpoint, bucket, f"{BASE}/db/erp.dump.zst", b"x" * len(FILES["db/erp.dump.zst"]))
    s3_endpoint.client().delete_object(Bucket=bucket, Key=f"{BASE}/globals.sql.zst")

    problems = offsite.verify_set("postgres", "full", BACKUP_ID, local_set.manifest())

    assert any(p.startswith(f"{BASE}/db/erp.dump.zst: ") for p in problems)
    assert f"{BASE}/globals.sql.zst: missing" in problems


def test_fetch_downloads_and_verifies_a_set(offsite: S3Offsite, local_set: BackupSet, tmp_path: Path) -> None:
    offsite.upload_set(local_set)
    fetched = BackupSet(tmp_path / "restore", "postgres", "full", BACKUP_ID)

    manifest = offsite.fetch_set("postgres", "full", BACKUP_ID, fetched.path)

    assert manifest == local_set.manifest()
    assert fetched.state is SetState.VERIFIED
    for relative, data in FILES.items():
        assert (fetched.path / relative).read_bytes() == data


@pytest.mark.parametrize("relative", list(FILES))
def test_fetch_of_a_flipped_byte_fails_naming_the_file(
    offsite: S3Offsite, local_set: BackupSet, s3_endpoint: S3Endpoint, bucket: str, tmp_path: Path, relative: str
) -> None:
    offsite.upload_set(local_set)
    data = bytearray(FILES[relative])
    data[len(data) // 2] ^= 0x01
    replace_object(s3_endpoint, bucket, f"{BASE}/{relative}", bytes(data))
    dest = tmp_path / "restore" / BACKUP_ID

    with pytest.raises(ChecksumMismatch, match=f"backup {BACKUP_ID}: file {relative} .*does not match the manifest"):
        offsite.fetch_set("postgres", "full", BACKUP_ID, dest)
    assert not dest.exists()


def test_a_set_without_manifest_is_listed_but_cannot_be_fetched(
    offsite: S3Offsite, local_set: BackupSet, s3_endpoint: S3Endpoint, bucket: str, tmp_path: Path
) -> None:
    offsite.upload_set(local_set)
    s3_endpoint.client().delete_object(Bucket=bucket, Key=f"{BASE}/manifest.json")

    assert offsite.list_backup_ids("postgres", "full") == [BACKUP_ID]
    assert offsite.read_manifest("postgres", "full", BACKUP_ID) is None
    with pytest.raises(OffsiteError, match=f"backup postgres/full/{BACKUP_ID} at s3://{bucket}/erp is incomplete"):
        offsite.fetch_set("postgres", "full", BACKUP_ID, tmp_path / "restore")
    assert not (tmp_path / "restore").exists()


def test_delete_set_removes_the_manifest_first_then_everything(
    offsite: S3Offsite, tmp_path: Path, s3_endpoint: S3Endpoint, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = {"a.zst": b"a", "b/c.zst": b"c"}
    for backup_id in ("20260102T020000Z", "20260101T020000Z"):
        offsite.upload_set(make_verified_set(tmp_path / "staging", small, backup_id=backup_id))
    assert offsite.list_backup_ids("postgres", "full") == ["20260101T020000Z", "20260102T020000Z"]
    client = offsite.client
    real_delete = client.delete_objects
    batches: list[list[str]] = []

    def recording_delete(**kwargs: dict) -> dict:
        batches.append([obj["Key"] for obj in kwargs["Delete"]["Objects"]])
        return real_delete(**kwargs)

    monkeypatch.setattr(client, "delete_objects", recording_delete)
    deleted = offsite.delete_set("postgres", "full", "20260101T020000Z")

    assert deleted == 4
    assert batches[0] == ["erp/postgres/full/20260101T020000Z/manifest.json"]
    assert offsite.list_backup_ids("postgres", "full") == ["20260102T020000Z"]
    assert all(not key.startswith("erp/postgres/full/20260101T020000Z/") for key in stored_keys(s3_endpoint, bucket))
    assert offsite.delete_set("postgres", "full", "20260101T020000Z") == 0


def test_put_and_get_ledger_files(offsite: S3Offsite, tmp_path: Path, s3_endpoint: S3Endpoint, bucket: str) -> None:
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps({"drills": [{"id": 1}]}))

    offsite.put_file("drill/ledger.json", ledger)

    assert stored_keys(s3_endpoint, bucket) == ["erp/drill/ledger.json"]
    copy = tmp_path / "copy" / "ledger.json"
    assert offsite.get_file("drill/ledger.json", copy) is True
    assert json.loads(copy.read_text()) == {"drills": [{"id": 1}]}
    assert offsite.get_file("drill/none.json", tmp_path / "none.json") is False


def test_connection_config_kwargs_are_honoured_on_top_of_bounded_timeouts(
    s3_endpoint: S3Endpoint, bucket: str, local_set: BackupSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = json.loads(s3_endpoint.conn_json())
    conn["extra"]["config_kwargs"] = {
        "request_checksum_calculation": "when_required", "response_checksum_validation": "when_required",
    }
    monkeypatch.setenv(CONN_ENV, json.dumps(conn))
    offsite = S3Offsite("backup_offsite", bucket, "erp")

    config = offsite.hook.config
    assert config.request_checksum_calculation == "when_required"
    assert (config.connect_timeout, config.read_timeout, config.retries) == (10, 60, {"max_attempts": 3, "mode": "standard"})
    assert offsite.upload_set(local_set).verified


def test_an_undefined_connection_is_named(monkeypatch: pytest.MonkeyPatch, local_set: BackupSet) -> None:
    monkeypatch.delenv(CONN_ENV, raising=False)

    with pytest.raises(OffsiteError, match="Airflow connection 'backup_offsite' is not defined"):
        S3Offsite("backup_offsite", "some-bucket", "erp").upload_set(local_set)


def test_a_missing_bucket_is_named(s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONN_ENV, s3_endpoint.conn_json())

    with pytest.raises(OffsiteError, match=f"endpoint {s3_endpoint.url}, bucket no-such-bucket-x1\\): checking the bucket"):
        S3Offsite("backup_offsite", "no-such-bucket-x1", "erp").list_backup_ids("postgres", "full")


@pytest.fixture
def doomed_endpoint() -> Iterator[S3Endpoint]:
    """A private moto server this test may stop (the session one is shared)."""
    endpoint = start_s3()
    yield endpoint
    try:
        endpoint.stop()
    except Exception:  # already stopped by the test
        pass


def test_s3_down_during_upload_is_a_clear_error(
    doomed_endpoint: S3Endpoint, local_set: BackupSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doomed_endpoint.client().create_bucket(Bucket="offsite-outage")
    monkeypatch.setenv(CONN_ENV, doomed_endpoint.conn_json())
    offsite = S3Offsite("backup_offsite", "offsite-outage", "erp")
    client = offsite.client
    real_upload = client.upload_file
    uploads: list[str] = []

    def outage_after_the_first_upload(filename: str, bucket: str, key: str, **kwargs: object) -> None:
        if uploads:
            doomed_endpoint.stop()
        uploads.append(key)
        real_upload(filename, bucket, key, **kwargs)

    monkeypatch.setattr(client, "upload_file", outage_after_the_first_upload)

    with pytest.raises(OffsiteError) as raised:
        offsite.upload_set(local_set)
    message = str(raised.value)
    assert f"(endpoint {doomed_endpoint.url}, bucket offsite-outage): uploading {uploads[1]} failed" in message
    assert SECRET_KEY not in message
    assert local_set.state is SetState.VERIFIED

    with pytest.raises(OffsiteError, match=f"endpoint {doomed_endpoint.url}, bucket offsite-outage"):
        offsite.fetch_set("postgres", "full", BACKUP_ID, tmp_path / "restore")
    assert not (tmp_path / "restore").exists()
