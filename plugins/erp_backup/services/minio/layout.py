"""The MinIO set layout and its pure rules: plan options, key → file names, change detection, errors.

A set holds ``objects/<bucket>/<h[:2]>/<h>[.zst]`` (h = hex SHA-256 of the UTF-8 key; the real key
lives only in the manifest) and ``buckets/<bucket>/config.json``. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from erp_backup.s3 import MIB, is_multipart_etag

SUPPORTED_TYPES = frozenset({"full", "snapshot"})
INCREMENTAL_TYPES = frozenset({"full"})
DEFAULT_BUCKETS = ("erp-documents",)
DEFAULT_MAX_WORKERS = 8
DEFAULT_COMPRESS_LEVEL = 3
OBJECTS_DIR = "objects"
BUCKETS_DIR = "buckets"
CONFIG_NAME = "config.json"
LAYOUT = "objects/<bucket>/<sha256(key)[:2]>/<sha256(key)>[.zst]"
PART_SIZE = 8 * MIB  # restore: objects of at least this size go multipart, in parts of this size
MAX_PARTS = 10_000
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class MinioError(RuntimeError):
    """A bucket, object or option is wrong. The message names the bucket, key, connection or option."""


class BucketMissing(MinioError):
    """A bucket the plan or a restore target names does not exist."""


class RestoreFailed(MinioError):
    """Some objects could not be restored or failed verification. `report` holds the details."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


# -- options and names -------------------------------------------------------------------------------


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
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    """The change-detection rule of the package docstring (erp_backup.services.minio), for one listed object."""
    if not incremental or previous is None or previous.get("size") != listed.size:
        return Action.DOWNLOAD
    if previous.get("etag") == listed.etag and previous.get("last_modified") == listed.last_modified:
        return Action.REUSE
    if "SHA256" in listed.checksum_algorithms and not is_multipart_etag(listed.etag):
        return Action.CHECK_SHA256
    return Action.DOWNLOAD
