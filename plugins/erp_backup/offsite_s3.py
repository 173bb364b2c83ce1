"""The S3 offsite store: backup sets on S3 or any S3-compatible store, through the Amazon provider's S3Hook.

The set logic (order of uploads, manifest last, fetch and delete) is `erp_backup.offsite._SetStore`;
this module supplies its object primitives on S3. Client settings and checksums come from
`erp_backup.s3`. Each object is uploaded with `upload_file` on the hook's own boto3 client (the
provider's `load_file` takes no per-object arguments), with `ChecksumAlgorithm=SHA256`, our
whole-file SHA-256 as the metadata `x-amz-meta-sha256` (plus `x-amz-meta-part-size` when
multipart), and verified with `head_object(ChecksumMode="ENABLED")`:

- size: `ContentLength` must equal the manifest's size;
- single-part: `ChecksumSHA256` is the base64 of the whole-file SHA-256 and must equal the
  manifest's, exactly;
- multipart: `ChecksumSHA256` is a composite, so the metadata sha256 must equal the manifest's,
  the part count must be ceil(size / part size), and during `upload_set` the local file is
  re-read once to compute the composite (and its whole-file SHA-256), which must match what S3
  computed from the bytes it got.

Object Lock (the plan's `offsite.object_lock`, on a bucket created with Object Lock, docs/object-lock.md):
every object of a set is uploaded with `ObjectLockMode` and `ObjectLockRetainUntilDate` = the set's
capture time + its job's retention + the margin (not when that is already past: S3 refuses a past
date). The bucket is versioned, so a delete without a version id would only add a delete marker:
`delete_set` removes every version, manifest first, and refuses before deleting anything while any
version is still retained (`locked_until`, read from each version's `ObjectLockRetainUntilDate`).
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from erp_backup.checksum import ChecksumMismatch
from erp_backup.manifest import HASH_CHUNK, Manifest
from erp_backup.offsite import OffsiteError, UploadReport, _Item, _SetStore, set_key
from erp_backup.runs import utcnow
from erp_backup.s3 import (
    MIB,
    TransferSettings,
    b64_sha256,
    file_composite_sha256,
    parts_count,
    s3_hook,
    without_parts_suffix,
)

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from erp_backup.plan import Plan
    from erp_backup.sets import BackupSet

log = logging.getLogger(__name__)

SHA256_METADATA = "sha256"  # stored as x-amz-meta-sha256
PART_SIZE_METADATA = "part-size"  # stored as x-amz-meta-part-size (multipart only)
_MISSING_CODES = ("404", "NoSuchKey", "NotFound")
_DELETE_BATCH = 1000


@dataclass(frozen=True)
class ObjectLock:
    """Object Lock retention for uploads: `mode` until capture + the job's retention + `margin`."""

    mode: str  # GOVERNANCE or COMPLIANCE
    margin: timedelta
    retention: Mapping[tuple[str, str], timedelta]  # (service, backup type) -> the job's retention

    def retain_until(self, manifest: Manifest) -> datetime:
        key = (manifest.service, manifest.backup_type)
        if key not in self.retention:
            raise OffsiteError(f"backup {'/'.join(key)}/{manifest.backup_id}: the plan has no such job, so no "
                               "retention to set its Object Lock from")
        captured = manifest.captured_finished_at
        captured = captured if captured.tzinfo is not None else captured.replace(tzinfo=UTC)
        return captured + self.retention[key] + self.margin


def object_lock_from_plan(plan: Plan) -> ObjectLock | None:
    """The plan's `offsite.object_lock` with every job's retention; None when the plan turns it off."""
    lock = plan.offsite.object_lock
    if lock is None:
        return None
    return ObjectLock(lock.mode, lock.margin, {(job.service, job.backup_type): job.retention for job in plan.jobs})


class S3Offsite(_SetStore):
    """Backup sets on S3 or any S3-compatible store, through the Amazon provider's S3Hook.

    Nothing connects at construction; the connection is resolved on first use.
    An upload never deletes (its connection needs no DeleteObject; docs/iam/).
    """

    def __init__(
        self,
        conn_id: str,
        bucket: str,
        prefix: str = "",
        *,
        multipart_threshold: int = 64 * MIB,
        chunksize: int = 64 * MIB,
        max_concurrency: int = 4,
        object_lock: ObjectLock | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.object_lock = object_lock
        self._lock_args: dict[str, Any] = {}  # Object Lock arguments for the set being uploaded
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.transfer = TransferSettings(multipart_threshold, chunksize, max_concurrency)
        self.description = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._bucket_checked = False

    @cached_property
    def hook(self) -> S3Hook:
        """An S3Hook on the connection, with SHA-256 checksums, our transfer settings and bounded timeouts."""
        from airflow.exceptions import AirflowNotFoundException
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        try:
            connection = S3Hook.get_connection(self.conn_id)
        except AirflowNotFoundException as exc:
            raise OffsiteError(
                f"offsite {self.description}: Airflow connection {self.conn_id!r} is not defined "
                "(create an 'aws' connection; put endpoint_url in its extra for MinIO or other S3-compatible stores)"
            ) from exc
        return s3_hook(connection, max_pool_connections=max(10, self.transfer.max_concurrency + 2),
                       transfer=self.transfer)

    @property
    def client(self) -> Any:
        return self.hook.get_conn()

    def _endpoint(self) -> str:
        try:
            return self.hook.conn_config.endpoint_url or "the default AWS endpoint"
        except Exception:  # the endpoint is only context for an error message
            return "an unknown endpoint"

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn client errors into an OffsiteError naming the endpoint and bucket (never credentials)."""
        from airflow.exceptions import AirflowException
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError, Boto3Error, AirflowException) as exc:
            raise OffsiteError(
                f"offsite {self.description} (endpoint {self._endpoint()}, bucket {self.bucket}): {action} failed: {exc}"
            ) from exc

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _name(self, key: str) -> str:
        return self._object_key(key)

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        with self._errors(f"reading {self._object_key(key)}"):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._object_key(key), ChecksumMode="ENABLED")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
                    return None
                raise

    def _exists(self, key: str) -> bool:
        return self._head(key) is not None

    def _object_record(self, key: str) -> tuple[datetime, str | None, str | None] | None:
        head = self._head(key)
        if head is None:
            return None
        computed = None
        if head.get("ChecksumSHA256") and parts_count(head) is None:
            try:
                computed = base64.b64decode(head["ChecksumSHA256"], validate=True).hex()
            except ValueError:
                computed = "not base64: " + head["ChecksumSHA256"]
        recorded = (head.get("Metadata") or {}).get(SHA256_METADATA)
        return head["LastModified"].astimezone(UTC), recorded, computed

    def _check_ready(self) -> None:
        if not self._bucket_checked:
            with self._errors("checking the bucket"):
                self.client.head_bucket(Bucket=self.bucket)
            self._bucket_checked = True

    def _stored_problems(self, key: str, item: _Item) -> list[str]:
        name = self._object_key(key)
        head = self._head(key)
        if head is None:
            return [f"{name}: missing"]
        problems = []
        if head.get("ContentLength") != item.size:
            problems.append(f"{name}: {head.get('ContentLength')} bytes offsite, {item.size} expected")
        checksum = head.get("ChecksumSHA256")
        metadata_sha256 = (head.get("Metadata") or {}).get(SHA256_METADATA)
        if metadata_sha256 is not None and metadata_sha256 != item.sha256:
            problems.append(f"{name}: sha256 metadata {metadata_sha256} offsite, {item.sha256} expected")
        parts = parts_count(head)
        if parts is None:
            expected = b64_sha256(item.sha256)
            if checksum is None:
                problems.append(f"{name}: no SHA-256 checksum stored offsite")
            elif checksum != expected:
                problems.append(f"{name}: SHA-256 offsite ({checksum}) differs from the expected ({expected})")
            return problems

        if metadata_sha256 is None:
            problems.append(f"{name}: multipart object without sha256 metadata; its content cannot be checked")
        part_size = int((head.get("Metadata") or {}).get(PART_SIZE_METADATA) or 0)
        if part_size and parts != math.ceil(item.size / part_size):
            problems.append(f"{name}: {parts} parts offsite, {math.ceil(item.size / part_size)} expected")
        if checksum is None:
            problems.append(f"{name}: no SHA-256 checksum stored offsite")
        elif item.local is not None and part_size and not problems:
            full, composite = file_composite_sha256(item.local, part_size)
            if full != item.sha256:
                problems.append(f"{name}: the local file {item.local} no longer matches the manifest")
            elif without_parts_suffix(checksum) != composite:
                problems.append(f"{name}: composite SHA-256 offsite ({checksum}) differs from the local file's ({composite})")
        return problems

    def _store(self, key: str, item: _Item) -> None:
        assert item.local is not None
        metadata = {SHA256_METADATA: item.sha256}
        part_size = self.transfer.part_size(item.size)
        if part_size:
            metadata[PART_SIZE_METADATA] = str(part_size)
        with self._errors(f"uploading {self._object_key(key)}"):
            self.client.upload_file(
                str(item.local),
                self.bucket,
                self._object_key(key),
                ExtraArgs={**self.hook.extra_args, "Metadata": metadata, **self._lock_args},
                Config=self.hook.transfer_config,
            )

    def _open(self, key: str) -> Iterator[bytes] | None:
        from botocore.exceptions import ClientError

        name = self._object_key(key)
        with self._errors(f"reading {name}"):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
                    return None
                raise
        return self._stream(response["Body"], name)

    def _stream(self, body: Any, name: str) -> Iterator[bytes]:
        from botocore.exceptions import FlexibleChecksumError

        try:
            with self._errors(f"reading {name}"):
                try:
                    yield from body.iter_chunks(HASH_CHUNK)
                except FlexibleChecksumError as exc:
                    raise ChecksumMismatch(f"{self.description} {name}: the store's own checksum failed: {exc}") from exc
        finally:
            body.close()

    def _child_names(self, key: str) -> list[str]:
        prefix = self._object_key(key) + "/"
        with self._errors(f"listing {prefix}"):
            found = self.hook.list_prefixes(bucket_name=self.bucket, prefix=prefix, delimiter="/")
        return [entry[len(prefix):].rstrip("/") for entry in found]

    def _invalidate_manifest(self, base: str, manifest_key: str, pending: list[_Item]) -> None:
        """The upload connection never deletes: a set whose manifest is offsite is not rewritten in place."""
        raise OffsiteError(
            f"backup {base} at {self.description} has a manifest offsite but "
            f"{', '.join(item.relative for item in pending)} must be rewritten; the upload connection never "
            "deletes: check it (erp-restore verify --from offsite), let retention_prune (connection "
            "backup_offsite_prune) or an operator remove it, then rerun"
        )

    def _delete(self, key: str) -> None:
        with self._errors(f"deleting {self._object_key(key)}"):
            self.hook.delete_objects(self.bucket, [self._object_key(key)])

    def _delete_set_objects(self, key: str, manifest_key: str) -> int:
        if self.object_lock is not None:
            return self._delete_set_versions(key, manifest_key)
        prefix = self._object_key(key) + "/"
        with self._errors(f"listing {prefix}"):
            keys = self.hook.list_keys(bucket_name=self.bucket, prefix=prefix)
        first = [k for k in keys if k == self._object_key(manifest_key)]
        rest = [k for k in keys if k not in first]
        with self._errors(f"deleting {prefix}"):
            for batch in (first, rest):
                if batch:
                    self.hook.delete_objects(self.bucket, batch)  # the hook sends batches of <= 1000
        return len(keys)

    # --- Object Lock ----------------------------------------------------------------
    def upload_set(self, backup_set: BackupSet) -> UploadReport:
        """The set upload of `_SetStore`, each object it writes locked until the set's retain-until."""
        if self.object_lock is not None and backup_set.state.is_good:  # the base refuses any other set
            self._lock_args = self._set_lock_args(self.object_lock, backup_set.manifest())
        try:
            return super().upload_set(backup_set)
        finally:
            self._lock_args = {}

    def _set_lock_args(self, lock: ObjectLock, manifest: Manifest) -> dict[str, Any]:
        until = lock.retain_until(manifest)
        where = f"offsite {self.description}: {set_key(manifest.service, manifest.backup_type, manifest.backup_id)}"
        if until <= utcnow():
            log.warning("%s: retain-until %s is already past; uploaded without Object Lock", where, until.isoformat())
            return {}
        log.info("%s: Object Lock %s until %s", where, lock.mode, until.isoformat())
        return {"ObjectLockMode": lock.mode, "ObjectLockRetainUntilDate": until}

    def _versions(self, key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(object versions, delete markers) under `key/`."""
        prefix = self._object_key(key) + "/"
        versions: list[dict[str, Any]] = []
        markers: list[dict[str, Any]] = []
        with self._errors(f"listing the versions under {prefix}"):
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=prefix):
                versions.extend(page.get("Versions", []))
                markers.extend(page.get("DeleteMarkers", []))
        return versions, markers

    def _retained_until(self, versions: list[dict[str, Any]]) -> datetime | None:
        latest = None
        for version in versions:
            with self._errors(f"reading the retention of {version['Key']}"):
                head = self.client.head_object(Bucket=self.bucket, Key=version["Key"], VersionId=version["VersionId"])
            until = head.get("ObjectLockRetainUntilDate")
            if until is not None and (latest is None or until > latest):
                latest = until.astimezone(UTC)
        return latest

    def locked_until(self, service: str, backup_type: str, backup_id: str) -> datetime | None:
        """The latest ObjectLockRetainUntilDate of any version of the set's objects; None if none is set."""
        if self.object_lock is None:
            return None
        return self._retained_until(self._versions(set_key(service, backup_type, backup_id))[0])

    def _delete_set_versions(self, key: str, manifest_key: str) -> int:
        """Delete every version and delete marker under `key/`, the manifest's first; none while one is retained."""
        versions, markers = self._versions(key)
        until = self._retained_until(versions)
        if until is not None and until > utcnow():
            raise OffsiteError(f"offsite {self.description}: {key} is under Object Lock until {until.isoformat()}; "
                               "nothing deleted")
        manifest = self._object_key(manifest_key)
        first = [v for v in versions + markers if v["Key"] == manifest]
        rest = [v for v in versions + markers if v["Key"] != manifest]
        for batch in (first, rest):
            for start in range(0, len(batch), _DELETE_BATCH):
                self._delete_versions(batch[start:start + _DELETE_BATCH])
        return len({v["Key"] for v in versions})

    def _delete_versions(self, versions: list[dict[str, Any]]) -> None:
        objects = [{"Key": v["Key"], "VersionId": v["VersionId"]} for v in versions]
        with self._errors(f"deleting {len(objects)} object versions"):
            response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        errors = response.get("Errors") or []
        if errors:
            raise OffsiteError(f"offsite {self.description}: could not delete " + "; ".join(
                f"{e.get('Key')} version {e.get('VersionId')}: {e.get('Code')} {e.get('Message')}" for e in errors))
