"""MinIO (S3 API): dated copies of the configured buckets (objects and bucket configuration), and restore.

Owns `backup_minio_full` (daily, incremental, 30 d) and `backup_minio_snapshot` (weekly, 90 d).
The source is the `aws` connection `erp_minio` (`endpoint_url` in its extra), reached through the
Amazon provider's `S3Hook` and its boto3 client. Plan options: `buckets` (default
`["erp-documents"]`), `max_workers` (concurrent object transfers, default 8), `compress` (zstd
per object, default false: ERP documents are mostly PDFs, images and office files that are
already compressed) and `compress_level` (default 3).

Layout of a set::

    objects/<bucket>/<h[:2]>/<h>[.zst]   one file per object; h = hex SHA-256 of the UTF-8 key
    buckets/<bucket>/config.json         policy, versioning, lifecycle, tags (each may be absent)

Keys may hold any Unicode, `/`, `..`, `%`, `+` or be longer than a file name may be, so file
names come from a hash of the key; the real key lives only in the manifest:
`details.objects[i]` = bucket, key, file, size, sha256 (of the object's bytes), content_type,
metadata (user metadata), version_id, etag, last_modified, compressed, `reused_from` when
the file was taken from an earlier set, and `source_checksum_sha256` when the source's own
whole-object checksum confirmed the download. Only current versions are copied (older versions and
delete markers are not); the dated sets are the history.

Incremental `full`, by hardlink. An unchanged object is not downloaded again: its file in the
previous complete set is hardlinked into the new set (copied, and re-hashed, where a hardlink
is impossible). Every set is therefore complete on its own, while unchanged objects share
disk blocks. We chose this over references to older sets because:

- a restore reads one set, and an offsite copy of one set (`fetch_set`) is restorable alone;
- retention stays per set: deleting an old set only drops link counts, and a set never
  depends on another, so `protected_sets` protects nothing (a reference design would have to
  keep the set holding a never-changing object forever, and a disaster restore from offsite
  would need every set of the chain);
- `reused_from` is informational only, never needed to find a file.

The cost: the offsite upload sends every object of every set again (offsite deduplication is
per set key), and the checksum step re-reads unchanged objects every day. A file is never
modified in place (stream files are created with O_EXCL, restores only read), so sharing an
inode between sets is safe; bit rot in a shared file affects every set holding it, and the
checksum step of the newest set finds it.

The previous set is the newest VERIFIED or OFFSITE set of the same type (not unverified or
corrupt ones). An object is reused when it has a previous entry of the same bucket and key
with the same size and either

1. the same ETag and the same LastModified (UTC, truncated to whole seconds, since listings
   and HEAD responses differ in precision): no request is made for the object at all. Any
   change of content or metadata rewrites the object, so it gets a new LastModified (the one
   blind spot: a metadata-only rewrite within the same second as the previous listing); or
2. otherwise, if the listing says the object carries a SHA-256 checksum: a
   `HEAD ?ChecksumMode=ENABLED` returns a whole-object `ChecksumSHA256` (single-part: the ETag
   has no `-N` suffix, the checksum has none and ChecksumType is not COMPOSITE) equal to the
   previous SHA-256. Content type, user metadata and version id then come from that HEAD.

Anything else is downloaded and hashed while streaming. A multipart object's ETag and
composite checksum are never taken as its SHA-256. `snapshot` downloads every object, always:
it is an independent full copy that never reuses another set's files.


Modules: `layout` (names, options, change detection), `endpoint` (S3 clients and errors),
`bucket_config`, `mirror` (backup), `integrity` (verify), `restore`. This module holds the
service verbs and the drill's check of a restored scratch S3 endpoint.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from erp_backup.manifest import HASH_CHUNK, Manifest
from erp_backup.plan import BackupJob, Plan
from erp_backup.s3 import MIB, b64_sha256, composite_sha256, is_multipart_etag, whole_object_sha256
from erp_backup.services.base import (
    CheckContext,
    Checks,
    CliTarget,
    ContainerSpec,
    RestoreReport,
    ScratchSpec,
    TargetUsageError,
    airflow_connection,
    connection_for,
)
from erp_backup.services.base import newest_set_at as sets_at
from erp_backup.services.base import no_after_prune as after_prune
from erp_backup.services.base import no_point_in_time as plan_point_in_time
from erp_backup.services.base import no_point_in_time_range as point_in_time_range
from erp_backup.services.base import no_restore_to_time as restore_to_time
from erp_backup.services.minio.bucket_config import capture_bucket_config, config_summary, restore_bucket_config
from erp_backup.services.minio.endpoint import Endpoint, endpoint_host, s3_client
from erp_backup.services.minio.integrity import verify
from erp_backup.services.minio.layout import (
    DEFAULT_BUCKETS,
    DEFAULT_MAX_WORKERS,
    INCREMENTAL_TYPES,
    LAYOUT,
    MAX_PARTS,
    PART_SIZE,
    SUPPORTED_TYPES,
    Action,
    BucketMissing,
    Listed,
    MinioError,
    MirrorOptions,
    RestoreFailed,
    config_file,
    normalized_prefix,
    normalized_time,
    object_file,
    part_size_for,
    plan_object,
    target_key,
    valid_bucket_name,
)
from erp_backup.services.minio.mirror import backup, previous_set
from erp_backup.services.minio.records import read_records
from erp_backup.services.minio.restore import RESTORE_OPTIONS as _RESTORE_OPTION_NAMES
from erp_backup.services.minio.restore import (
    RestoreTarget,
    bucket_targets,
    restore_bucket,
    target_endpoint,
)
from erp_backup.services.minio.restore import restore_set as restore

if TYPE_CHECKING:
    from erp_backup.scratch.base import TargetInfo

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_MAX_WORKERS",
    "DRILL_TYPES",
    "INCREMENTAL_TYPES",
    "LAYOUT",
    "MAX_PARTS",
    "MIB",
    "PART_SIZE",
    "PITR_TYPES",
    "RESTORE_TYPES",
    "SUPPORTED_TYPES",
    "Action",
    "BucketMissing",
    "Endpoint",
    "Listed",
    "MinioError",
    "MirrorOptions",
    "RestoreFailed",
    "RestoreTarget",
    "after_prune",
    "b64_sha256",
    "backup",
    "capture_bucket_config",
    "check_restored",
    "composite_sha256",
    "config_file",
    "config_summary",
    "endpoint_host",
    "is_multipart_etag",
    "normalized_prefix",
    "normalized_time",
    "object_file",
    "part_size_for",
    "plan_object",
    "plan_point_in_time", "point_in_time_range",
    "previous_set",
    "protected_sets",
    "read_records",
    "restore",
    "restore_bucket",
    "restore_bucket_config",
    "restore_to_time",
    "s3_client",
    "scratch_spec",
    "scratch_target",
    "sets_at",
    "source_size",
    "target_from_cli",
    "target_key",
    "valid_bucket_name",
    "verify",
    "versions",
    "whole_object_sha256",
]

log = logging.getLogger(__name__)

RESTORE_TYPES = SUPPORTED_TYPES
DRILL_TYPES = SUPPORTED_TYPES
RESTORE_OPTIONS = frozenset(_RESTORE_OPTION_NAMES)
DEFAULT_PORTS = {"source": 9000}
CLEAR_DETAILS: frozenset[str] = frozenset()  # bucket and object names stay sealed
PITR_TYPES: frozenset[str] = frozenset()
SCRATCH_IMAGE = "minio/minio:latest"
SCRATCH_USER = "drill"  # the scratch server's root user; its password is the target's one-off secret


def protected_sets(plan: Plan, job: BackupJob, *, now: datetime, offsite: Any = None) -> Mapping[str, str]:
    """Sets retention must keep for other sets' sake: none, since every set is self-contained (hardlinks)."""
    return {}


# -- command line and drill -----------------------------------------------------------------------


def target_from_cli(backup_type: str, target: str | None, target_conn: str | None,
                    get_connection: Callable[[str], Any]) -> CliTarget:
    """--target s3://bucket[/prefix] and --target-conn <aws connection id> (endpoint_url in its extra)."""
    parts = urlsplit(target or "")
    if parts.scheme != "s3" or not parts.netloc:
        raise TargetUsageError(f"minio restores need --target s3://bucket[/prefix], got {target!r}")
    if not target_conn:
        raise TargetUsageError("minio restores need --target-conn: the aws connection id of the target "
                               "(AIRFLOW_CONN_<ID> with endpoint_url in its extra)")
    try:
        bucket = valid_bucket_name(parts.netloc, "--target")
    except MinioError as exc:
        raise TargetUsageError(str(exc)) from exc
    connection = connection_for(target_conn, get_connection)
    prefix = parts.path.strip("/")
    resolved = RestoreTarget(bucket=bucket, prefix=normalized_prefix(prefix), conn_id=target_conn, connection=connection)
    return CliTarget(resolved, f"s3://{bucket}/{prefix} (connection {target_conn}, {endpoint_host(connection)})")


def scratch_spec(backup_type: str, versions: Mapping[str, Any], *, pitr: bool = False) -> ScratchSpec:
    """A scratch S3 endpoint: moto locally, MinIO in Docker (its root password is the target's secret)."""
    return ScratchSpec("s3", ContainerSpec(SCRATCH_IMAGE, 9000, {"MINIO_ROOT_USER": SCRATCH_USER}, ("server", "/data"),
                                           secret_env=("MINIO_ROOT_PASSWORD",), uri_scheme="http"))


def scratch_target(info: TargetInfo) -> dict[str, Any]:
    """RestoreTarget fields without a bucket: every bucket of the set goes into a bucket of the same name."""
    return {"endpoint_url": info.uri, "access_key": SCRATCH_USER, "secret_key": info.secret or SCRATCH_USER,
            "region": "us-east-1", "create_bucket": True}


def versions(manifest: Manifest) -> dict[str, Any]:
    """No server version matters for a scratch S3 endpoint."""
    return {}


def source_size(manifest: Manifest) -> int | None:
    """The bytes of every object copied, from the manifest's bucket summaries."""
    buckets = manifest.details.get("buckets")
    if not isinstance(buckets, dict):
        return None
    total = sum(int(summary.get("bytes") or 0) for summary in buckets.values() if isinstance(summary, dict))
    return total or None


def _object_sha256(client: Any, bucket: str, key: str) -> tuple[int, str]:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    digest, size = hashlib.sha256(), 0
    try:
        for chunk in body.iter_chunks(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    finally:
        body.close()
    return size, digest.hexdigest()


def _check_bucket_objects(endpoint: Endpoint, bucket: str, prefix: str, entries: list[dict[str, Any]]) -> list[str]:
    problems = []
    for item in entries:
        where = f"s3://{bucket}/{target_key(prefix, item['key'])}"
        try:
            size, digest = _object_sha256(endpoint.client, bucket, target_key(prefix, item["key"]))
        except Exception as exc:
            problems.append(f"{where}: missing after restore ({type(exc).__name__})")
            continue
        if (size, digest) != (item["size"], item["sha256"]):
            problems.append(f"{where}: SHA-256 differs from the manifest")
    return problems


def _checked_buckets(target: Any, manifest: Manifest, report: RestoreReport) -> list[tuple[str, RestoreTarget]]:
    """(source bucket, where it was restored) for each bucket the restore wrote."""
    pairs = []
    for source, bucket_target in bucket_targets(target, None, manifest):
        if source is None:  # a target with a bucket holds the one source bucket the restore took
            taken = list(report.details.get("buckets") or {}) or sorted(manifest.details.get("buckets") or {})
            if len(taken) != 1:
                where = RestoreTarget.of(bucket_target).description
                raise MinioError(f"cannot tell which of buckets {taken} was restored into {where}")
            source = taken[0]
        pairs.append((source, RestoreTarget.of(bucket_target)))
    return pairs


def check_restored(target: Any, set_dir: Path, manifest: Manifest, report: RestoreReport, ctx: CheckContext) -> Checks:
    """Every object of the manifest, read back from the target, has the manifest's SHA-256."""
    expected = manifest.details.get("objects")
    if not isinstance(expected, list):
        return Checks(problems=["the MinIO manifest lists no objects (details.objects); "
                                "the restore cannot be checked object by object"])
    checks = Checks()
    for source, restored in _checked_buckets(target, manifest, report):
        endpoint_url = urlsplit(restored.endpoint_url or "")
        if endpoint_url.hostname:
            ctx.guard(endpoint_url.hostname, endpoint_url.port or (443 if endpoint_url.scheme == "https" else 80))
        endpoint = target_endpoint(restored, airflow_connection, DEFAULT_MAX_WORKERS)
        entries = [item for item in expected if item["bucket"] == source]
        problems = _check_bucket_objects(endpoint, restored.bucket, restored.prefix, entries)
        checks.problems.extend(problems)
        checks.checks.append(f"{source} → {restored.description}: {len(entries) - len(problems)}/{len(entries)} "
                             "objects match their SHA-256")
    return checks
