"""MinIO backups: dated copies of the configured buckets, incremental by hardlink (`full`) or whole (`snapshot`).

Each object is streamed from `get_object()["Body"].iter_chunks()` into `erp_backup.stream`
(SHA-256 while writing, files 0600) on a thread pool of `max_workers`, with one shared client.
An incremental `full` reuses an unchanged object's file from the previous complete set by
hardlink (a copy, re-hashed, where a hardlink is impossible), so every set stands alone; the
change-detection rule is `layout.plan_object`. Only current versions are copied.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erp_backup.crypto import set_recipients
from erp_backup.manifest import DIR_MODE, HASH_CHUNK, FileEntry, ManifestError
from erp_backup.s3 import whole_object_sha256
from erp_backup.services.base import BackupContext, BackupOutcome
from erp_backup.services.minio.bucket_config import capture_bucket_config, config_summary, json_bytes
from erp_backup.services.minio.endpoint import (
    MISSING_KEY_CODES,
    Endpoint,
    endpoint_host,
    error_code,
    file_chunks,
    run_pool,
    s3_client,
    s3_errors,
)
from erp_backup.services.minio.layout import (
    INCREMENTAL_TYPES,
    LAYOUT,
    SUPPORTED_TYPES,
    Action,
    Listed,
    MinioError,
    MirrorOptions,
    config_file,
    normalized_time,
    object_file,
    plan_object,
)
from erp_backup.sets import BackupSet, list_sets
from erp_backup.stream import stream_to_file

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0


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
    """The newest verified (or offsite) set of the same type, other than `current`, with its index.

    An encrypted set reuses nothing: its files are sealed per set, and a sealed set's object list is not readable.
    """
    if set_recipients(current.path):
        log.info("minio: %s is encrypted; every object is downloaded (sealed sets are not reused)", current.key)
        return None
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

    def __init__(self, endpoint: Endpoint, set_dir: Path, options: MirrorOptions, base: _Base | None, incremental: bool):
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
                if error_code(exc) in MISSING_KEY_CODES:
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
            copied = stream_to_file(file_chunks(source), self.set_dir, relative, compress=False)
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
                if error_code(exc) in MISSING_KEY_CODES:
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
        sha256 = raw.hexdigest() if compress else result.clear_sha256
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


def _list_bucket(endpoint: Endpoint, bucket: str) -> list[Listed]:
    paginator = endpoint.client.get_paginator("list_objects_v2")
    with endpoint.errors(f"listing bucket {bucket}"):
        return [
            Listed.from_listing(bucket, item)
            for page in paginator.paginate(Bucket=bucket, PaginationConfig={"PageSize": 1000})
            for item in page.get("Contents", [])
        ]


def _tools() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    tools = {}
    for package in ("boto3", "botocore", "apache-airflow-providers-amazon"):
        try:
            tools[package] = version(package)
        except PackageNotFoundError:
            pass
    return tools


def _copy_configs_and_list(endpoint: Endpoint, set_dir: Path, buckets: tuple[str, ...]
                           ) -> tuple[list[FileEntry], dict[str, dict[str, Any]], list[Listed]]:
    """Each bucket's configuration into the set, and the listing of every object to copy."""
    files: list[FileEntry] = []
    summaries: dict[str, dict[str, Any]] = {}
    listing: list[Listed] = []
    for bucket in buckets:
        endpoint.check_bucket(bucket)
        config = capture_bucket_config(endpoint, bucket)
        files.append(stream_to_file([json_bytes(config)], set_dir, config_file(bucket), compress=False).entry)
        listed = _list_bucket(endpoint, bucket)
        listing.extend(listed)
        summaries[bucket] = {"config_file": config_file(bucket), "config": config_summary(config), "listed": len(listed)}
    return files, summaries, listing


def _transfer_summary(captured: list[_Captured], listed: int, base: _Base | None, seconds: float) -> dict[str, Any]:
    moved = [c for c in captured if c.transferred]
    kept = [c for c in captured if not c.transferred]
    return {
        "base_backup_id": base.backup_id if base else None,
        "objects_transferred": len(moved),
        "bytes_transferred": sum(c.record["size"] for c in moved),
        "objects_reused": len(kept),
        "bytes_reused": sum(c.record["size"] for c in kept),
        "objects_vanished": listed - len(captured),
        "seconds": round(seconds, 3),
    }


def backup(ctx: BackupContext) -> BackupOutcome:
    """Copy every object of the configured buckets, and their configuration, into the set."""
    if ctx.job.backup_type not in SUPPORTED_TYPES:
        raise MinioError(f"minio has no {ctx.job.backup_type!r} backup (supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    options = MirrorOptions.from_options(ctx.options)
    conn_id = ctx.conn_id("source")
    connection = ctx.connection("source")
    host = endpoint_host(connection)
    with s3_errors(conn_id, host, "creating the S3 client"):
        endpoint = Endpoint(conn_id, host, s3_client(connection, options.max_workers))
    incremental = ctx.job.backup_type in INCREMENTAL_TYPES
    base = previous_set(ctx.backup_set) if incremental else None
    label = f"minio {ctx.job.backup_type} {ctx.backup_set.backup_id}"
    log.info("%s: copying %s from %s (connection %s); %s", label, ", ".join(options.buckets), host, conn_id,
             f"reusing unchanged objects of {base.backup_id}" if base else "downloading every object")
    started = time.monotonic()

    files, buckets, listing = _copy_configs_and_list(endpoint, ctx.set_dir, options.buckets)
    mirror = _Mirror(endpoint, ctx.set_dir, options, base, incremental)
    progress = _Progress(len(listing), label)
    captured = [c for c in run_pool(mirror.capture, listing, options.max_workers, progress.add) if c is not None]
    transfer = _transfer_summary(captured, len(listing), base, time.monotonic() - started)

    objects = sorted((c.record for c in captured), key=lambda r: (r["bucket"], r["key"]))
    files.extend(sorted((c.file for c in captured), key=lambda f: f.path))
    for bucket, summary in buckets.items():
        mine = [r for r in objects if r["bucket"] == bucket]
        summary.update(objects=len(mine), bytes=sum(r["size"] for r in mine))
    vanished = transfer["objects_vanished"]
    log.info(
        "%s: %d objects / %d bytes transferred, %d objects / %d bytes reused%s%s, in %.1f s",
        label, transfer["objects_transferred"], transfer["bytes_transferred"], transfer["objects_reused"],
        transfer["bytes_reused"], f" from {base.backup_id}" if base else "",
        f", {vanished} deleted during the backup" if vanished else "", transfer["seconds"],
    )
    return BackupOutcome(
        files=files,
        source={"conn_id": conn_id, "endpoint": host, "buckets": list(options.buckets)},
        tools=_tools(),
        details={"layout": LAYOUT, "incremental": incremental, "compress": options.compress, "buckets": buckets,
                 "transfer": transfer, "objects": objects},
    )
