"""MinIO pure logic: plan options, key → file mapping, the change-detection rule, checksums,
restore targets, and the structural `verify` of a hand-built set."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk import Connection

from erp_backup.manifest import Manifest
from erp_backup.plan import load_plan
from erp_backup.services import get_service
from erp_backup.services import minio as svc
from erp_backup.services.base import (
    ConnectionMissing,
    ContainerSpec,
    PointInTimeUnavailable,
    ScratchSpec,
    TargetUsageError,
)
from erp_backup.sets import BackupSet
from erp_backup.stream import stream_to_file
from tests.fixtures.factories import make_manifest

BUCKET = "erp-documents"
ODD_KEYS = [
    "계약서/2026년 1월 견적서.pdf", "a+b=c.txt", "100% done.txt", "x%2Fy", "../../etc/passwd", "a/./b//c",
    "dir/", " lead and trail ", "q?&=#", "é" * 400,
]


# -- the plan -----------------------------------------------------------------------------------------


def test_the_plan_schedules_a_daily_incremental_and_a_weekly_snapshot_with_default_options() -> None:
    plan = load_plan()
    full, snapshot = plan.job("minio", "full"), plan.job("minio", "snapshot")
    assert (full.schedule, full.retention, full.connections["source"]) == ("0 3 * * *", timedelta(days=30), "erp_minio")
    assert snapshot.retention == timedelta(days=90) and snapshot.schedule.split()[2:] == ["*", "*", "0"]
    assert svc.SUPPORTED_TYPES == {"full", "snapshot"} and svc.INCREMENTAL_TYPES == {"full"}
    for job in (full, snapshot):
        assert svc.MirrorOptions.from_options(job.options) == svc.MirrorOptions(
            buckets=("erp-documents",), max_workers=8, compress=False, compress_level=3
        )


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"buckets": "erp-documents"}, "buckets"),
        ({"buckets": []}, "buckets"),
        ({"buckets": ["a", "b"]}, "buckets"),
        ({"buckets": ["erp-documents", "erp-documents"]}, "buckets"),
        ({"buckets": ["Erp_Documents"]}, "buckets"),
        ({"buckets": ["../etc"]}, "buckets"),
        ({"max_workers": 0}, "max_workers"),
        ({"max_workers": True}, "max_workers"),
        ({"max_workers": "8"}, "max_workers"),
        ({"compress": "yes"}, "compress"),
        ({"compress_level": 30}, "compress_level"),
    ],
)
def test_invalid_options_name_the_plan_field(options: dict, field: str) -> None:
    with pytest.raises(svc.MinioError, match=rf"services\.minio\.options\.{field}"):
        svc.MirrorOptions.from_options(options)


def test_no_set_is_protected_because_every_set_is_self_contained() -> None:
    plan = load_plan()
    now = datetime(2026, 1, 2, 3, tzinfo=timezone.utc)
    assert svc.protected_sets(plan, plan.job("minio", "full"), now=now) == {}


# -- names ---------------------------------------------------------------------------------------------


def test_any_key_maps_to_a_short_safe_unique_file_name() -> None:
    files = [svc.object_file(BUCKET, key) for key in ODD_KEYS]
    pattern = re.compile(rf"^objects/{BUCKET}/([0-9a-f]{{2}})/(\1[0-9a-f]{{62}})$")
    assert all(pattern.match(name) for name in files), files
    assert len(set(files)) == len(ODD_KEYS)
    assert svc.object_file(BUCKET, "a+b=c.txt") == svc.object_file(BUCKET, "a+b=c.txt")  # deterministic
    digest = hashlib.sha256("계약서/2026년 1월 견적서.pdf".encode()).hexdigest()
    assert svc.object_file(BUCKET, "계약서/2026년 1월 견적서.pdf", compressed=True) == f"objects/{BUCKET}/{digest[:2]}/{digest}.zst"
    assert svc.object_file("other-bucket", "a+b=c.txt") != svc.object_file(BUCKET, "a+b=c.txt")
    assert svc.config_file(BUCKET) == f"buckets/{BUCKET}/config.json"


def test_times_compare_at_whole_seconds_in_utc() -> None:
    listed = datetime(2026, 1, 1, 3, 0, 5, 123000, tzinfo=timezone.utc)
    header = datetime(2026, 1, 1, 12, 0, 5, tzinfo=timezone(timedelta(hours=9)))
    assert svc.normalized_time(listed) == svc.normalized_time(header) == "2026-01-01T03:00:05Z"
    assert svc.normalized_time(datetime(2026, 1, 1, 3, 0, 5)) == "2026-01-01T03:00:05Z"  # naive = UTC


# -- the change-detection rule -----------------------------------------------------------------------


LISTED = svc.Listed(BUCKET, "doc.pdf", 10, "9e107d9d372bb6826bd81d3542a419d6", "2026-01-01T03:00:05Z", ("CRC32",))
PREVIOUS = {"size": 10, "etag": LISTED.etag, "last_modified": LISTED.last_modified, "sha256": "ab" * 32}


@pytest.mark.parametrize(
    ("listed", "previous", "incremental", "action"),
    [
        (LISTED, PREVIOUS, True, svc.Action.REUSE),
        (LISTED, PREVIOUS, False, svc.Action.DOWNLOAD),  # snapshot: never reuse
        (LISTED, None, True, svc.Action.DOWNLOAD),  # new object
        (LISTED, {**PREVIOUS, "size": 11}, True, svc.Action.DOWNLOAD),
        (LISTED, {**PREVIOUS, "etag": "0" * 32}, True, svc.Action.DOWNLOAD),
        (LISTED, {**PREVIOUS, "last_modified": "2026-01-01T03:00:04Z"}, True, svc.Action.DOWNLOAD),
        (  # rewritten, but it carries a SHA-256: a HEAD decides
            svc.Listed(BUCKET, "doc.pdf", 10, "0" * 32, "2026-01-02T03:00:00Z", ("SHA256",)),
            PREVIOUS, True, svc.Action.CHECK_SHA256,
        ),
        (  # multipart: its checksum is a composite, never the object's SHA-256
            svc.Listed(BUCKET, "doc.pdf", 10, "0" * 32 + "-3", "2026-01-02T03:00:00Z", ("SHA256",)),
            PREVIOUS, True, svc.Action.DOWNLOAD,
        ),
        (  # a multipart object unchanged by ETag and time is reused like any other
            svc.Listed(BUCKET, "doc.pdf", 10, "0" * 32 + "-3", "2026-01-01T03:00:05Z", ()),
            {**PREVIOUS, "etag": "0" * 32 + "-3"}, True, svc.Action.REUSE,
        ),
    ],
)
def test_plan_object_follows_the_documented_rule(listed, previous, incremental, action) -> None:
    assert svc.plan_object(listed, previous, incremental) is action


def test_a_listing_entry_is_normalised() -> None:
    listed = svc.Listed.from_listing(BUCKET, {
        "Key": "계약서.pdf", "Size": 42, "ETag": '"abc"', "ChecksumAlgorithm": ["SHA256"],
        "LastModified": datetime(2026, 1, 1, 3, 0, 5, 999000, tzinfo=timezone.utc),
    })
    assert listed == svc.Listed(BUCKET, "계약서.pdf", 42, "abc", "2026-01-01T03:00:05Z", ("SHA256",))


# -- checksums ----------------------------------------------------------------------------------------


def test_only_a_single_part_checksum_is_taken_as_the_objects_sha256() -> None:
    digest = hashlib.sha256(b"document").digest()
    b64 = base64.b64encode(digest).decode()
    assert svc.whole_object_sha256({"ChecksumSHA256": b64, "ETag": '"abc"'}) == digest.hex()
    assert svc.whole_object_sha256({"ChecksumSHA256": b64, "ETag": '"abc"', "ChecksumType": "FULL_OBJECT"}) == digest.hex()
    assert svc.whole_object_sha256({"ChecksumSHA256": b64 + "-3", "ETag": '"abc"'}) is None
    assert svc.whole_object_sha256({"ChecksumSHA256": b64, "ETag": '"abc-3"'}) is None
    assert svc.whole_object_sha256({"ChecksumSHA256": b64, "ETag": '"abc"', "ChecksumType": "COMPOSITE"}) is None
    assert svc.whole_object_sha256({"ETag": '"abc"'}) is None
    assert svc.whole_object_sha256({"ChecksumSHA256": "not base64!", "ETag": '"abc"'}) is None
    assert svc.b64_sha256(digest.hex()) == b64


def test_composite_checksum_and_part_sizes() -> None:
    parts = [b"a" * 10, b"b" * 4]
    expected = base64.b64encode(hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()).decode()
    assert svc.composite_sha256(hashlib.sha256(p).digest() for p in parts) == expected
    assert svc.part_size_for(1) == svc.part_size_for(svc.PART_SIZE * svc.MAX_PARTS) == svc.PART_SIZE
    huge = 200 * 1024**3
    size = svc.part_size_for(huge)
    assert size % svc.MIB == 0 and -(-huge // size) <= svc.MAX_PARTS and size > svc.PART_SIZE


# -- restore targets and connections ---------------------------------------------------------------------


def test_restore_targets_come_from_mappings_or_objects_with_a_normalised_prefix() -> None:
    from_dict = svc.RestoreTarget.of({"conn_id": "erp_minio_dr", "bucket": "erp-restored", "prefix": "/drill/2026"})
    assert (from_dict.bucket, from_dict.prefix, from_dict.conn_id) == ("erp-restored", "drill/2026/", "erp_minio_dr")
    assert svc.target_key(from_dict.prefix, "계약서.pdf") == "drill/2026/계약서.pdf"
    from_object = svc.RestoreTarget.of(SimpleNamespace(
        bucket="erp-restored", endpoint_url="http://minio:9000", access_key="AK", secret_key="very-secret", prefix=None,
    ))
    assert (from_object.prefix, from_object.endpoint_url) == ("", "http://minio:9000")
    assert "very-secret" not in repr(from_object)
    assert from_object.description == "s3://erp-restored/"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"conn_id": "x"}, "'bucket' is required"),
        ({"bucket": "erp-restored"}, "give 'conn_id'"),
        ({"bucket": "erp-restored", "conn_id": "x", "bukket": "typo"}, "unknown field 'bukket'"),
        ({"bucket": "Not_Valid", "conn_id": "x"}, "not a valid bucket name"),
    ],
)
def test_bad_restore_targets_say_what_to_fix(target: dict, message: str) -> None:
    with pytest.raises(svc.MinioError, match=message):
        svc.RestoreTarget.of(target)


def test_endpoint_host_never_shows_credentials() -> None:
    conn = SimpleNamespace(extra_dejson={"endpoint_url": "http://user:pw@minio.internal:9000/"})
    assert svc.endpoint_host(conn) == "minio.internal:9000"
    assert "default AWS endpoint" in svc.endpoint_host(SimpleNamespace(extra_dejson={}))


# -- verify on a hand-built set -----------------------------------------------------------------------


def build_set(root: Path, objects: dict[str, bytes], compress: bool = False) -> tuple[BackupSet, Manifest]:
    backup_set = BackupSet(root, "minio", "full", "20260101T030000Z")
    backup_set.create_dir()
    config = {"bucket": BUCKET, "policy": {"present": False}}
    files = [stream_to_file([json.dumps(config).encode()], backup_set.path, svc.config_file(BUCKET), compress=False).entry]
    entries = []
    for key, data in objects.items():
        relative = svc.object_file(BUCKET, key, compress)
        files.append(stream_to_file([data], backup_set.path, relative, compress=compress).entry)
        entries.append({"bucket": BUCKET, "key": key, "file": relative, "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "compressed": compress})
    moment = datetime(2026, 1, 1, 3, tzinfo=timezone.utc)
    manifest = make_manifest(
        service="minio", backup_type="full", backup_id=backup_set.backup_id, captured_started_at=moment, files=files,
        details={
            "buckets": {BUCKET: {"objects": len(objects), "bytes": sum(map(len, objects.values())),
                                 "config_file": svc.config_file(BUCKET)}},
            "transfer": {"objects_transferred": len(objects), "objects_reused": 0},
            "objects": entries,
        },
    )
    return backup_set, manifest


OBJECTS = {"계약서.pdf": b"%PDF contract", "a+b.txt": b"plus", "empty": b""}


@pytest.mark.parametrize("compress", [False, True])
def test_verify_accepts_a_consistent_set(tmp_path: Path, compress: bool) -> None:
    backup_set, manifest = build_set(tmp_path, OBJECTS, compress)
    assert svc.verify(backup_set, manifest) == []
    assert svc.verify(backup_set, manifest, rehash=True) == []


def test_verify_finds_missing_truncated_and_inconsistent_entries(tmp_path: Path) -> None:
    backup_set, manifest = build_set(tmp_path, OBJECTS)
    objects = {entry["key"]: entry for entry in manifest.details["objects"]}
    (backup_set.path / objects["계약서.pdf"]["file"]).unlink()
    with open(backup_set.path / objects["a+b.txt"]["file"], "r+b") as handle:
        handle.truncate(2)
    manifest.details["buckets"][BUCKET]["objects"] = 7
    problems = svc.verify(backup_set, manifest)
    assert any("계약서.pdf" in p and "missing" in p for p in problems)
    assert any("a+b.txt" in p and "2 bytes" in p for p in problems)
    assert any(f"bucket {BUCKET}: 3 objects" in p for p in problems)


def test_verify_rejects_unsafe_paths_duplicates_and_unreferenced_files(tmp_path: Path) -> None:
    backup_set, manifest = build_set(tmp_path, OBJECTS)
    entries = manifest.details["objects"]
    entries[0]["file"] = "../../outside"
    entries.append(dict(entries[1]))
    problems = svc.verify(backup_set, manifest)
    assert any("unsafe or missing file path '../../outside'" in p for p in problems)
    assert any(p.endswith("listed twice") for p in problems)
    assert any("no object or bucket refers to it" in p for p in problems)


def test_verify_rehash_finds_a_flipped_byte_and_compressed_objects_are_always_hashed(tmp_path: Path) -> None:
    plain, plain_manifest = build_set(tmp_path / "plain", OBJECTS)
    entry = next(e for e in plain_manifest.details["objects"] if e["key"] == "계약서.pdf")
    path = plain.path / entry["file"]
    path.write_bytes(b"%PDF c0ntract")  # same size
    assert svc.verify(plain, plain_manifest) == []  # the checksum step's job without rehash
    assert [p.split(":")[0] for p in svc.verify(plain, plain_manifest, rehash=True)] == [f"{BUCKET}/계약서.pdf"]

    packed, packed_manifest = build_set(tmp_path / "packed", OBJECTS, compress=True)
    entry = next(e for e in packed_manifest.details["objects"] if e["key"] == "a+b.txt")
    entry["sha256"] = hashlib.sha256(b"else").hexdigest()
    assert any("a+b.txt" in p and "sha256" in p for p in svc.verify(packed, packed_manifest))


def test_verify_requires_the_object_list(tmp_path: Path) -> None:
    backup_set, manifest = build_set(tmp_path, OBJECTS)
    manifest.details = {}
    assert "no object list" in svc.verify(backup_set, manifest)[0]


def test_restore_preflight_names_missing_files_before_anything_is_written(tmp_path: Path) -> None:
    backup_set, manifest = build_set(tmp_path, OBJECTS)
    (backup_set.path / manifest.details["objects"][1]["file"]).unlink()
    report = svc.restore(backup_set.path, manifest, {"bucket": "erp-restored", "endpoint_url": "http://127.0.0.1:9"},
                         options={"get_connection": lambda conn_id: pytest.fail("no connection may be made")})
    assert "nothing was written" in report.details["buckets"][BUCKET]["failed"]
    assert report.problems == [f"{BUCKET}/a+b.txt: its file {manifest.details['objects'][1]['file']} "
                               f"is missing from {backup_set.path}"]



def test_restore_refuses_a_key_prefix_that_matches_nothing_and_an_unknown_bucket(tmp_path: Path) -> None:
    backup_set, manifest = build_set(tmp_path, OBJECTS)
    never = {"bucket": "erp-restored", "endpoint_url": "http://127.0.0.1:9"}
    with pytest.raises(svc.MinioError, match="no object of bucket erp-documents has a key starting with 'nope/'"):
        svc.restore(backup_set.path, manifest, never, options={"key_prefix": "nope/"})
    with pytest.raises(svc.MinioError, match="has no bucket 'erp-other'"):
        svc.restore(backup_set.path, manifest, never, options={"source_bucket": "erp-other"})


def test_an_undefined_target_connection_says_how_to_define_it(tmp_path: Path) -> None:
    backup_set, manifest = build_set(tmp_path, OBJECTS)

    def undefined(conn_id: str) -> None:
        raise LookupError(f"The conn_id `{conn_id}` isn't defined")

    with pytest.raises(svc.MinioError, match="'erp_minio_dr' is not defined.*AIRFLOW_CONN_ERP_MINIO_DR"):
        svc.restore(backup_set.path, manifest, {"bucket": "erp-restored", "conn_id": "erp_minio_dr"},
                    options={"get_connection": undefined})


# -- the rest of the service contract ---------------------------------------------------------------


def _no_connections(conn_id: str) -> Connection:
    raise LookupError(f"The conn_id `{conn_id}` isn't defined")


def test_the_contract_types_and_defaults() -> None:
    assert get_service("minio") is svc
    assert svc.RESTORE_TYPES == svc.DRILL_TYPES == {"full", "snapshot"} and svc.PITR_TYPES == frozenset()
    plan = load_plan()
    moment = datetime(2026, 1, 2, 3, tzinfo=timezone.utc)
    assert svc.after_prune(plan, plan.job("minio", "full"), now=moment, dry_run=False) == {}
    with pytest.raises(PointInTimeUnavailable):
        svc.plan_point_in_time([], moment)


def test_cli_target_resolves_the_connection_and_never_shows_its_secret() -> None:
    conn = Connection(conn_id="minio_dr", conn_type="aws", login="AK", password="very-secret",
                      extra=json.dumps({"endpoint_url": "http://minio-dr:9000"}))
    chosen = svc.target_from_cli("full", "s3://restored/docs/2026/", "minio_dr", {"minio_dr": conn}.__getitem__)
    target = chosen.target
    assert (target.bucket, target.prefix, target.conn_id, target.connection) == ("restored", "docs/2026/", "minio_dr", conn)
    assert chosen.description == "s3://restored/docs/2026 (connection minio_dr, minio-dr:9000)"
    assert "very-secret" not in chosen.description and "very-secret" not in repr(chosen)
    assert svc.target_from_cli("snapshot", "s3://restored", "minio_dr", {"minio_dr": conn}.__getitem__).target.prefix == ""


@pytest.mark.parametrize(("target", "target_conn", "message"), [
    (None, "minio_dr", "minio restores need --target s3://bucket[/prefix], got None"),
    ("/tmp/dir", "minio_dr", "need --target s3://bucket[/prefix]"),
    ("s3:///prefix-only", "minio_dr", "need --target s3://bucket[/prefix]"),
    ("s3://restored/p", None, "minio restores need --target-conn"),
    ("s3://Not_A_Bucket/p", "minio_dr", "is not a valid bucket name"),
])
def test_bad_cli_targets_say_what_is_expected(target: str | None, target_conn: str | None, message: str) -> None:
    with pytest.raises(TargetUsageError, match=re.escape(message)):
        svc.target_from_cli("full", target, target_conn, _no_connections)


def test_an_undefined_cli_target_connection_fails_before_any_restore() -> None:
    with pytest.raises(ConnectionMissing, match="AIRFLOW_CONN_MINIO_DR"):
        svc.target_from_cli("full", "s3://restored", "minio_dr", _no_connections)


def test_scratch_spec_and_target_keep_the_secret_out_of_the_spec() -> None:
    expected = ScratchSpec("s3", ContainerSpec("minio/minio:latest", 9000, {"MINIO_ROOT_USER": "drill"},
                                               ("server", "/data"), secret_env=("MINIO_ROOT_PASSWORD",),
                                               uri_scheme="http"))
    assert svc.scratch_spec("full", {}) == svc.scratch_spec("snapshot", {"minio": "x"}) == expected
    info = SimpleNamespace(kind="s3", uri="http://127.0.0.1:9100", secret="one-off-pw")
    assert svc.scratch_target(info) == {"endpoint_url": "http://127.0.0.1:9100", "access_key": "drill",
                                        "secret_key": "one-off-pw", "region": "us-east-1", "create_bucket": True}


def test_versions_and_source_size(tmp_path: Path) -> None:
    _, manifest = build_set(tmp_path, OBJECTS)
    assert svc.versions(manifest) == {}
    assert svc.source_size(manifest) == sum(map(len, OBJECTS.values()))
    manifest.details = {"objects": []}
    assert svc.source_size(manifest) is None


def test_unknown_restore_options_are_named(tmp_path: Path) -> None:
    backup_set, manifest = build_set(tmp_path, OBJECTS)
    with pytest.raises(svc.MinioError, match=r"unknown MinIO restore option\(s\) \['keyprefix'\]"):
        svc.restore(backup_set.path, manifest, {"bucket": "erp-restored", "endpoint_url": "http://127.0.0.1:9"},
                    options={"keyprefix": "a/"})
