"""The structural check of a MinIO set: every object has its file, and sizes, hashes and counts agree.

The checksum step has already hashed each file against the manifest; `verify` checks the
object list against those files. Compressed objects are decompressed and hashed;
`rehash=True` also re-hashes uncompressed files (for use without the checksum step).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from erp_backup.manifest import HASH_CHUNK, FileEntry, Manifest, sha256_file
from erp_backup.services.minio.layout import OBJECTS_DIR
from erp_backup.sets import BackupSet


def content_digest(path: Path, compressed: bool) -> tuple[int, str]:
    """(size, hex SHA-256) of an object's bytes as stored, decompressing if needed."""
    if not compressed:
        return sha256_file(path)
    with open_content(path, compressed) as stream:
        digest, size = hashlib.sha256(), 0
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@contextmanager
def open_content(path: Path, compressed: bool) -> Iterator[IO[bytes]]:
    """An object's bytes as stored in the set, decompressed if needed."""
    import zstandard

    with open(path, "rb") as handle:
        if compressed:
            with zstandard.ZstdDecompressor().stream_reader(handle, read_size=HASH_CHUNK) as reader:
                yield reader
        else:
            yield handle


def safe_file(relative: Any) -> str | None:
    """A set-relative path, or None if it is absolute, empty or climbs out with `..`."""
    if not isinstance(relative, str):
        return None
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return None
    return relative


@dataclass
class _Tally:
    """What the object walk saw: keys, files used, and (objects, bytes) per bucket."""

    keys: set[tuple[str, str]] = field(default_factory=set)
    used_files: set[str] = field(default_factory=set)
    counts: dict[str, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _stored_problems(name: str, entry: Mapping[str, Any], relative: str, stored: FileEntry, path: Path,
                     rehash: bool) -> list[str]:
    """Why one object's stored file does not hold its bytes; empty when it does."""
    if path.stat().st_size != stored.size:
        return [f"{name}: {relative} is {path.stat().st_size} bytes, the manifest says {stored.size}"]
    compressed = bool(entry.get("compressed"))
    if not compressed and (stored.size, stored.sha256) != (entry.get("size"), entry.get("sha256")):
        return [f"{name}: the object's size/sha256 differ from its file's in the manifest"]
    if compressed or rehash:
        size, digest = content_digest(path, compressed)
        if (size, digest) != (entry.get("size"), entry.get("sha256")):
            return [f"{name}: {relative} holds {size} bytes with sha256 {digest}, "
                    f"expected {entry.get('size')} bytes with sha256 {entry.get('sha256')}"]
    return []


def _check_object(tally: _Tally, entry: Mapping[str, Any], files: Mapping[str, FileEntry], set_path: Path,
                  rehash: bool) -> None:
    bucket, key = entry.get("bucket"), entry.get("key")
    name = f"{bucket}/{key}"
    if (bucket, key) in tally.keys:
        tally.problems.append(f"{name}: listed twice")
    tally.keys.add((bucket, key))  # type: ignore[arg-type]
    relative = safe_file(entry.get("file"))
    if relative is None or not relative.startswith(f"{OBJECTS_DIR}/"):
        tally.problems.append(f"{name}: unsafe or missing file path {entry.get('file')!r}")
        return
    if relative in tally.used_files:
        tally.problems.append(f"{name}: shares its file {relative} with another object")
    tally.used_files.add(relative)
    count = tally.counts.setdefault(str(bucket), [0, 0])
    count[0] += 1
    count[1] += int(entry.get("size", 0))
    stored = files.get(relative)
    if stored is None:
        tally.problems.append(f"{name}: its file {relative} is not in the manifest's file list")
    elif not (set_path / relative).is_file():
        tally.problems.append(f"{name}: its file {relative} is missing")
    else:
        tally.problems.extend(_stored_problems(name, entry, relative, stored, set_path / relative, rehash))


def _check_buckets(tally: _Tally, buckets: Mapping[str, Any], files: Mapping[str, FileEntry], set_path: Path) -> None:
    for bucket, summary in buckets.items():
        found = tally.counts.get(bucket, [0, 0])
        if [summary.get("objects"), summary.get("bytes")] != found:
            tally.problems.append(
                f"bucket {bucket}: {found[0]} objects / {found[1]} bytes listed, "
                f"the summary says {summary.get('objects')} / {summary.get('bytes')}"
            )
        relative = summary.get("config_file")
        if relative not in files or not (set_path / relative).is_file():
            tally.problems.append(f"bucket {bucket}: its configuration file {relative} is missing")
            continue
        try:
            json.loads((set_path / relative).read_text(encoding="utf-8"))
        except ValueError as exc:
            tally.problems.append(f"bucket {bucket}: {relative} is not valid JSON: {exc}")
        tally.used_files.add(relative)
    for bucket in set(tally.counts) - set(buckets):
        tally.problems.append(f"bucket {bucket}: has objects but no bucket summary")


def verify(backup_set: BackupSet, manifest: Manifest, *, rehash: bool = False) -> list[str]:
    """Every object has its file, and sizes, hashes and counts agree. Returns problems."""
    details = manifest.details
    objects, buckets = details.get("objects"), details.get("buckets")
    if not isinstance(objects, list) or not isinstance(buckets, dict):
        return [f"backup {backup_set.key}: the manifest has no object list or bucket summary"]
    files = {entry.path: entry for entry in manifest.files}
    tally = _Tally()
    for entry in objects:
        _check_object(tally, entry, files, backup_set.path, rehash)
    _check_buckets(tally, buckets, files, backup_set.path)
    for relative in sorted(set(files) - tally.used_files):
        tally.problems.append(f"{relative}: in the file list but no object or bucket refers to it")
    transfer = details.get("transfer") or {}
    if transfer and transfer.get("objects_transferred", 0) + transfer.get("objects_reused", 0) != len(objects):
        tally.problems.append(
            f"transfer summary counts {transfer.get('objects_transferred')} transferred + "
            f"{transfer.get('objects_reused')} reused, but {len(objects)} objects are listed"
        )
    return tally.problems
