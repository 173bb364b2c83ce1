"""Offsite sets checked, not trusted: is an offsite manifest the one this deployment uploaded?

Every offsite listing that decides something (retention, the watchdog, `list --from offsite`,
the drill's pick) goes through `check_offsite_set`, which gives each set a state:

- OFFSITE: the manifest matches what was recorded at upload, and its capture time agrees
  with the manifest object's own timestamp;
- INCOMPLETE: no manifest, and nothing says there ever was one (an interrupted upload or a
  half-finished deletion);
- CORRUPT: the manifest matches its record but is not a valid manifest;
- SUSPECT: anything else. The manifest was edited, back-dated or copied from another set, or
  it is gone although staging's receipt says it was uploaded. A suspect set is never pruned,
  never drilled, listed as suspect and alerted by the watchdog.

What the manifest's SHA-256 must equal (each one present must match, and one must be present):

1. staging's offsite receipt (`offsite.json`) for this store: its `manifest_sha256`, or, in a
   receipt written before that field existed, the staging manifest's own SHA-256 (that file
   is what was uploaded);
2. the SHA-256 the store recorded at upload: S3 metadata `x-amz-meta-sha256`, the
   filesystem store's sidecar `manifest.json.sha256`;
3. the store's own checksum when it has one (S3 `ChecksumSHA256`).

Time: the capture must not end after the manifest object was written (beyond `CLOCK_SKEW`).
When no staging receipt vouches for the manifest, the capture must also not end more than
`UPLOAD_MARGIN` before the object was written: a back-dated manifest stored with forged
metadata still carries a fresh object timestamp. A set uploaded late (offsite was down for
days) is vouched for by its receipt while it is on staging; once staging has pruned it,
such a set shows as suspect and must be checked by hand.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from erp_backup.manifest import MANIFEST_NAME, Manifest, ManifestError, sha256_file
from erp_backup.sets import BackupSet, SetState

log = logging.getLogger(__name__)

CLOCK_SKEW = timedelta(minutes=5)
UPLOAD_MARGIN = timedelta(days=2)


class TrustedStore(Protocol):
    """What the check needs from an offsite store (erp_backup.offsite implements it)."""

    description: str

    def list_backup_ids(self, service: str, backup_type: str) -> list[str]: ...

    def manifest_object(self, service: str, backup_type: str, backup_id: str) -> Any: ...


@dataclass(frozen=True)
class Receipt:
    """Staging's word on what was uploaded: the manifest's SHA-256 and when the copy was verified."""

    manifest_sha256: str
    verified_at: str


@dataclass(frozen=True)
class OffsiteSetCheck:
    """One offsite set: its state, its manifest when one could be read, and why it is not OFFSITE."""

    service: str
    backup_type: str
    backup_id: str
    state: SetState
    manifest: Manifest | None = None
    problems: tuple[str, ...] = ()
    vouched_by: str = ""  # "staging receipt" or "store record" when OFFSITE
    manifest_missing: bool = False  # SUSPECT because the manifest is gone, not because it changed

    @property
    def key(self) -> str:
        return f"{self.service}/{self.backup_type}/{self.backup_id}"

    @property
    def captured_at(self) -> datetime | None:
        return None if self.manifest is None else _aware(self.manifest.captured_finished_at)

    @property
    def why(self) -> str:
        return "; ".join(self.problems)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def staging_receipt(staging_root: Path | None, service: str, backup_type: str, backup_id: str,
                    description: str) -> Receipt | None:
    """The receipt staging holds for this set and this store; None when there is none to use."""
    if staging_root is None:
        return None
    backup_set = BackupSet(staging_root, service, backup_type, backup_id)
    try:
        receipt = backup_set.offsite_receipt()
        if not isinstance(receipt, dict) or receipt.get("description", description) != description:
            return None  # none, or a receipt for another store
        expected = receipt.get("manifest_sha256") or sha256_file(backup_set.manifest_path)[1]
    except (OSError, ValueError) as exc:
        log.warning("offsite check: %s: unreadable receipt or manifest on staging, not used: %s", backup_set.key, exc)
        return None
    return Receipt(str(expected), str(receipt.get("verified_at") or "an unrecorded time"))


def digest_problems(digest: str, stored: Any, receipt: Receipt | None) -> list[str]:
    """Why a manifest with SHA-256 `digest` is not the one recorded at upload; empty when it is."""
    references = [
        ("staging's offsite receipt", receipt.manifest_sha256 if receipt else None),
        ("the SHA-256 recorded with it at upload", stored.recorded_sha256),
        ("the store's own checksum", stored.store_sha256),
    ]
    problems = [
        f"{MANIFEST_NAME} offsite has SHA-256 {digest}, but {name} says {expected}: it changed after upload"
        for name, expected in references if expected is not None and expected != digest
    ]
    if receipt is None and stored.recorded_sha256 is None:
        problems.append(
            f"no SHA-256 was recorded for {MANIFEST_NAME} at upload (no staging receipt, no stored record), "
            "so it cannot be told from an edited one"
        )
    return problems


def time_problems(manifest: Manifest, written_at: datetime, *, vouched_by_receipt: bool) -> list[str]:
    """Why the manifest's capture times disagree with when its object was written; empty when they agree."""
    started, finished = _aware(manifest.captured_started_at), _aware(manifest.captured_finished_at)
    written_at = _aware(written_at)
    problems = []
    if started > finished:
        problems.append(f"capture starts ({started.isoformat()}) after it ends ({finished.isoformat()})")
    if finished > written_at + CLOCK_SKEW:
        problems.append(
            f"capture ended {finished.isoformat()}, after its manifest object was written "
            f"({written_at.isoformat()}): the manifest was edited after upload"
        )
    elif not vouched_by_receipt and written_at - finished > UPLOAD_MARGIN:
        problems.append(
            f"capture ended {finished.isoformat()}, {written_at - finished} before its manifest object was written "
            f"({written_at.isoformat()}), more than the {UPLOAD_MARGIN.days}-day upload margin, and no staging "
            "receipt vouches for a late upload: back-dated?"
        )
    return problems


def check_offsite_set(store: TrustedStore, service: str, backup_type: str, backup_id: str,
                      staging_root: Path | None) -> OffsiteSetCheck:
    """Check one offsite set's manifest against its upload record. Raises what the store raises."""
    ids = (service, backup_type, backup_id)
    receipt = staging_receipt(staging_root, *ids, store.description)
    stored = store.manifest_object(*ids)
    if stored is None:
        if receipt is None:
            return OffsiteSetCheck(*ids, SetState.INCOMPLETE, problems=(
                f"no {MANIFEST_NAME} offsite: an interrupted upload or a partly deleted set",))
        return OffsiteSetCheck(*ids, SetState.SUSPECT, manifest_missing=True, problems=(
            f"{MANIFEST_NAME} is missing offsite, yet staging's receipt says the copy was verified at "
            f"{receipt.verified_at}: deleted by hand or by another deployment",))
    problems = digest_problems(hashlib.sha256(stored.data).hexdigest(), stored, receipt)
    try:
        manifest = Manifest.from_json(stored.data.decode("utf-8", errors="replace"),
                                      origin=f"{store.description} {'/'.join(ids)}/{MANIFEST_NAME}")
    except ManifestError as exc:
        if problems:
            return OffsiteSetCheck(*ids, SetState.SUSPECT, problems=(*problems, str(exc)))
        return OffsiteSetCheck(*ids, SetState.CORRUPT, problems=(str(exc),))
    if (manifest.service, manifest.backup_type, manifest.backup_id) != ids:
        problems.append(
            f"{MANIFEST_NAME} describes {manifest.service}/{manifest.backup_type}/{manifest.backup_id}: "
            "copied from another set"
        )
    problems += time_problems(manifest, stored.modified_at, vouched_by_receipt=receipt is not None)
    if problems:
        return OffsiteSetCheck(*ids, SetState.SUSPECT, manifest, tuple(problems))
    vouched_by = "staging receipt" if receipt is not None else "store record"
    return OffsiteSetCheck(*ids, SetState.OFFSITE, manifest, vouched_by=vouched_by)


def check_offsite_sets(store: TrustedStore, service: str, backup_type: str,
                       staging_root: Path | None) -> list[OffsiteSetCheck]:
    """Every offsite set of a type, checked, oldest id first. Logs each suspect set."""
    checks = [
        check_offsite_set(store, service, backup_type, backup_id, staging_root)
        for backup_id in sorted(store.list_backup_ids(service, backup_type))
    ]
    for check in checks:
        if check.state is SetState.SUSPECT:
            log.warning("offsite %s: %s is suspect: %s", store.description, check.key, check.why)
    return checks


def usable(checks: Iterable[OffsiteSetCheck]) -> list[OffsiteSetCheck]:
    """The checks whose set may be counted, restored or drilled."""
    return [check for check in checks if check.state is SetState.OFFSITE]
