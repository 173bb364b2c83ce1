"""Backup sets on local staging: `$BACKUP_ROOT/<service>/<type>/<backup_id>/`.

A set's state is derived from the marker files in its directory:

- INCOMPLETE: no manifest. Never counted, never restored; the next run removes it.
- UNVERIFIED: a manifest, but the checksum task has not passed yet.
- CORRUPT: the checksum task found a mismatch (CHECKSUM_FAILED holds the details).
- VERIFIED: SHA256SUMS was written after every file matched the manifest.
- OFFSITE: verified, and the offsite copy was verified object by object.

Offsite listings add SUSPECT (erp_backup.offsite_trust): an offsite manifest that does
not match what was recorded at upload. It is never pruned, drilled or counted.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from erp_backup import locks
from erp_backup.diskio import io_context
from erp_backup.manifest import DIR_MODE, MANIFEST_NAME, Manifest, write_atomic

log = logging.getLogger(__name__)

SUMS_NAME = "SHA256SUMS"
FAILED_NAME = "CHECKSUM_FAILED"
OFFSITE_RECEIPT_NAME = "offsite.json"
MARKER_NAMES = frozenset({MANIFEST_NAME, SUMS_NAME, FAILED_NAME, OFFSITE_RECEIPT_NAME})
BACKUP_ID_FORMAT = "%Y%m%dT%H%M%SZ"
_BACKUP_ID = re.compile(r"^\d{8}T\d{6}Z$")


class SetState(str, enum.Enum):
    INCOMPLETE = "incomplete"
    UNVERIFIED = "unverified"
    CORRUPT = "corrupt"
    VERIFIED = "verified"
    OFFSITE = "offsite"
    SUSPECT = "suspect"  # offsite only: the manifest disagrees with its upload record

    @property
    def is_good(self) -> bool:
        return self in (SetState.VERIFIED, SetState.OFFSITE)


class BackupSetError(LookupError):
    """A backup set is missing or not usable."""


def backup_id_for(moment: datetime) -> str:
    """The backup id of a run: its logical date (or run_after) in UTC, second precision."""
    if moment.tzinfo is None:
        raise ValueError("backup ids are derived from timezone-aware run dates")
    return moment.astimezone(UTC).strftime(BACKUP_ID_FORMAT)


def is_backup_id(name: str) -> bool:
    return bool(_BACKUP_ID.match(name))


@dataclass(frozen=True)
class BackupSet:
    root: Path
    service: str
    backup_type: str
    backup_id: str

    @cached_property
    def path(self) -> Path:  # cached: listings of thousands of sets ask for it several times per set
        return self.root / self.service / self.backup_type / self.backup_id

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def key(self) -> str:
        """The set's relative location, shared by staging and offsite."""
        return f"{self.service}/{self.backup_type}/{self.backup_id}"

    @property
    def state(self) -> SetState:
        return state_from_markers(lambda name: (self.path / name).is_file())

    def manifest(self) -> Manifest:
        if not self.manifest_path.is_file():
            raise BackupSetError(
                f"backup {self.key} is incomplete: it has no {MANIFEST_NAME} and cannot be used"
            )
        return Manifest.read(self.manifest_path)

    def create_dir(self) -> Path:
        """Create an empty set directory (0700), removing any partial leftovers."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, mode=DIR_MODE)
        for parent in (self.path.parent, self.path.parent.parent):
            os.chmod(parent, DIR_MODE)
        return self.path

    def mark_corrupt(self, problems: list[str]) -> None:
        with io_context(self.path / FAILED_NAME, set_dir=self.path):
            write_atomic(self.path / FAILED_NAME, ("\n".join(problems) + "\n").encode())
            (self.path / SUMS_NAME).unlink(missing_ok=True)
            (self.path / OFFSITE_RECEIPT_NAME).unlink(missing_ok=True)

    def write_offsite_receipt(self, receipt: dict) -> None:
        with io_context(self.path / OFFSITE_RECEIPT_NAME, set_dir=self.path):
            write_atomic(self.path / OFFSITE_RECEIPT_NAME, json.dumps(receipt, indent=2).encode())

    def offsite_receipt(self) -> dict | None:
        path = self.path / OFFSITE_RECEIPT_NAME
        return json.loads(path.read_text()) if path.is_file() else None

    def remove(self, reason: str) -> None:
        log.info("removing %s from staging: %s", self.key, reason)
        shutil.rmtree(self.path, ignore_errors=False)


def state_from_markers(has: Callable[[str], bool]) -> SetState:
    """A set's state from which of its marker files exist (`has(name)`)."""
    if not has(MANIFEST_NAME):
        return SetState.INCOMPLETE
    if has(FAILED_NAME):
        return SetState.CORRUPT
    if not has(SUMS_NAME):
        return SetState.UNVERIFIED
    return SetState.OFFSITE if has(OFFSITE_RECEIPT_NAME) else SetState.VERIFIED


def staging_states(root: Path, service: str, backup_type: str) -> dict[str, SetState]:
    """Every set's state by backup id, with one directory listing per set (the Backups page's counts)."""
    states = {}
    for backup_set in list_sets(root, service, backup_type):
        try:
            with os.scandir(backup_set.path) as entries:
                markers = {entry.name for entry in entries if entry.name in MARKER_NAMES and entry.is_file()}
        except FileNotFoundError:  # removed since the listing
            continue
        states[backup_set.backup_id] = state_from_markers(markers.__contains__)
    return states


def list_sets(root: Path, service: str, backup_type: str) -> list[BackupSet]:
    """Every set directory of a type, oldest id first, whatever its state."""
    base = root / service / backup_type
    if not base.is_dir():
        return []
    return [
        BackupSet(root, service, backup_type, entry.name)
        for entry in sorted(base.iterdir())
        if entry.is_dir() and is_backup_id(entry.name)
    ]


def remove_incomplete(root: Path, service: str, backup_type: str, keep: str | None = None) -> list[str]:
    """Remove sets left without a manifest by a run that is provably gone (except `keep`).

    Gone means: no other process holds the job's lock (erp_backup.locks), and the set's
    writer marker, if it has one, does not name a live process on this host and boot.
    Without the lock in this process, it is taken for the cleanup; if another run holds
    it, nothing is removed.
    """
    if not (root / service / backup_type).is_dir():
        return []
    if locks.held_here(locks.lock_path(root, service, backup_type)):
        return _remove_dead_incomplete(root, service, backup_type, keep)
    try:
        with locks.job_lock(root, service, backup_type, "cleanup of incomplete sets"):
            return _remove_dead_incomplete(root, service, backup_type, keep)
    except locks.LockBusy as busy:
        log.info("not removing incomplete %s/%s sets: %s", service, backup_type, busy)
        return []


def _remove_dead_incomplete(root: Path, service: str, backup_type: str, keep: str | None) -> list[str]:
    removed = []
    for backup_set in list_sets(root, service, backup_type):
        if backup_set.backup_id == keep or backup_set.state is not SetState.INCOMPLETE:
            continue
        writer = locks.read_marker(backup_set.path)
        if writer is not None and locks.writer_alive(writer):
            log.warning("keeping incomplete set %s: its writer %s still runs", backup_set.key, writer.describe())
            continue
        gone = f"writer {writer.describe()} is gone" if writer else "no writer marker, job not locked"
        backup_set.remove(f"incomplete: no manifest, left by a failed or killed run ({gone})")
        removed.append(backup_set.backup_id)
    return removed
