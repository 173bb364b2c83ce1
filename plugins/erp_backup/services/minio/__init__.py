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

Transfers stream `get_object()["Body"].iter_chunks()` into `erp_backup.stream` (SHA-256 while
writing, files 0600) on a thread pool of `max_workers`, with one shared thread-safe client.
The log ends with e.g. "0 objects / 0 bytes transferred, 2007 objects / 12657795 bytes reused
from 20260101T030000Z"; the manifest's `details.transfer` holds the same counts.

Restore copies one source bucket of a set into a target bucket (optionally under a prefix),
with content type and user metadata. Every object's bytes are hashed BEFORE they are
committed: single-part objects (< 8 MiB) are hashed, then sent with `ChecksumAlgorithm=SHA256`;
multipart objects are hashed part by part as they are sent, and the upload is aborted if the
whole-object SHA-256 differs from the manifest. A corrupt stored file therefore never lands in
(or overwrites anything in) the target. Each object is then verified on the target: size,
content type, metadata, and SHA-256 from `ChecksumSHA256` (single-part: equal to the manifest's;
multipart: the composite of the parts we sent), or by re-downloading and hashing when the
target returns no checksum or `verify_mode="download"`. Restores do not overwrite existing keys
unless `overwrite=True`, and `dry_run=True` only reports what would be written. Single-part
bodies are spooled (1 MiB in memory, the rest in a temp file) and multipart parts are sent one
at a time per object, so memory stays at one part (8 MiB or more) per worker. Object versions
are not restored: the target gets new version ids.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from functools import cache
from pathlib import Path, PurePosixPath
from tempfile import SpooledTemporaryFile
from typing import IO, Any
from urllib.parse import urlparse

from erp_backup.manifest import DIR_MODE, HASH_CHUNK, FileEntry, Manifest, ManifestError, sha256_file
from erp_backup.services.base import BackupContext, BackupOutcome, SourceUnavailable, airflow_connection
from erp_backup.sets import BackupSet, list_sets
from erp_backup.stream import stream_to_file

log = logging.getLogger(__name__)

SUPPORTED_TYPES = frozenset({"full", "snapshot"})
INCREMENTAL_TYPES = frozenset({"full"})
DEFAULT_BUCKETS = ("erp-documents",)
DEFAULT_MAX_WORKERS = 8
DEFAULT_COMPRESS_LEVEL = 3
OBJECTS_DIR = "objects"
BUCKETS_DIR = "buckets"
CONFIG_NAME = "config.json"
LAYOUT = "objects/<bucket>/<sha256(key)[:2]>/<sha256(key)>[.zst]"
MIB = 1024 * 1024
PART_SIZE = 8 * MIB  # restore: objects of at least this size go multipart, in parts of this size
MAX_PARTS = 10_000
PROGRESS_EVERY_S = 30.0
RESTORE_TARGET_CONN_ID = "minio_restore_target"
_MULTIPART_SUFFIX = re.compile(r"-\d+$")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONNECTIVITY_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"})
_MISSING_BUCKET_CODES = frozenset({"NoSuchBucket", "404", "NotFound"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_ABSENT_CONFIG = {
    "policy": "NoSuchBucketPolicy",
    "lifecycle": "NoSuchLifecycleConfiguration",
    "tags": "NoSuchTagSet",
}


class MinioError(RuntimeError):
    """A bucket, object or option is wrong. The message names the bucket, key, connection or option."""


class BucketMissing(MinioError):
    """A bucket the plan or a restore target names does not exist."""


class RestoreFailed(MinioError):
    """Some objects could not be restored or failed verification. `report` holds the details."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


# -- options and names (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class MirrorOptions:
    buckets: tuple[str, ...] = DEFAULT_BUCKETS
    max_workers: int = DEFAULT_MAX_WORKERS
    compress: bool = False
    compress_level: int = DEFAULT_COMPRESS_LEVEL

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> MirrorOptions:
        """Validate the plan options; errors name the field under services.minio.options."""
        where = "services.minio.options"
        buckets = options.get("buckets", list(DEFAULT_BUCKETS))
        if isinstance(buckets, str) or not isinstance(buckets, (list, tuple)) or not buckets:
            raise MinioError(f"{where}.buckets must be a non-empty list of bucket names, got {buckets!r}")
        if len(set(buckets)) != len(buckets):
            raise MinioError(f"{where}.buckets lists a bucket twice: {buckets!r}")
        max_workers = options.get("max_workers", DEFAULT_MAX_WORKERS)
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or not 1 <= max_workers <= 64:
            raise MinioError(f"{where}.max_workers must be an integer from 1 to 64, got {max_workers!r}")
        compress = options.get("compress", False)
        if not isinstance(compress, bool):
            raise MinioError(f"{where}.compress must be true or false, got {compress!r}")
        level = options.get("compress_level", DEFAULT_COMPRESS_LEVEL)
        if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 19:
            raise MinioError(f"{where}.compress_level must be an integer from 1 to 19, got {level!r}")
        return cls(
            buckets=tuple(valid_bucket_name(name, f"{where}.buckets") for name in buckets),
            max_workers=max_workers,
            compress=compress,
            compress_level=level,
        )


def valid_bucket_name(name: Any, where: str) -> str:
    """An S3 bucket name (3-63 of a-z 0-9 . -, no `..`), so it is also a safe directory name."""
    if not isinstance(name, str) or not _BUCKET_NAME.match(name) or ".." in name:
        raise MinioError(f"{where}: {name!r} is not a valid bucket name (3-63 characters: a-z, 0-9, '.', '-')")
    return name


def object_file(bucket: str, key: str, compressed: bool = False) -> str:
    """The set-relative file of an object: any key maps to a short, safe, unique name."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{OBJECTS_DIR}/{bucket}/{digest[:2]}/{digest}" + (".zst" if compressed else "")


def config_file(bucket: str) -> str:
    return f"{BUCKETS_DIR}/{bucket}/{CONFIG_NAME}"


def normalized_time(moment: datetime) -> str:
    """UTC, whole seconds: listings (ms) and HEAD/GET headers (s) compare equal."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_multipart_etag(etag: str | None) -> bool:
    return bool(etag) and bool(_MULTIPART_SUFFIX.search(etag.strip('"')))


def whole_object_sha256(response: Mapping[str, Any]) -> str | None:
    """The hex SHA-256 of the whole object from a HEAD/GET response, if it carries one.

    None for multipart objects: their ChecksumSHA256 is a composite of the parts' checksums.
    """
    checksum = response.get("ChecksumSHA256")
    if not checksum or _MULTIPART_SUFFIX.search(checksum) or is_multipart_etag(response.get("ETag")):
        return None
    if response.get("ChecksumType") == "COMPOSITE":
        return None
    try:
        return base64.b64decode(checksum, validate=True).hex()
    except ValueError:
        return None


def b64_sha256(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def composite_sha256(part_digests: Iterable[bytes]) -> str:
    """The S3 composite checksum of a multipart object: SHA-256 of its parts' SHA-256s (base64)."""
    return base64.b64encode(hashlib.sha256(b"".join(part_digests)).digest()).decode()


def part_size_for(size: int) -> int:
    """Restore part size: PART_SIZE, or larger (whole MiB) so an object needs at most 10 000 parts."""
    needed = -(-size // MAX_PARTS)
    return max(PART_SIZE, -(-needed // MIB) * MIB)


def target_key(prefix: str, key: str) -> str:
    return f"{prefix}{key}"


def normalized_prefix(prefix: str | None) -> str:
    """'' or 'a/b/': leading slashes dropped, a trailing slash added."""
    prefix = (prefix or "").lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


@dataclass(frozen=True)
class Listed:
    """One object as the bucket listing shows it."""

    bucket: str
    key: str
    size: int
    etag: str
    last_modified: str  # normalized_time
    checksum_algorithms: tuple[str, ...] = ()

    @classmethod
    def from_listing(cls, bucket: str, item: Mapping[str, Any]) -> Listed:
        return cls(
            bucket=bucket,
            key=item["Key"],
            size=int(item["Size"]),
            etag=str(item.get("ETag", "")).strip('"'),
            last_modified=normalized_time(item["LastModified"]),
            checksum_algorithms=tuple(item.get("ChecksumAlgorithm") or ()),
        )


class Action(str, Enum):
    REUSE = "reuse"  # unchanged by ETag, size and LastModified
    CHECK_SHA256 = "check_sha256"  # HEAD for the whole-object checksum, reuse if it equals the previous
    DOWNLOAD = "download"


def plan_object(listed: Listed, previous: Mapping[str, Any] | None, incremental: bool) -> Action:
    """The change-detection rule of the module docstring, for one listed object."""
    if not incremental or previous is None or previous.get("size") != listed.size:
        return Action.DOWNLOAD
    if previous.get("etag") == listed.etag and previous.get("last_modified") == listed.last_modified:
        return Action.REUSE
    if "SHA256" in listed.checksum_algorithms and not is_multipart_etag(listed.etag):
        return Action.CHECK_SHA256
    return Action.DOWNLOAD


# -- restore target (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreTarget:
    """Where a restore writes: a connection id, or an endpoint with credentials; a bucket; a prefix."""

    bucket: str
    prefix: str = ""
    conn_id: str | None = None
    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None
    create_bucket: bool = False

    @classmethod
    def of(cls, target: Any) -> RestoreTarget:
        """From a RestoreTarget, a mapping, or any object with these attributes."""
        if isinstance(target, RestoreTarget):
            return target
        fields = ("bucket", "prefix", "conn_id", "endpoint_url", "access_key", "secret_key", "region", "create_bucket")
        if isinstance(target, Mapping):
            unknown = sorted(set(target) - set(fields))
            if unknown:
                raise MinioError(f"restore target: unknown field {unknown[0]!r} (allowed: {', '.join(fields)})")
            values = dict(target)
        else:
            values = {name: getattr(target, name) for name in fields if getattr(target, name, None) is not None}
        if not values.get("bucket"):
            raise MinioError("restore target: 'bucket' is required (the bucket to restore into)")
        if not values.get("conn_id") and not values.get("endpoint_url"):
            raise MinioError("restore target: give 'conn_id' (an aws connection) or 'endpoint_url' with credentials")
        resolved = cls(**values)
        valid_bucket_name(resolved.bucket, "restore target bucket")
        return dataclasses.replace(resolved, prefix=normalized_prefix(resolved.prefix))

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


# -- S3 client --------------------------------------------------------------------------------------


def endpoint_host(connection: Any) -> str:
    """host:port of the connection's endpoint (never credentials)."""
    extra = getattr(connection, "extra_dejson", None) or {}
    url = extra.get("endpoint_url") or (extra.get("service_config") or {}).get("s3", {}).get("endpoint_url")
    if not url:
        return "the default AWS endpoint (no endpoint_url in the connection extra)"
    parsed = urlparse(url)
    return parsed.netloc.rsplit("@", 1)[-1] or url


def s3_client(connection: Any, max_workers: int) -> Any:
    """The boto3 client of an S3Hook on `connection`: bounded timeouts and retries, a pool per worker.

    `config_kwargs` in the connection extra override the defaults key by key (e.g.
    request_checksum_calculation=when_required for older MinIO).
    """
    from erp_backup.s3 import s3_hook

    return s3_hook(connection, max_pool_connections=max_workers + 4).get_conn()


@contextmanager
def _s3_errors(conn_id: str, host: str, action: str) -> Iterator[None]:
    """Unreachable or refused → SourceUnavailable; a missing bucket or other error → MinioError."""
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

    try:
        yield
    except (ConnectionError, HTTPClientError) as exc:
        raise SourceUnavailable(
            f"MinIO connection {conn_id!r}: cannot reach endpoint {host} while {action}: {exc}"
        ) from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _CONNECTIVITY_CODES:
            raise SourceUnavailable(
                f"MinIO connection {conn_id!r} (endpoint {host}) refused {action} ({code}): check the "
                "connection's login/password (access key/secret key) and the user's policy"
            ) from exc
        raise MinioError(f"MinIO connection {conn_id!r} (endpoint {host}): {action} failed: {exc}") from exc
    except BotoCoreError as exc:
        raise MinioError(f"MinIO connection {conn_id!r} (endpoint {host}): {action} failed: {exc}") from exc


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


@dataclass
class _Endpoint:
    conn_id: str
    host: str
    client: Any

    def errors(self, action: str) -> Any:
        return _s3_errors(self.conn_id, self.host, action)

    def check_bucket(self, bucket: str) -> None:
        from botocore.exceptions import ClientError

        with self.errors(f"checking bucket {bucket}"):
            try:
                self.client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if _error_code(exc) in _MISSING_BUCKET_CODES:
                    raise BucketMissing(
                        f"bucket {bucket!r} does not exist at {self.host} (connection {self.conn_id!r}); "
                        "fix services.minio.options.buckets in the plan or the restore target"
                    ) from exc
                raise


# -- bucket configuration -------------------------------------------------------------------------


def capture_bucket_config(endpoint: _Endpoint, bucket: str) -> dict[str, Any]:
    """Policy, versioning, lifecycle and tags; an absent one is recorded as `{"present": false}`."""
    from botocore.exceptions import ClientError

    client = endpoint.client

    def read(name: str, call: Callable[[], dict[str, Any]], pick: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        with endpoint.errors(f"reading the {name} of bucket {bucket}"):
            try:
                return {"present": True, **pick(call())}
            except ClientError as exc:
                code = _error_code(exc)
                if code == _ABSENT_CONFIG.get(name):
                    return {"present": False}
                if code in ("NotImplemented", "XNotImplemented"):
                    return {"present": False, "unsupported": code}
                raise

    versioning = read("versioning", lambda: client.get_bucket_versioning(Bucket=bucket),
                      lambda r: {"status": r.get("Status", "Unversioned"), "mfa_delete": r.get("MFADelete")})
    return {
        "bucket": bucket,
        "policy": read("policy", lambda: client.get_bucket_policy(Bucket=bucket),
                       lambda r: {"policy": json.loads(r["Policy"])}),
        "versioning": versioning,
        "lifecycle": read("lifecycle", lambda: client.get_bucket_lifecycle_configuration(Bucket=bucket),
                          lambda r: {"rules": r.get("Rules", [])}),
        "tags": read("tags", lambda: client.get_bucket_tagging(Bucket=bucket),
                     lambda r: {"tags": {tag["Key"]: tag["Value"] for tag in r.get("TagSet", [])}}),
    }


def config_summary(config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "policy": config["policy"]["present"],
        "versioning": config["versioning"].get("status", "Unversioned") if config["versioning"]["present"] else None,
        "lifecycle": config["lifecycle"]["present"],
        "tags": config["tags"]["present"],
    }


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=_json_default) + "\n").encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- backup ---------------------------------------------------------------------------------------


@dataclass
class _Captured:
    record: dict[str, Any]
    file: FileEntry
    transferred: bool


@dataclass
class _Base:
    """The previous complete set an incremental backup reuses files from."""

    backup_set: BackupSet
    objects: dict[tuple[str, str], dict[str, Any]]
    files: dict[str, FileEntry]

    @property
    def backup_id(self) -> str:
        return self.backup_set.backup_id


def previous_set(current: BackupSet) -> _Base | None:
    """The newest verified (or offsite) set of the same type, other than `current`, with its index."""
    candidates = [
        candidate for candidate in list_sets(current.root, current.service, current.backup_type)
        if candidate.backup_id != current.backup_id and candidate.state.is_good
    ]
    for candidate in reversed(candidates):
        try:
            manifest = candidate.manifest()
        except ManifestError as exc:
            log.warning("minio: cannot read %s, not reusing it: %s", candidate.key, exc)
            continue
        objects = manifest.details.get("objects")
        if not isinstance(objects, list):
            log.warning("minio: %s has no object list in its manifest, not reusing it", candidate.key)
            continue
        return _Base(
            backup_set=candidate,
            objects={(entry["bucket"], entry["key"]): entry for entry in objects},
            files={entry.path: entry for entry in manifest.files},
        )
    return None


class _Progress:
    """Counts finished objects and logs every PROGRESS_EVERY_S seconds."""

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        self.done = self.transferred_bytes = 0
        self._lock = threading.Lock()
        self._last = self._started = time.monotonic()

    def add(self, captured: _Captured | None) -> None:
        with self._lock:
            self.done += 1
            if captured is not None and captured.transferred:
                self.transferred_bytes += captured.record["size"]
            now = time.monotonic()
            if now - self._last >= PROGRESS_EVERY_S:
                self._last = now
                log.info("%s: %d/%d objects done, %d bytes transferred in %.0f s",
                         self.label, self.done, self.total, self.transferred_bytes, now - self._started)


class _Mirror:
    """Copies the listed objects of one backup into its set directory."""

    def __init__(self, endpoint: _Endpoint, set_dir: Path, options: MirrorOptions, base: _Base | None, incremental: bool):
        self.endpoint, self.set_dir, self.options = endpoint, set_dir, options
        self.base, self.incremental = base, incremental

    def capture(self, listed: Listed) -> _Captured | None:
        """Reuse or download one object; None if it vanished since the listing."""
        previous = self.base.objects.get((listed.bucket, listed.key)) if self.base else None
        action = plan_object(listed, previous, self.incremental)
        if action is Action.REUSE:
            assert previous is not None
            reused = self._link(previous, previous)
            if reused:
                return reused
        elif action is Action.CHECK_SHA256:
            assert previous is not None
            head = self._head(listed)
            if head is None:
                return None
            if whole_object_sha256(head) == previous["sha256"] and head.get("ContentLength") == previous["size"]:
                reused = self._link(previous, self._record(listed, head, previous["sha256"], previous["compressed"]))
                if reused:
                    return reused
        return self._download(listed)

    def _head(self, listed: Listed) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        with self.endpoint.errors(f"reading {listed.bucket}/{listed.key}"):
            try:
                return self.endpoint.client.head_object(Bucket=listed.bucket, Key=listed.key, ChecksumMode="ENABLED")
            except ClientError as exc:
                if _error_code(exc) in _MISSING_KEY_CODES:
                    log.warning("minio: %s/%s was deleted after the listing; skipped", listed.bucket, listed.key)
                    return None
                raise

    def _record(self, listed: Listed, response: Mapping[str, Any], sha256: str, compressed: bool) -> dict[str, Any]:
        last_modified = response.get("LastModified")
        return {
            "bucket": listed.bucket,
            "key": listed.key,
            "file": object_file(listed.bucket, listed.key, compressed),
            "size": int(response.get("ContentLength", listed.size)),
            "sha256": sha256,
            "content_type": response.get("ContentType"),
            "metadata": dict(response.get("Metadata") or {}),
            "version_id": response.get("VersionId"),
            "etag": str(response.get("ETag", listed.etag)).strip('"'),
            "last_modified": normalized_time(last_modified) if last_modified else listed.last_modified,
            "compressed": compressed,
        }

    def _link(self, previous: Mapping[str, Any], record: Mapping[str, Any]) -> _Captured | None:
        """Hardlink the previous set's file into this set (or copy it); None if it is unusable."""
        assert self.base is not None
        relative = previous["file"]
        stored = self.base.files.get(relative)
        source = self.base.backup_set.path / relative
        target = self.set_dir / relative
        if stored is None or not source.is_file() or source.stat().st_size != stored.size:
            log.warning("minio: %s's file %s is missing or changed in %s; downloading it again",
                        previous["key"], relative, self.base.backup_id)
            return None
        target.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        try:
            os.link(source, target)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            copied = stream_to_file(_file_chunks(source), self.set_dir, relative, compress=False)
            if copied.entry != stored:
                target.unlink()
                log.warning("minio: %s in %s does not match its manifest; downloading %s again",
                            relative, self.base.backup_id, previous["key"])
                return None
        return _Captured({**record, "file": relative, "reused_from": self.base.backup_id}, stored, transferred=False)

    def _download(self, listed: Listed) -> _Captured | None:
        from botocore.exceptions import ClientError

        client, compress = self.endpoint.client, self.options.compress
        relative = object_file(listed.bucket, listed.key, compress)
        with self.endpoint.errors(f"downloading {listed.bucket}/{listed.key}"):
            try:
                response = client.get_object(Bucket=listed.bucket, Key=listed.key, ChecksumMode="ENABLED")
            except ClientError as exc:
                if _error_code(exc) in _MISSING_KEY_CODES:
                    log.warning("minio: %s/%s was deleted after the listing; skipped", listed.bucket, listed.key)
                    return None
                raise
            body = response["Body"]
            raw = hashlib.sha256()
            received = 0

            def chunks() -> Iterator[bytes]:
                nonlocal received
                for chunk in body.iter_chunks(HASH_CHUNK):
                    received += len(chunk)
                    if compress:
                        raw.update(chunk)
                    yield chunk

            try:
                result = stream_to_file(chunks(), self.set_dir, relative, compress=compress, level=self.options.compress_level)
            finally:
                body.close()
        sha256 = raw.hexdigest() if compress else result.entry.sha256
        expected_size = int(response.get("ContentLength", received))
        source_sha256 = whole_object_sha256(response)
        if received != expected_size or (source_sha256 is not None and source_sha256 != sha256):
            (self.set_dir / relative).unlink(missing_ok=True)
            raise MinioError(
                f"{listed.bucket}/{listed.key}: received {received} bytes with sha256 {sha256}, but the source "
                f"announced {expected_size} bytes" + (f" and sha256 {source_sha256}" if source_sha256 else "")
            )
        record = self._record(listed, response, sha256, compress)
        if source_sha256:
            record["source_checksum_sha256"] = True
        return _Captured(record, result.entry, transferred=True)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            yield chunk


def _list_bucket(endpoint: _Endpoint, bucket: str) -> list[Listed]:
    paginator = endpoint.client.get_paginator("list_objects_v2")
    with endpoint.errors(f"listing bucket {bucket}"):
        return [
            Listed.from_listing(bucket, item)
            for page in paginator.paginate(Bucket=bucket, PaginationConfig={"PageSize": 1000})
            for item in page.get("Contents", [])
        ]


def _run_pool(work: Callable[[Any], Any], items: list[Any], max_workers: int, on_done: Callable[[Any], None]) -> list[Any]:
    """Run `work` on every item with at most `max_workers` threads; the first error cancels the rest."""
    results: list[Any] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="minio") as pool:
        futures: list[Future[Any]] = [pool.submit(work, item) for item in items]
        try:
            for index, future in enumerate(futures):
                results[index] = future.result()
                on_done(results[index])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def _tools() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    tools = {}
    for package in ("boto3", "botocore", "apache-airflow-providers-amazon"):
        try:
            tools[package] = version(package)
        except PackageNotFoundError:
            pass
    return tools


def backup(ctx: BackupContext) -> BackupOutcome:
    """Copy every object of the configured buckets, and their configuration, into the set."""
    if ctx.job.backup_type not in SUPPORTED_TYPES:
        raise MinioError(f"minio has no {ctx.job.backup_type!r} backup (supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    options = MirrorOptions.from_options(ctx.options)
    conn_id = ctx.conn_id("source")
    connection = ctx.connection("source")
    host = endpoint_host(connection)
    with _s3_errors(conn_id, host, "creating the S3 client"):
        endpoint = _Endpoint(conn_id, host, s3_client(connection, options.max_workers))
    incremental = ctx.job.backup_type in INCREMENTAL_TYPES
    base = previous_set(ctx.backup_set) if incremental else None
    label = f"minio {ctx.job.backup_type} {ctx.backup_set.backup_id}"
    log.info("%s: copying %s from %s (connection %s); %s", label, ", ".join(options.buckets), host, conn_id,
             f"reusing unchanged objects of {base.backup_id}" if base else "downloading every object")
    started = time.monotonic()

    files: list[FileEntry] = []
    buckets: dict[str, dict[str, Any]] = {}
    listing: list[Listed] = []
    for bucket in options.buckets:
        endpoint.check_bucket(bucket)
        config = capture_bucket_config(endpoint, bucket)
        files.append(stream_to_file([_json_bytes(config)], ctx.set_dir, config_file(bucket), compress=False).entry)
        listed = _list_bucket(endpoint, bucket)
        listing.extend(listed)
        buckets[bucket] = {"config_file": config_file(bucket), "config": config_summary(config), "listed": len(listed)}

    mirror = _Mirror(endpoint, ctx.set_dir, options, base, incremental)
    progress = _Progress(len(listing), label)
    captured = [c for c in _run_pool(mirror.capture, listing, options.max_workers, progress.add) if c is not None]
    vanished = len(listing) - len(captured)
    seconds = time.monotonic() - started

    objects = sorted((c.record for c in captured), key=lambda r: (r["bucket"], r["key"]))
    files.extend(sorted((c.file for c in captured), key=lambda f: f.path))
    for bucket, summary in buckets.items():
        mine = [r for r in objects if r["bucket"] == bucket]
        summary.update(objects=len(mine), bytes=sum(r["size"] for r in mine))
    moved = [c for c in captured if c.transferred]
    kept = [c for c in captured if not c.transferred]
    transfer = {
        "base_backup_id": base.backup_id if base else None,
        "objects_transferred": len(moved),
        "bytes_transferred": sum(c.record["size"] for c in moved),
        "objects_reused": len(kept),
        "bytes_reused": sum(c.record["size"] for c in kept),
        "objects_vanished": vanished,
        "seconds": round(seconds, 3),
    }
    log.info(
        "%s: %d objects / %d bytes transferred, %d objects / %d bytes reused%s%s, in %.1f s",
        label, transfer["objects_transferred"], transfer["bytes_transferred"], transfer["objects_reused"],
        transfer["bytes_reused"], f" from {base.backup_id}" if base else "",
        f", {vanished} deleted during the backup" if vanished else "", seconds,
    )
    return BackupOutcome(
        files=files,
        source={"conn_id": conn_id, "endpoint": host, "buckets": list(options.buckets)},
        tools=_tools(),
        details={
            "layout": LAYOUT,
            "incremental": incremental,
            "compress": options.compress,
            "buckets": buckets,
            "transfer": transfer,
            "objects": objects,
        },
    )


def protected_sets(plan: Any, job: Any, **_context: Any) -> dict[str, str]:
    """Sets retention must keep for other sets' sake: none, since every set is self-contained (hardlinks)."""
    return {}


# -- verify ---------------------------------------------------------------------------------------


def _content_digest(path: Path, compressed: bool) -> tuple[int, str]:
    """(size, hex SHA-256) of an object's bytes as stored, decompressing if needed."""
    if not compressed:
        return sha256_file(path)
    with _open_content(path, compressed) as stream:
        digest, size = hashlib.sha256(), 0
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@contextmanager
def _open_content(path: Path, compressed: bool) -> Iterator[IO[bytes]]:
    import zstandard

    with open(path, "rb") as handle:
        if compressed:
            with zstandard.ZstdDecompressor().stream_reader(handle, read_size=HASH_CHUNK) as reader:
                yield reader  # type: ignore[misc]
        else:
            yield handle


def _safe_file(relative: Any) -> str | None:
    if not isinstance(relative, str):
        return None
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return None
    return relative


def verify(backup_set: BackupSet, manifest: Manifest, *, rehash: bool = False) -> list[str]:
    """Every object has its file, and sizes, hashes and counts agree. Returns problems.

    The checksum step has already hashed each file against the manifest; this checks the
    object list against those files. Compressed objects are decompressed and hashed.
    `rehash=True` also re-hashes uncompressed files (for use without the checksum step).
    """
    details = manifest.details
    objects, buckets = details.get("objects"), details.get("buckets")
    if not isinstance(objects, list) or not isinstance(buckets, dict):
        return [f"backup {backup_set.key}: the manifest has no object list or bucket summary"]
    files = {entry.path: entry for entry in manifest.files}
    problems: list[str] = []
    seen_keys: set[tuple[str, str]] = set()
    used_files: set[str] = set()
    counts: dict[str, list[int]] = {}
    for entry in objects:
        bucket, key = entry.get("bucket"), entry.get("key")
        name = f"{bucket}/{key}"
        if (bucket, key) in seen_keys:
            problems.append(f"{name}: listed twice")
        seen_keys.add((bucket, key))
        relative = _safe_file(entry.get("file"))
        if relative is None or not relative.startswith(f"{OBJECTS_DIR}/"):
            problems.append(f"{name}: unsafe or missing file path {entry.get('file')!r}")
            continue
        if relative in used_files:
            problems.append(f"{name}: shares its file {relative} with another object")
        used_files.add(relative)
        counts.setdefault(bucket, [0, 0])
        counts[bucket][0] += 1
        counts[bucket][1] += int(entry.get("size", 0))
        stored = files.get(relative)
        path = backup_set.path / relative
        if stored is None:
            problems.append(f"{name}: its file {relative} is not in the manifest's file list")
            continue
        if not path.is_file():
            problems.append(f"{name}: its file {relative} is missing")
            continue
        if path.stat().st_size != stored.size:
            problems.append(f"{name}: {relative} is {path.stat().st_size} bytes, the manifest says {stored.size}")
            continue
        compressed = bool(entry.get("compressed"))
        if not compressed and (stored.size, stored.sha256) != (entry.get("size"), entry.get("sha256")):
            problems.append(f"{name}: the object's size/sha256 differ from its file's in the manifest")
            continue
        if compressed or rehash:
            size, digest = _content_digest(path, compressed)
            if (size, digest) != (entry.get("size"), entry.get("sha256")):
                problems.append(
                    f"{name}: {relative} holds {size} bytes with sha256 {digest}, "
                    f"expected {entry.get('size')} bytes with sha256 {entry.get('sha256')}"
                )
    for bucket, summary in buckets.items():
        found = counts.get(bucket, [0, 0])
        if [summary.get("objects"), summary.get("bytes")] != found:
            problems.append(
                f"bucket {bucket}: {found[0]} objects / {found[1]} bytes listed, "
                f"the summary says {summary.get('objects')} / {summary.get('bytes')}"
            )
        relative = summary.get("config_file")
        if relative not in files or not (backup_set.path / relative).is_file():
            problems.append(f"bucket {bucket}: its configuration file {relative} is missing")
        else:
            try:
                json.loads((backup_set.path / relative).read_text(encoding="utf-8"))
            except ValueError as exc:
                problems.append(f"bucket {bucket}: {relative} is not valid JSON: {exc}")
            used_files.add(relative)
    for bucket in set(counts) - set(buckets):
        problems.append(f"bucket {bucket}: has objects but no bucket summary")
    for relative in sorted(set(files) - used_files):
        problems.append(f"{relative}: in the file list but no object or bucket refers to it")
    transfer = details.get("transfer") or {}
    if transfer and transfer.get("objects_transferred", 0) + transfer.get("objects_reused", 0) != len(objects):
        problems.append(
            f"transfer summary counts {transfer.get('objects_transferred')} transferred + "
            f"{transfer.get('objects_reused')} reused, but {len(objects)} objects are listed"
        )
    return problems


# -- restore --------------------------------------------------------------------------------------


def _target_endpoint(target: RestoreTarget, get_connection: Callable[[str], Any], max_workers: int) -> _Endpoint:
    if target.conn_id:
        conn_id = target.conn_id
        try:
            connection = get_connection(conn_id)
        except Exception as exc:
            raise MinioError(
                f"restore target connection {conn_id!r} is not defined or unreadable: {exc}. Define it in "
                f"Admin → Connections or as AIRFLOW_CONN_{conn_id.upper()}, or give endpoint_url and credentials"
            ) from exc
    else:
        from airflow.sdk import Connection

        conn_id = RESTORE_TARGET_CONN_ID
        extra = {"endpoint_url": target.endpoint_url, **({"region_name": target.region} if target.region else {})}
        connection = Connection(conn_id=conn_id, conn_type="aws", login=target.access_key,
                                password=target.secret_key, extra=json.dumps(extra))
    host = endpoint_host(connection)
    with _s3_errors(conn_id, host, "creating the S3 client"):
        return _Endpoint(conn_id, host, s3_client(connection, max_workers))


def _select(manifest: Manifest, source_bucket: str | None, key_prefix: str | None) -> tuple[str, list[dict[str, Any]]]:
    buckets = sorted(manifest.details.get("buckets") or {})
    if source_bucket is None:
        if len(buckets) != 1:
            raise MinioError(
                f"backup {manifest.backup_id} holds buckets {', '.join(buckets) or '(none)'}: "
                "pass source_bucket= to choose the one to restore"
            )
        source_bucket = buckets[0]
    elif source_bucket not in buckets:
        raise MinioError(f"backup {manifest.backup_id} has no bucket {source_bucket!r} (it has {', '.join(buckets)})")
    chosen = [
        entry for entry in manifest.details["objects"]
        if entry["bucket"] == source_bucket and entry["key"].startswith(key_prefix or "")
    ]
    return source_bucket, chosen


def _preflight(set_dir: Path, manifest: Manifest, entries: list[dict[str, Any]]) -> list[str]:
    """Files missing or of the wrong size, found before anything is written."""
    files = {entry.path: entry for entry in manifest.files}
    problems = []
    for entry in entries:
        name = f"{entry['bucket']}/{entry['key']}"
        relative = _safe_file(entry.get("file"))
        stored = files.get(relative or "")
        if relative is None or stored is None:
            problems.append(f"{name}: no file for it in the manifest of {manifest.backup_id}")
        elif not (set_dir / relative).is_file():
            problems.append(f"{name}: its file {relative} is missing from {set_dir}")
        elif (set_dir / relative).stat().st_size != stored.size:
            problems.append(f"{name}: its file {relative} is {(set_dir / relative).stat().st_size} bytes, "
                            f"the manifest says {stored.size}")
    return problems


def _existing_keys(endpoint: _Endpoint, bucket: str, prefix: str) -> set[str]:
    paginator = endpoint.client.get_paginator("list_objects_v2")
    with endpoint.errors(f"listing s3://{bucket}/{prefix}"):
        return {
            item["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        }


@dataclass
class _Restored:
    key: str
    size: int
    verified_by: str | None
    problems: list[str]


class _Restorer:
    def __init__(self, endpoint: _Endpoint, set_dir: Path, target: RestoreTarget, verify_mode: str):
        self.endpoint, self.set_dir, self.target, self.verify_mode = endpoint, set_dir, target, verify_mode

    def restore_one(self, entry: dict[str, Any]) -> _Restored:
        key = target_key(self.target.prefix, entry["key"])
        name = f"{entry['bucket']}/{entry['key']}"
        path = self.set_dir / entry["file"]
        compressed = bool(entry.get("compressed"))
        extra: dict[str, Any] = {"Metadata": dict(entry.get("metadata") or {})}
        if entry.get("content_type"):
            extra["ContentType"] = entry["content_type"]
        with self.endpoint.errors(f"restoring {name} to {self.target.description}{entry['key']}"):
            if entry["size"] < PART_SIZE:
                sent = self._put_single(path, compressed, key, extra, entry)
            else:
                sent = self._put_multipart(path, compressed, key, extra, entry)
            if isinstance(sent, list):
                return _Restored(key, entry["size"], None, [f"{name}: {problem}" for problem in sent])
            problems, verified_by = self._verify(key, entry, sent)
        return _Restored(key, entry["size"], verified_by, [f"{name}: {problem}" for problem in problems])

    def _corrupt(self, entry: Mapping[str, Any], size: int, digest: str) -> list[str]:
        return [
            f"the stored copy {entry['file']} is corrupt ({size} bytes with sha256 {digest}, the manifest says "
            f"{entry['size']} bytes with sha256 {entry['sha256']}); not restored"
        ]

    def _put_single(self, path: Path, compressed: bool, key: str, extra: dict[str, Any],
                    entry: Mapping[str, Any]) -> str | list[str]:
        """Hash first, then send with a SHA-256 checksum computed by boto3 on the bytes it sends."""
        with SpooledTemporaryFile(max_size=HASH_CHUNK) as spool, _open_content(path, compressed) as stream:
            digest, size = hashlib.sha256(), 0
            while chunk := stream.read(HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                spool.write(chunk)
            if (size, digest.hexdigest()) != (entry["size"], entry["sha256"]):
                return self._corrupt(entry, size, digest.hexdigest())
            spool.seek(0)
            self.endpoint.client.put_object(Bucket=self.target.bucket, Key=key, Body=spool,
                                            ContentLength=size, ChecksumAlgorithm="SHA256", **extra)
        return b64_sha256(entry["sha256"])

    def _put_multipart(self, path: Path, compressed: bool, key: str, extra: dict[str, Any],
                       entry: Mapping[str, Any]) -> str | list[str]:
        """Send parts while hashing them; complete only if the whole object matches the manifest."""
        client, bucket = self.endpoint.client, self.target.bucket
        part_size = part_size_for(entry["size"])
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256", **extra)["UploadId"]
        try:
            whole, size, parts, digests = hashlib.sha256(), 0, [], []
            with _open_content(path, compressed) as stream:
                while part := _read_exactly(stream, part_size):
                    whole.update(part)
                    size += len(part)
                    part_digest = hashlib.sha256(part).digest()
                    digests.append(part_digest)
                    checksum = base64.b64encode(part_digest).decode()
                    number = len(parts) + 1
                    response = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                                  Body=part, ChecksumSHA256=checksum)
                    parts.append({"ETag": response["ETag"], "PartNumber": number, "ChecksumSHA256": checksum})
            if (size, whole.hexdigest()) != (entry["size"], entry["sha256"]):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
                return self._corrupt(entry, size, whole.hexdigest())
            client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception as exc:  # the original error matters more
                log.warning("minio restore: could not abort the multipart upload of %s: %s", key, exc)
            raise
        return composite_sha256(digests) + f"-{len(parts)}"

    def _verify(self, key: str, entry: Mapping[str, Any], expected_checksum: str) -> tuple[list[str], str]:
        head = self.endpoint.client.head_object(Bucket=self.target.bucket, Key=key, ChecksumMode="ENABLED")
        problems = []
        if head.get("ContentLength") != entry["size"]:
            problems.append(f"{head.get('ContentLength')} bytes on the target, {entry['size']} expected")
        if entry.get("content_type") and head.get("ContentType") != entry["content_type"]:
            problems.append(f"content type {head.get('ContentType')!r} on the target, {entry['content_type']!r} expected")
        if dict(head.get("Metadata") or {}) != dict(entry.get("metadata") or {}):
            problems.append(f"metadata {head.get('Metadata')} on the target, {entry.get('metadata')} expected")
        checksum = head.get("ChecksumSHA256")
        if self.verify_mode == "checksum" and checksum:
            if _MULTIPART_SUFFIX.sub("", checksum) != _MULTIPART_SUFFIX.sub("", expected_checksum):
                problems.append(f"ChecksumSHA256 {checksum} on the target, {expected_checksum} expected")
            return problems, "checksum"
        response = self.endpoint.client.get_object(Bucket=self.target.bucket, Key=key)
        digest, size = hashlib.sha256(), 0
        try:
            for chunk in response["Body"].iter_chunks(HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        finally:
            response["Body"].close()
        if (size, digest.hexdigest()) != (entry["size"], entry["sha256"]):
            problems.append(f"re-downloaded {size} bytes with sha256 {digest.hexdigest()}, expected {entry['sha256']}")
        return problems, "download"


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < size and (chunk := stream.read(min(HASH_CHUNK, size - len(buffer)))):
        buffer += chunk
    return bytes(buffer)


def restore_bucket_config(endpoint: _Endpoint, config: Mapping[str, Any], bucket: str) -> list[str]:
    """Apply a captured configuration to `bucket`; the policy's ARNs are rewritten to it. Returns what was set."""
    client, source = endpoint.client, config["bucket"]
    applied = []
    with endpoint.errors(f"restoring the configuration of bucket {bucket}"):
        status = config["versioning"].get("status") if config["versioning"]["present"] else None
        if status in ("Enabled", "Suspended"):
            client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": status})
            applied.append("versioning")
        if config["lifecycle"]["present"]:
            client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": config["lifecycle"]["rules"]})
            applied.append("lifecycle")
        if config["tags"]["present"]:
            tag_set = [{"Key": k, "Value": v} for k, v in sorted(config["tags"]["tags"].items())]
            client.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tag_set})
            applied.append("tags")
        if config["policy"]["present"]:
            policy = json.dumps(config["policy"]["policy"]).replace(f"arn:aws:s3:::{source}", f"arn:aws:s3:::{bucket}")
            client.put_bucket_policy(Bucket=bucket, Policy=policy)
            applied.append("policy")
    return applied


def restore(
    set_dir: Path,
    manifest: Manifest,
    target: Any,
    *,
    source_bucket: str | None = None,
    key_prefix: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    restore_config: bool = False,
    verify_mode: str = "checksum",
    max_workers: int = DEFAULT_MAX_WORKERS,
    get_connection: Callable[[str], Any] = airflow_connection,
) -> dict[str, Any]:
    """Copy one bucket of a set into `target` (bucket, optional prefix), verifying every object.

    `target`: a RestoreTarget, mapping or object with bucket, prefix, and conn_id or
    endpoint_url/access_key/secret_key/region (create_bucket to create a missing bucket).
    `key_prefix` restores only keys starting with it. Raises RestoreFailed (with the report)
    if any object could not be restored or verified.
    """
    if verify_mode not in ("checksum", "download"):
        raise MinioError(f"verify_mode must be 'checksum' or 'download', got {verify_mode!r}")
    resolved = RestoreTarget.of(target)
    bucket, entries = _select(manifest, source_bucket, key_prefix)
    if key_prefix and not entries:
        raise MinioError(f"backup {manifest.backup_id}: no object of bucket {bucket} has a key starting with {key_prefix!r}")
    started = time.monotonic()
    report: dict[str, Any] = {
        "backup_id": manifest.backup_id,
        "source_bucket": bucket,
        "target": resolved.description,
        "objects": len(entries),
        "bytes": sum(entry["size"] for entry in entries),
        "dry_run": dry_run,
        "verified": 0,
        "verified_by": {},
        "config_restored": [],
        "problems": [],
        "ok": False,
    }
    problems = _preflight(set_dir, manifest, entries)
    if problems:
        report["problems"] = problems
        raise RestoreFailed(
            f"backup {manifest.backup_id}: {len(problems)} object(s) cannot be restored from {set_dir}, nothing was "
            "written: " + "; ".join(problems[:5]),
            report,
        )
    endpoint = _target_endpoint(resolved, get_connection, max_workers)
    report["endpoint"] = endpoint.host
    try:
        endpoint.check_bucket(resolved.bucket)
        existing = _existing_keys(endpoint, resolved.bucket, resolved.prefix)
    except BucketMissing:
        if not resolved.create_bucket:
            raise
        existing = set()
        if not dry_run:
            with endpoint.errors(f"creating bucket {resolved.bucket}"):
                endpoint.client.create_bucket(Bucket=resolved.bucket)
            report["bucket_created"] = True
    conflicts = sorted({target_key(resolved.prefix, entry["key"]) for entry in entries} & existing)
    report["conflicts"] = len(conflicts)
    if conflicts and not overwrite:
        raise MinioError(
            f"{len(conflicts)} object(s) already exist in {resolved.description} (first: {conflicts[0]!r}); "
            "restore under another prefix, or pass overwrite=True to replace them"
        )
    if dry_run:
        log.info("minio restore (dry run): would write %d objects (%d bytes) of %s/%s into %s, %d replacing existing",
                 len(entries), report["bytes"], manifest.backup_id, bucket, resolved.description, len(conflicts))
        report["seconds"] = round(time.monotonic() - started, 3)
        report["ok"] = True
        return report

    log.info("minio restore: %d objects (%d bytes) of %s/%s into %s at %s",
             len(entries), report["bytes"], manifest.backup_id, bucket, resolved.description, endpoint.host)
    if restore_config:
        config_path = set_dir / config_file(bucket)
        report["config_restored"] = restore_bucket_config(
            endpoint, json.loads(config_path.read_text(encoding="utf-8")), resolved.bucket
        )
    restorer = _Restorer(endpoint, set_dir, resolved, verify_mode)
    results: list[_Restored] = _run_pool(restorer.restore_one, entries, max_workers, lambda _: None)
    for result in results:
        report["problems"].extend(result.problems)
        if result.verified_by and not result.problems:
            report["verified"] += 1
            report["verified_by"][result.verified_by] = report["verified_by"].get(result.verified_by, 0) + 1
    report["seconds"] = round(time.monotonic() - started, 3)
    report["ok"] = not report["problems"] and report["verified"] == len(entries)
    log.info("minio restore: %d/%d objects verified on %s in %.1f s (%s)", report["verified"], len(entries),
             resolved.description, report["seconds"], report["verified_by"])
    if not report["ok"]:
        raise RestoreFailed(
            f"backup {manifest.backup_id}: {len(report['problems'])} problem(s) restoring into {resolved.description}: "
            + "; ".join(report["problems"][:5]),
            report,
        )
    return report
