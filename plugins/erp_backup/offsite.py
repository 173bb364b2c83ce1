"""The offsite store: upload, verify, list, fetch and delete backup sets on S3 or a NAS mount.

Layout, for both kinds: `<root>/<service>/<type>/<backup_id>/<file>`, where the
root is `s3://<bucket>/<prefix>` or the NAS path and `<service>/<type>/<backup_id>`
is `BackupSet.key`. An offsite set is complete only when its `manifest.json` is
there, so:

- uploads store the data files, then SHA256SUMS, and the manifest last, and only
  after every data object was verified; if any object must be (re)written, an existing
  offsite manifest is removed first, or on S3 (which never deletes on upload) refused;
- deletions remove the manifest first, so a half-deleted set is never complete;
- fetches refuse a set without a manifest and check each file's SHA-256.

Local-only markers (CHECKSUM_FAILED, offsite.json) never leave: only listed files, SHA256SUMS, the manifest.

S3 (`S3Offsite`, in `erp_backup.offsite_s3`, importable from here) goes through the Amazon
provider's `S3Hook` on an Airflow `aws` connection (settings and SHA-256 checksums: `erp_backup.s3`),
verifies objects by size and SHA-256 (composite for multipart) and can set S3 Object Lock.

A filesystem store (`FilesystemOffsite`) copies each file to a temp name, fsyncs it, renames it
into place and fsyncs the directory (files 0600, directories 0700), then drops it from the page
cache and hashes it again. Its root must exist: an unmounted NAS is an error, not a local copy.
It records a manifest's SHA-256 in `<root>/.sha256/<set key>/manifest.json` before
writing the manifest itself (S3 keeps it as metadata). `manifest_object` returns the manifest's
bytes with that record and the object's timestamp, so erp_backup.offsite_trust can
check an offsite manifest instead of trusting it.

Transfers run one file at a time (S3 multipart parts `max_concurrency` at a time).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from erp_backup.checksum import ChecksumMismatch, sha256sums_text
from erp_backup.manifest import (
    DIR_MODE,
    HASH_CHUNK,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    atomic_file,
    fsync_dir,
    sha256_file,
    write_atomic,
)
from erp_backup.runs import utcnow
from erp_backup.sets import MARKER_NAMES, SUMS_NAME, BackupSet, SetState

if TYPE_CHECKING:
    from erp_backup.offsite_s3 import S3Offsite
    from erp_backup.plan import Plan

log = logging.getLogger(__name__)

RECORDS_DIR = ".sha256"  # filesystem store: <root>/.sha256/<key> holds the SHA-256 of the object at <key>


class OffsiteError(RuntimeError):
    """The offsite store is unreachable, or a set there is missing, incomplete or corrupt."""


# What reading from the offsite store can raise: the store's own errors and bytes that do not match.
OFFSITE_FAILURES = (OffsiteError, ChecksumMismatch)


@dataclass
class UploadReport:
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    bytes_skipped: int = 0
    verified: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StoredObject:
    """An object's bytes with what the store knows about them (read by erp_backup.offsite_trust)."""

    data: bytes
    modified_at: datetime  # when the object was written: S3 LastModified, the file's mtime (UTC)
    recorded_sha256: str | None  # hex SHA-256 recorded at upload: S3 metadata, the filesystem sidecar
    store_sha256: str | None = None  # hex SHA-256 the store computed itself (S3 ChecksumSHA256, single part)


@runtime_checkable
class Offsite(Protocol):
    description: str  # e.g. "s3://bucket/prefix" or "file:///mnt/nas/x"; never secrets

    def upload_set(self, backup_set: BackupSet) -> UploadReport: ...

    def verify_set(self, service: str, backup_type: str, backup_id: str, manifest: Manifest) -> list[str]: ...

    def list_backup_ids(self, service: str, backup_type: str) -> list[str]: ...

    def read_manifest(self, service: str, backup_type: str, backup_id: str) -> Manifest | None: ...

    def manifest_object(self, service: str, backup_type: str, backup_id: str) -> StoredObject | None: ...

    def fetch_set(self, service: str, backup_type: str, backup_id: str, dest: Path) -> Manifest: ...

    def delete_set(self, service: str, backup_type: str, backup_id: str) -> int: ...

    def locked_until(self, service: str, backup_type: str, backup_id: str) -> datetime | None: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def get_file(self, key: str, path: Path) -> bool: ...


@dataclass(frozen=True)
class _Item:
    """One file of a set: its path in the set, expected size and SHA-256, and local copy if any."""

    relative: str
    size: int
    sha256: str
    local: Path | None = None


def set_key(service: str, backup_type: str, backup_id: str) -> str:
    return f"{service}/{backup_type}/{backup_id}"


def _safe_relative(relative: str, where: str) -> str:
    """Reject absolute paths and `..` so a manifest can never address files outside its set."""
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise OffsiteError(f"{where}: unsafe file path {relative!r} in the manifest")
    return "/".join(parts)


def _local_item(path: Path, relative: str) -> _Item:
    size, sha256 = sha256_file(path)
    return _Item(relative, size, sha256, path)


def _receive(chunks: Iterator[bytes], dest: Path, expected: _Item | None = None) -> None:
    """Write a stream to `dest` atomically (0600, fsync), checking size and SHA-256 before the rename."""
    digest, size = hashlib.sha256(), 0
    with atomic_file(dest) as handle:
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            handle.write(chunk)
        if expected is not None and (size, digest.hexdigest()) != (expected.size, expected.sha256):
            raise ChecksumMismatch(
                f"does not match the manifest: got {size} bytes with sha256 {digest.hexdigest()}, "
                f"expected {expected.size} bytes with sha256 {expected.sha256}"
            )


def _set_items(backup_set: BackupSet, where: str) -> tuple[list[_Item], _Item]:
    """A set's data files and SHA256SUMS, and its manifest, as items to upload."""
    manifest = backup_set.manifest()
    data_items = []
    for entry in manifest.files:
        relative = _safe_relative(entry.path, where)
        if relative in MARKER_NAMES:
            raise OffsiteError(f"{where}: the manifest lists the marker file {relative}, which is local-only")
        data_items.append(_Item(relative, entry.size, entry.sha256, backup_set.path / relative))
    data_items.append(_local_item(backup_set.path / SUMS_NAME, SUMS_NAME))
    return data_items, _local_item(backup_set.manifest_path, MANIFEST_NAME)


def _make_dirs(path: Path, stop: Path) -> None:
    """Create `path` and its missing parents up to `stop`, each 0700."""
    missing = []
    while not path.exists() and path != stop and path != path.parent:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)


class _SetStore(ABC):
    """The set-level logic shared by every offsite kind, on top of a few object primitives.

    Keys given to the primitives are relative to the offsite root
    (`<service>/<type>/<backup_id>/<file>` or a ledger key).
    """

    description: str

    # --- primitives -------------------------------------------------------------
    @abstractmethod
    def _name(self, key: str) -> str:
        """How a key is shown in reports and errors (the S3 object key, or the path under the root)."""

    @abstractmethod
    def _stored_problems(self, key: str, item: _Item) -> list[str]:
        """Why the stored object does not match `item` (missing, size, checksum); empty when it does."""

    @abstractmethod
    def _store(self, key: str, item: _Item) -> None:
        """Store `item.local` at `key`, replacing any object there."""

    @abstractmethod
    def _open(self, key: str) -> Iterator[bytes] | None:
        """The object's bytes as a stream of chunks, or None if there is no such object."""

    @abstractmethod
    def _exists(self, key: str) -> bool:
        """Whether an object is stored at `key`."""

    @abstractmethod
    def _child_names(self, key: str) -> list[str]:
        """The names of the entries directly under `key/`."""

    @abstractmethod
    def _delete_set_objects(self, key: str, manifest_key: str) -> int:
        """Delete every object under `key/`, `manifest_key` first. Return how many were deleted."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Delete one object if it exists."""

    @abstractmethod
    def _check_ready(self) -> None:
        """Fail with OffsiteError if the store is not there at all (bucket missing, NAS not mounted)."""

    @abstractmethod
    def _object_record(self, key: str) -> tuple[datetime, str | None, str | None] | None:
        """(written at, SHA-256 recorded at upload, SHA-256 the store computed) of an object; None if absent."""

    # --- sets -------------------------------------------------------------------
    def _read(self, key: str) -> bytes | None:
        chunks = self._open(key)
        return None if chunks is None else b"".join(chunks)

    def _pending(self, base: str, data_items: list[_Item], manifest_item: _Item, report: UploadReport) -> list[_Item]:
        """The items to (re)write, the manifest last; what is already stored intact goes in `report.skipped`."""
        pending = []
        for item in data_items:
            if self._stored_problems(f"{base}/{item.relative}", item):
                pending.append(item)
            else:
                report.skipped.append(self._name(f"{base}/{item.relative}"))
                report.bytes_skipped += item.size
        manifest_key = f"{base}/{MANIFEST_NAME}"
        if pending or self._stored_problems(manifest_key, manifest_item):
            if pending and self._exists(manifest_key):
                self._invalidate_manifest(base, manifest_key, pending)
            pending.append(manifest_item)
        else:
            report.skipped.append(self._name(manifest_key))
            report.bytes_skipped += manifest_item.size
        return pending

    def _invalidate_manifest(self, base: str, manifest_key: str, pending: list[_Item]) -> None:
        """The offsite manifest must not vouch for objects being rewritten (S3 refuses instead)."""
        self._delete(manifest_key)

    def upload_set(self, backup_set: BackupSet) -> UploadReport:
        """Upload a verified set, verify every object, then write the local receipt (state OFFSITE).

        Idempotent: objects already stored with the same size and checksum are
        skipped. Raises OffsiteError, writing no receipt, if any object fails
        verification; the manifest is then not uploaded.
        """
        state = backup_set.state
        if not state.is_good:
            raise OffsiteError(
                f"backup {backup_set.key} is {state.value}, not verified: only sets in state "
                f"{SetState.VERIFIED.value} or {SetState.OFFSITE.value} are uploaded offsite "
                "(run its checksum task first)"
            )
        where = f"backup {backup_set.key}"
        data_items, manifest_item = _set_items(backup_set, where)
        base = backup_set.key
        self._check_ready()
        report = UploadReport()
        pending = self._pending(base, data_items, manifest_item, report)

        problems: list[str] = []
        for item in pending:
            key = f"{base}/{item.relative}"
            if item is manifest_item and problems:
                break
            log.info("offsite %s: uploading %s (%d bytes)", self.description, self._name(key), item.size)
            self._store(key, item)
            report.uploaded.append(self._name(key))
            report.bytes_uploaded += item.size
            problems.extend(self._stored_problems(key, item))
        if problems:
            raise OffsiteError(
                f"{where}: offsite copy at {self.description} failed verification, manifest not uploaded "
                f"and no receipt written: " + "; ".join(problems)
            )

        report.verified = True
        backup_set.write_offsite_receipt({
            "description": self.description,
            "keys": report.uploaded + report.skipped,
            "bytes": report.bytes_uploaded + report.bytes_skipped,
            "bytes_uploaded": report.bytes_uploaded,
            "bytes_skipped": report.bytes_skipped,
            "manifest_sha256": manifest_item.sha256,  # what offsite_trust checks the offsite manifest against
            "verified_at": utcnow().isoformat(),
        })
        log.info(
            "offsite %s: %s verified; uploaded %d objects (%d bytes), skipped %d (%d bytes)",
            self.description, backup_set.key, len(report.uploaded), report.bytes_uploaded,
            len(report.skipped), report.bytes_skipped,
        )
        return report

    def verify_set(self, service: str, backup_type: str, backup_id: str, manifest: Manifest) -> list[str]:
        """Problems with the offsite copy of a set (missing objects, sizes, checksums); empty = good."""
        self._check_ready()
        base = set_key(service, backup_type, backup_id)
        problems = []
        for entry in manifest.files:
            relative = _safe_relative(entry.path, f"backup {base}")
            problems.extend(self._stored_problems(f"{base}/{relative}", _Item(relative, entry.size, entry.sha256)))
        if not self._exists(f"{base}/{SUMS_NAME}"):
            problems.append(f"{self._name(f'{base}/{SUMS_NAME}')}: missing")
        offsite_manifest = self.read_manifest(service, backup_type, backup_id)
        if offsite_manifest is None:
            problems.append(f"{self._name(f'{base}/{MANIFEST_NAME}')}: missing (the set is incomplete)")
        elif offsite_manifest.files != manifest.files or offsite_manifest.backup_id != manifest.backup_id:
            problems.append(f"{self._name(f'{base}/{MANIFEST_NAME}')}: lists other files than the expected manifest")
        return problems

    def list_backup_ids(self, service: str, backup_type: str) -> list[str]:
        """Every set seen offsite, complete or not, sorted."""
        self._check_ready()
        return sorted(self._child_names(f"{service}/{backup_type}"))

    def read_manifest(self, service: str, backup_type: str, backup_id: str) -> Manifest | None:
        """The offsite manifest; None if there is none. ManifestError if it is not a valid manifest."""
        self._check_ready()
        key = f"{set_key(service, backup_type, backup_id)}/{MANIFEST_NAME}"
        data = self._read(key)
        if data is None:
            return None
        return Manifest.from_json(data.decode("utf-8", errors="replace"), origin=f"{self.description} {self._name(key)}")

    def manifest_object(self, service: str, backup_type: str, backup_id: str) -> StoredObject | None:
        """The offsite manifest's raw bytes, when it was written and the SHA-256s recorded for it; None if absent."""
        self._check_ready()
        key = f"{set_key(service, backup_type, backup_id)}/{MANIFEST_NAME}"
        record = self._object_record(key)
        data = self._read(key) if record is not None else None
        if record is None or data is None:
            return None
        return StoredObject(data, *record)

    def fetch_set(self, service: str, backup_type: str, backup_id: str, dest: Path) -> Manifest:
        """Download a set into `dest` (created; must be absent or empty), checking each file's SHA-256.

        Data files come first, then SHA256SUMS, then the manifest, so `dest` is a
        VERIFIED set only once everything matched. On any failure `dest` is removed.
        """
        self._check_ready()
        base = set_key(service, backup_type, backup_id)
        manifest_data = self._read(f"{base}/{MANIFEST_NAME}")
        if manifest_data is None:
            raise OffsiteError(
                f"backup {base} at {self.description} is incomplete: it has no {MANIFEST_NAME} offsite "
                "(an interrupted upload or a partly deleted set) and cannot be fetched"
            )
        try:
            manifest = Manifest.from_json(manifest_data.decode("utf-8", errors="replace"), origin=f"{self.description} {base}")
        except ManifestError as exc:
            raise OffsiteError(f"backup {base}: {exc}") from exc
        if (manifest.service, manifest.backup_type, manifest.backup_id) != (service, backup_type, backup_id):
            raise OffsiteError(
                f"backup {base}: the offsite manifest describes "
                f"{set_key(manifest.service, manifest.backup_type, manifest.backup_id)}"
            )
        relatives = [_safe_relative(entry.path, f"backup {base}") for entry in manifest.files]
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise OffsiteError(f"backup {base}: cannot fetch into {dest}: it exists and is not an empty directory")
        created = not dest.exists()
        dest.mkdir(parents=True, mode=DIR_MODE, exist_ok=True)
        os.chmod(dest, DIR_MODE)
        try:
            for entry, relative in zip(manifest.files, relatives, strict=False):
                key = f"{base}/{relative}"
                what = f"backup {backup_id}: file {relative} ({self.description} {self._name(key)})"
                target = dest / relative
                _make_dirs(target.parent, dest)
                chunks = self._open(key)
                if chunks is None:
                    raise OffsiteError(f"{what} is missing offsite")
                try:
                    _receive(chunks, target, _Item(relative, entry.size, entry.sha256))
                except OFFSITE_FAILURES as exc:  # each keeps its type
                    raise type(exc)(f"{what}: {exc}") from exc
            sums = self._read(f"{base}/{SUMS_NAME}")
            write_atomic(dest / SUMS_NAME, sums if sums is not None else sha256sums_text(manifest).encode())
            write_atomic(dest / MANIFEST_NAME, manifest_data)
        except BaseException:
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            else:
                for child in dest.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            raise
        log.info("offsite %s: fetched %s into %s (%d files verified)", self.description, base, dest, len(manifest.files))
        return manifest

    def delete_set(self, service: str, backup_type: str, backup_id: str) -> int:
        """Delete every object of a set, the manifest first. Returns the number of objects deleted."""
        self._check_ready()
        base = set_key(service, backup_type, backup_id)
        deleted = self._delete_set_objects(base, f"{base}/{MANIFEST_NAME}")
        log.info("offsite %s: deleted %s (%d objects)", self.description, base, deleted)
        return deleted

    def locked_until(self, service: str, backup_type: str, backup_id: str) -> datetime | None:
        """Until when the store refuses to delete the set (S3 Object Lock); None when nothing holds it."""
        return None

    def put_file(self, key: str, path: Path) -> None:
        """Store one local file at `key` (relative to the offsite root), e.g. the drill ledger."""
        self._check_ready()
        key = _safe_relative(key, "put_file")
        item = _local_item(path, key)
        self._store(key, item)
        problems = self._stored_problems(key, item)
        if problems:
            raise OffsiteError(f"offsite {self.description}: {path} stored at {self._name(key)} failed verification: " + "; ".join(problems))

    def get_file(self, key: str, path: Path) -> bool:
        """Download `key` (relative to the offsite root) to `path` atomically; False if it does not exist."""
        self._check_ready()
        key = _safe_relative(key, "get_file")
        chunks = self._open(key)
        if chunks is None:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        _receive(chunks, path)
        return True


class FilesystemOffsite(_SetStore):
    """Backup sets on a mounted filesystem (NAS). The root directory must already exist."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path).absolute()
        self.description = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / key

    def _name(self, key: str) -> str:
        return key

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise OffsiteError(f"offsite {self.description}: {action} failed: {exc}") from exc

    def _check_ready(self) -> None:
        if not self.root.is_dir():
            raise OffsiteError(
                f"offsite {self.description}: {self.root} is not a directory (is the NAS mounted? "
                "set offsite.path in the plan or $ERP_OFFSITE_PATH)"
            )

    def _stored_problems(self, key: str, item: _Item) -> list[str]:
        path = self._path(key)
        with self._errors(f"reading {key}"):
            if not path.is_file():
                return [f"{key}: missing"]
            size, sha256 = sha256_file(path)
        problems = []
        if size != item.size:
            problems.append(f"{key}: {size} bytes offsite, {item.size} expected")
        if sha256 != item.sha256:
            problems.append(f"{key}: sha256 {sha256} offsite, {item.sha256} expected")
        if PurePosixPath(key).name == MANIFEST_NAME and self._recorded_sha256(key) != item.sha256:
            problems.append(f"{key}: its recorded SHA-256 ({RECORDS_DIR}/{key}) is missing or differs")
        return problems

    def _sidecar(self, key: str) -> Path:
        return self.root / RECORDS_DIR / key

    def _recorded_sha256(self, key: str) -> str | None:
        with self._errors(f"reading {key}"):
            try:
                return self._sidecar(key).read_text(encoding="ascii").strip() or None
            except FileNotFoundError:
                return None
            except UnicodeDecodeError:
                return "not ascii"

    def _object_record(self, key: str) -> tuple[datetime, str | None, str | None] | None:
        with self._errors(f"reading {key}"):
            try:
                written = self._path(key).stat().st_mtime
            except FileNotFoundError:
                return None
        recorded = self._recorded_sha256(key) if PurePosixPath(key).name == MANIFEST_NAME else None
        return datetime.fromtimestamp(written, UTC), recorded, None

    def _store(self, key: str, item: _Item) -> None:
        assert item.local is not None
        dest = self._path(key)
        with self._errors(f"copying {item.local} to {key}"):
            _make_dirs(dest.parent, self.root)
            if PurePosixPath(key).name == MANIFEST_NAME:  # the record first: never a manifest without it
                _make_dirs(self._sidecar(key).parent, self.root)
                write_atomic(self._sidecar(key), f"{item.sha256}\n".encode())
            with open(item.local, "rb") as source, atomic_file(dest) as target:
                shutil.copyfileobj(source, target, HASH_CHUNK)
                target.flush()
                os.fsync(target.fileno())
                # So the verification re-reads the copy from the NAS, not from the page cache.
                os.posix_fadvise(target.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _open(self, key: str) -> Iterator[bytes] | None:
        path = self._path(key)
        with self._errors(f"reading {key}"):
            try:
                handle = open(path, "rb")  # noqa: SIM115  (closed by _stream, which the caller drains)
            except FileNotFoundError:
                return None
        return self._stream(handle, key)

    def _stream(self, handle: Any, key: str) -> Iterator[bytes]:
        with handle, self._errors(f"reading {key}"):
            while chunk := handle.read(HASH_CHUNK):
                yield chunk

    def _child_names(self, key: str) -> list[str]:
        base = self._path(key)
        with self._errors(f"listing {key}"):
            if not base.is_dir():
                return []
            return [entry.name for entry in base.iterdir() if entry.is_dir() and not entry.name.startswith(".")]

    def _delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors(f"deleting {key}"):
            if path.exists():
                path.unlink()
                fsync_dir(path.parent)

    def _delete_set_objects(self, key: str, manifest_key: str) -> int:
        set_dir = self._path(key)
        with self._errors(f"deleting {key}"):
            if not set_dir.is_dir():
                return 0
            count = sum(1 for entry in set_dir.rglob("*") if entry.is_file())
            self._delete(manifest_key)
            shutil.rmtree(set_dir)
            fsync_dir(set_dir.parent)
            shutil.rmtree(self._sidecar(key), ignore_errors=True)  # after the manifest: never one without it
        return count


def offsite_from_plan(plan: Plan, *, prune: bool = False) -> Offsite:
    """The offsite store the plan names (`offsite.kind`: s3 or filesystem). Connects to nothing.

    On S3, `prune=True` gives the store on `offsite.prune_conn_id`, the only connection that may
    delete; everything else (upload, verify, list, fetch) uses `offsite.conn_id`, which needs no delete.
    """
    offsite = plan.offsite
    if offsite.kind == "s3":
        from erp_backup.offsite_s3 import S3Offsite, object_lock_from_plan

        return S3Offsite(offsite.prune_conn_id if prune else offsite.conn_id, offsite.bucket, offsite.prefix,
                         object_lock=object_lock_from_plan(plan))
    if offsite.kind == "filesystem":
        return FilesystemOffsite(offsite.path)
    raise OffsiteError(f"{plan.path}: offsite.kind: unknown kind {offsite.kind!r} (use s3 or filesystem)")


def __getattr__(name: str) -> type[S3Offsite]:
    """`S3Offsite` lives in erp_backup.offsite_s3 (which builds on this module); import it from either."""
    if name == "S3Offsite":
        from erp_backup.offsite_s3 import S3Offsite

        return S3Offsite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
