"""Manifests: the JSON record that makes a backup set complete.

A manifest is written last, atomically (temp file, fsync, rename, fsync dir).
It lists every data file with its size and SHA-256, the real capture times,
the Airflow run that produced it, and service-specific details.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from erp_backup.diskio import io_context

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
FILE_MODE = 0o600
DIR_MODE = 0o700
HASH_CHUNK = 1 << 20


class ManifestError(ValueError):
    """A manifest is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the set directory, POSIX separators
    size: int
    sha256: str


@dataclass
class Manifest:
    service: str
    backup_type: str
    backup_id: str
    captured_started_at: datetime
    captured_finished_at: datetime
    run: dict[str, Any]
    source: dict[str, Any]
    tools: dict[str, str]
    files: list[FileEntry]
    details: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    encryption: dict[str, Any] = field(default_factory=dict)  # a sealed set's clear part (erp_backup.sealing)

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    def file(self, relative: str) -> FileEntry:
        for entry in self.files:
            if entry.path == relative:
                return entry
        raise ManifestError(f"backup {self.backup_id}: {relative} is not in the manifest")

    def to_json(self) -> str:
        data = asdict(self)
        data["captured_started_at"] = self.captured_started_at.isoformat()
        data["captured_finished_at"] = self.captured_finished_at.isoformat()
        return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"

    @classmethod
    def from_json(cls, text: str, origin: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
            return cls(
                service=data["service"],
                backup_type=data["backup_type"],
                backup_id=data["backup_id"],
                captured_started_at=datetime.fromisoformat(data["captured_started_at"]),
                captured_finished_at=datetime.fromisoformat(data["captured_finished_at"]),
                run=data["run"],
                source=data["source"],
                tools=data["tools"],
                files=[FileEntry(**entry) for entry in data["files"]],
                details=data.get("details", {}),
                format=data.get("format", FORMAT_VERSION),
                encryption=data.get("encryption") or {},
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"{origin}: not a valid manifest: {exc!r}") from exc

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read manifest: {exc.strerror}") from exc
        return cls.from_json(text, origin=str(path))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, mode: int = FILE_MODE) -> Iterator[BinaryIO]:
    """Yield a handle to a hidden temp file; on a clean exit fsync it, rename it to `path`, fsync the dir.

    Readers see either nothing or the whole file. If the block raises, the temp file is removed.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Write `data` to `path` so readers see either nothing or all of it."""
    with atomic_file(path, mode) as handle:
        handle.write(data)


def write_manifest(set_dir: Path, manifest: Manifest) -> Path:
    target = set_dir / MANIFEST_NAME
    with io_context(target, set_dir=set_dir):
        write_atomic(target, manifest.to_json().encode("utf-8"))
    return target


def sha256_file(path: Path) -> tuple[int, str]:
    """Return (size, hex SHA-256) of a file, reading it in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(HASH_CHUNK)
        view = memoryview(buffer)
        while read := handle.readinto(buffer):
            digest.update(view[:read])
            size += read
    return size, digest.hexdigest()
