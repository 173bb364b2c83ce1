"""MinIO restores: objects of a set back into S3 buckets, every object hashed before it is committed.

A target without a bucket gets every bucket of the set into a bucket of the same name; a target
with a bucket gets one source bucket (the set's only one, or option `source_bucket`), optionally
under a prefix, with content type and user metadata. Single-part objects (< 8 MiB) are hashed,
then sent with `ChecksumAlgorithm=SHA256`; multipart objects are hashed part by part as they are
sent (`erp_backup.s3.upload_verified_multipart`), and the upload is aborted if the whole-object
SHA-256 differs from the manifest. A corrupt stored file therefore never lands in (or overwrites
anything in) the target. Each object is then verified on the target: size, content type,
metadata, and SHA-256 from `ChecksumSHA256` (single-part: the manifest's; multipart: the composite
of the parts we sent), or by re-downloading it when the target returns no checksum or
`verify_mode="download"`. Existing keys are not overwritten unless `overwrite=True`; a dry run
reads the target (bucket, existing keys) and writes nothing. Memory stays at one part (8 MiB or
more) per worker. Object versions are not restored: the target gets new version ids.

Restore options: source_bucket, key_prefix (only keys starting with it), overwrite,
restore_config (apply the captured bucket configuration), verify_mode (checksum | download),
max_workers, get_connection (how a target's `conn_id` is looked up; default: Airflow).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import SpooledTemporaryFile
from typing import Any

from erp_backup.manifest import HASH_CHUNK, Manifest
from erp_backup.s3 import SHA256_UPLOAD_ARGS, b64_sha256, upload_verified_multipart, without_parts_suffix
from erp_backup.services.base import RestoreReport, airflow_connection
from erp_backup.services.minio.bucket_config import restore_bucket_config
from erp_backup.services.minio.endpoint import Endpoint, endpoint_host, run_pool, s3_client, s3_errors
from erp_backup.services.minio.integrity import open_content, safe_file
from erp_backup.services.minio.layout import (
    DEFAULT_MAX_WORKERS,
    PART_SIZE,
    BucketMissing,
    MinioError,
    RestoreFailed,
    config_file,
    normalized_prefix,
    part_size_for,
    target_key,
    valid_bucket_name,
)

log = logging.getLogger(__name__)

RESTORE_TARGET_CONN_ID = "minio_restore_target"
RESTORE_OPTIONS = ("source_bucket", "key_prefix", "overwrite", "restore_config", "verify_mode", "max_workers",
                   "get_connection")
VERIFY_MODES = ("checksum", "download")


# -- the target -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreTarget:
    """Where a restore writes: a connection (id, or resolved) or an endpoint with credentials; a bucket; a prefix."""

    bucket: str
    prefix: str = ""
    conn_id: str | None = None
    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None
    create_bucket: bool = False
    connection: Any = field(default=None, repr=False, compare=False)  # an already resolved `aws` connection

    @classmethod
    def of(cls, target: Any) -> RestoreTarget:
        """From a RestoreTarget, a mapping, or any object with these attributes."""
        if isinstance(target, RestoreTarget):
            return target
        values = target_fields(target)
        if not values.get("bucket"):
            raise MinioError("restore target: 'bucket' is required (the bucket to restore into)")
        if not values.get("conn_id") and not values.get("endpoint_url") and values.get("connection") is None:
            raise MinioError("restore target: give 'conn_id' (an aws connection) or 'endpoint_url' with credentials")
        resolved = cls(**values)
        valid_bucket_name(resolved.bucket, "restore target bucket")
        return dataclasses.replace(resolved, prefix=normalized_prefix(resolved.prefix))

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


TARGET_FIELDS = tuple(f.name for f in dataclasses.fields(RestoreTarget))


def target_fields(target: Any) -> dict[str, Any]:
    """A target's fields as a dict (bucket may be missing), from a RestoreTarget, mapping or object."""
    if isinstance(target, RestoreTarget):
        return {name: getattr(target, name) for name in TARGET_FIELDS}
    if isinstance(target, Mapping):
        unknown = sorted(set(target) - set(TARGET_FIELDS))
        if unknown:
            raise MinioError(f"restore target: unknown field {unknown[0]!r} (allowed: {', '.join(TARGET_FIELDS)})")
        return dict(target)
    return {name: getattr(target, name) for name in TARGET_FIELDS if getattr(target, name, None) is not None}


def _target_connection(target: RestoreTarget, get_connection: Callable[[str], Any]) -> tuple[str, Any]:
    if target.connection is not None:
        return target.conn_id or target.connection.conn_id, target.connection
    if target.conn_id:
        try:
            return target.conn_id, get_connection(target.conn_id)
        except Exception as exc:
            raise MinioError(
                f"restore target connection {target.conn_id!r} is not defined or unreadable: {exc}. Define it in "
                f"Admin → Connections or as AIRFLOW_CONN_{target.conn_id.upper()}, or give endpoint_url and credentials"
            ) from exc
    from airflow.sdk import Connection

    extra = {"endpoint_url": target.endpoint_url, **({"region_name": target.region} if target.region else {})}
    return RESTORE_TARGET_CONN_ID, Connection(conn_id=RESTORE_TARGET_CONN_ID, conn_type="aws", login=target.access_key,
                                              password=target.secret_key, extra=json.dumps(extra))


def target_endpoint(target: RestoreTarget, get_connection: Callable[[str], Any], max_workers: int) -> Endpoint:
    """The S3 endpoint a target names, with its client."""
    conn_id, connection = _target_connection(target, get_connection)
    host = endpoint_host(connection)
    with s3_errors(conn_id, host, "creating the S3 client"):
        return Endpoint(conn_id, host, s3_client(connection, max_workers))


# -- one bucket -----------------------------------------------------------------------------------


def _select(manifest: Manifest, source_bucket: str | None, key_prefix: str | None) -> tuple[str, list[dict[str, Any]]]:
    buckets = sorted(manifest.details.get("buckets") or {})
    if source_bucket is None:
        if len(buckets) != 1:
            raise MinioError(
                f"backup {manifest.backup_id} holds buckets {', '.join(buckets) or '(none)'}: "
                "pass source_bucket= in the restore options to choose the one to restore, or give a target "
                "without a bucket to restore each bucket into a bucket of the same name"
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
        relative = safe_file(entry.get("file"))
        stored = files.get(relative or "")
        if relative is None or stored is None:
            problems.append(f"{name}: no file for it in the manifest of {manifest.backup_id}")
        elif not (set_dir / relative).is_file():
            problems.append(f"{name}: its file {relative} is missing from {set_dir}")
        elif (set_dir / relative).stat().st_size != stored.size:
            problems.append(f"{name}: its file {relative} is {(set_dir / relative).stat().st_size} bytes, "
                            f"the manifest says {stored.size}")
    return problems


def _existing_keys(endpoint: Endpoint, bucket: str, prefix: str) -> set[str]:
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
    def __init__(self, endpoint: Endpoint, set_dir: Path, target: RestoreTarget, verify_mode: str):
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
        with SpooledTemporaryFile(max_size=HASH_CHUNK) as spool, open_content(path, compressed) as stream:
            digest, size = hashlib.sha256(), 0
            while chunk := stream.read(HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                spool.write(chunk)
            if (size, digest.hexdigest()) != (entry["size"], entry["sha256"]):
                return self._corrupt(entry, size, digest.hexdigest())
            spool.seek(0)
            self.endpoint.client.put_object(Bucket=self.target.bucket, Key=key, Body=spool,
                                            ContentLength=size, **SHA256_UPLOAD_ARGS, **extra)
        return b64_sha256(entry["sha256"])

    def _put_multipart(self, path: Path, compressed: bool, key: str, extra: dict[str, Any],
                       entry: Mapping[str, Any]) -> str | list[str]:
        """Send parts while hashing them; complete only if the whole object matches the manifest."""
        with open_content(path, compressed) as stream:
            sent = upload_verified_multipart(
                self.endpoint.client, self.target.bucket, key, stream, part_size=part_size_for(entry["size"]),
                expected_size=entry["size"], expected_sha256=entry["sha256"], extra=extra,
            )
        return sent.checksum if sent.committed else self._corrupt(entry, sent.size, sent.sha256)

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
            if without_parts_suffix(checksum) != without_parts_suffix(expected_checksum):
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


def _new_report(manifest: Manifest, bucket: str, target: RestoreTarget, entries: list[dict[str, Any]],
                dry_run: bool) -> dict[str, Any]:
    return {
        "backup_id": manifest.backup_id, "source_bucket": bucket, "target": target.description,
        "objects": len(entries), "bytes": sum(entry["size"] for entry in entries), "dry_run": dry_run,
        "verified": 0, "verified_by": {}, "config_restored": [], "problems": [], "actions": [], "ok": False,
    }


def _prepare_bucket(endpoint: Endpoint, target: RestoreTarget, report: dict[str, Any], dry_run: bool) -> set[str]:
    """The keys already under the target prefix; a missing bucket is created (if allowed, and not in a dry run)."""
    try:
        endpoint.check_bucket(target.bucket)
        return _existing_keys(endpoint, target.bucket, target.prefix)
    except BucketMissing:
        if not target.create_bucket:
            raise
    report["actions"].append(f"create bucket {target.bucket} at {endpoint.host}")
    if not dry_run:
        with endpoint.errors(f"creating bucket {target.bucket}"):
            endpoint.client.create_bucket(Bucket=target.bucket)
        report["bucket_created"] = True
    return set()


def _write_objects(endpoint: Endpoint, set_dir: Path, entries: list[dict[str, Any]], target: RestoreTarget,
                   report: dict[str, Any], verify_mode: str, max_workers: int) -> None:
    restorer = _Restorer(endpoint, set_dir, target, verify_mode)
    results: list[_Restored] = run_pool(restorer.restore_one, entries, max_workers, lambda _: None)
    for result in results:
        report["problems"].extend(result.problems)
        if result.verified_by and not result.problems:
            report["verified"] += 1
            report["verified_by"][result.verified_by] = report["verified_by"].get(result.verified_by, 0) + 1


def restore_bucket(
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
    Raises RestoreFailed (with the report) if any object could not be restored or verified.
    """
    if verify_mode not in VERIFY_MODES:
        raise MinioError(f"verify_mode must be 'checksum' or 'download', got {verify_mode!r}")
    resolved = RestoreTarget.of(target)
    bucket, entries = _select(manifest, source_bucket, key_prefix)
    if key_prefix and not entries:
        raise MinioError(f"backup {manifest.backup_id}: no object of bucket {bucket} has a key starting with {key_prefix!r}")
    started = time.monotonic()
    report = _new_report(manifest, bucket, resolved, entries, dry_run)
    problems = _preflight(set_dir, manifest, entries)
    if problems:
        report["problems"] = problems
        raise RestoreFailed(
            f"backup {manifest.backup_id}: {len(problems)} object(s) cannot be restored from {set_dir}, nothing was "
            "written: " + "; ".join(problems[:5]),
            report,
        )
    endpoint = target_endpoint(resolved, get_connection, max_workers)
    report["endpoint"] = endpoint.host
    existing = _prepare_bucket(endpoint, resolved, report, dry_run)
    conflicts = sorted({target_key(resolved.prefix, entry["key"]) for entry in entries} & existing)
    report["conflicts"] = len(conflicts)
    if conflicts and not overwrite:
        raise MinioError(
            f"{len(conflicts)} object(s) already exist in {resolved.description} (first: {conflicts[0]!r}); "
            "restore under another prefix, or pass overwrite=True to replace them"
        )
    replacing = f", replacing {len(conflicts)} existing" if conflicts else ""
    report["actions"].append(f"write {len(entries)} objects ({report['bytes']} bytes) of backup {manifest.backup_id} "
                             f"bucket {bucket} into {resolved.description} at {endpoint.host}{replacing}")
    if restore_config:
        report["actions"].append(f"apply the captured configuration of bucket {bucket} to {resolved.bucket}")
    if dry_run:
        log.info("minio restore (dry run): would %s", "; ".join(report["actions"]))
        report["seconds"] = round(time.monotonic() - started, 3)
        report["ok"] = True
        return report
    return _finish_restore(endpoint, set_dir, entries, resolved, report, restore_config, verify_mode, max_workers,
                           started)


def _finish_restore(endpoint: Endpoint, set_dir: Path, entries: list[dict[str, Any]], target: RestoreTarget,
                    report: dict[str, Any], restore_config: bool, verify_mode: str, max_workers: int,
                    started: float) -> dict[str, Any]:
    log.info("minio restore: %d objects (%d bytes) of %s/%s into %s at %s", len(entries), report["bytes"],
             report["backup_id"], report["source_bucket"], target.description, endpoint.host)
    if restore_config:
        config_path = set_dir / config_file(report["source_bucket"])
        report["config_restored"] = restore_bucket_config(
            endpoint, json.loads(config_path.read_text(encoding="utf-8")), target.bucket
        )
    _write_objects(endpoint, set_dir, entries, target, report, verify_mode, max_workers)
    report["seconds"] = round(time.monotonic() - started, 3)
    report["ok"] = not report["problems"] and report["verified"] == len(entries)
    log.info("minio restore: %d/%d objects verified on %s in %.1f s (%s)", report["verified"], len(entries),
             target.description, report["seconds"], report["verified_by"])
    if not report["ok"]:
        raise RestoreFailed(
            f"backup {report['backup_id']}: {len(report['problems'])} problem(s) restoring into {target.description}: "
            + "; ".join(report["problems"][:5]),
            report,
        )
    return report


# -- the set (the service verb) -------------------------------------------------------------------

BUCKET_SUMMARY_KEYS = ("target", "endpoint", "objects", "bytes", "verified", "verified_by", "conflicts",
                       "config_restored", "bucket_created", "seconds", "failed")


def bucket_targets(target: Any, source_bucket: str | None, manifest: Manifest) -> list[tuple[str | None, Any]]:
    """(source bucket, target) pairs: a target without a bucket takes each bucket into one of the same name."""
    fields = target_fields(target)
    if fields.get("bucket"):
        return [(source_bucket, target)]
    chosen = [source_bucket] if source_bucket else sorted(manifest.details.get("buckets") or {})
    return [(bucket, {**fields, "bucket": bucket}) for bucket in chosen]


def _restore_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    values = dict(options or {})
    unknown = sorted(set(values) - set(RESTORE_OPTIONS))
    if unknown:
        raise MinioError(f"unknown MinIO restore option(s) {unknown} (known: {', '.join(RESTORE_OPTIONS)})")
    return values


def _add_bucket(report: RestoreReport, part: Mapping[str, Any]) -> None:
    details = report.details
    details["buckets"][part["source_bucket"]] = {key: part[key] for key in BUCKET_SUMMARY_KEYS if key in part}
    for key in ("objects", "bytes", "verified", "conflicts"):
        details[key] += int(part.get(key) or 0)
    for mode, count in (part.get("verified_by") or {}).items():
        details["verified_by"][mode] = details["verified_by"].get(mode, 0) + count
    report.actions.extend(part.get("actions") or [])
    if not report.dry_run:
        report.restored_bytes += int(part.get("bytes") or 0)
        report.checks.append(f"{part['source_bucket']} → {part['target']}: {part['verified']}/{part['objects']} "
                             f"objects verified on the target {dict(part['verified_by'])}")


def restore_set(set_dir: Path, manifest: Manifest, target: Any, *, dry_run: bool = False,
                options: Mapping[str, Any] | None = None) -> RestoreReport:
    """Restore the set's buckets into `target`; objects that fail are the report's problems.

    Raises MinioError for a bad target or options, an unreachable endpoint, a missing bucket
    (without create_bucket) or keys that exist already (without overwrite).
    """
    values = _restore_options(options)
    source_bucket = values.pop("source_bucket", None)
    report = RestoreReport(dry_run=dry_run, details={
        "backup_id": manifest.backup_id, "buckets": {}, "objects": 0, "bytes": 0, "verified": 0, "verified_by": {},
        "conflicts": 0,
    })
    for source, bucket_target in bucket_targets(target, source_bucket, manifest):
        try:
            part = restore_bucket(Path(set_dir), manifest, bucket_target, source_bucket=source, dry_run=dry_run,
                                  **values)
        except RestoreFailed as exc:
            part = {**exc.report, "failed": str(exc)}
            report.problems.extend(part.get("problems") or [str(exc)])
        _add_bucket(report, part)
    return report
