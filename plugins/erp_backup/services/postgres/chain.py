"""Chain-aware retention for PostgreSQL base backups and WAL sets.

Owns the `protected` mappings the generic policy (`erp_backup.retention.decide`)
takes for `postgres/wal` and `postgres/snapshot`. The rules (docs/pitr.md):

- WAL is kept for its retention window (7 days) by the generic policy.
- Every retained base keeps the WAL from its start segment to its end segment
  (what it needs to become consistent).
- The anchor, the newest base consistent at or before the WAL window start, is
  kept until a newer base is that old too, and all WAL from its start segment
  forward is kept: from it, any point in the window can be reached.
- Bases consistent inside the WAL window are kept (only matters if the base
  retention were ever shorter than the WAL retention).

Segments are compared by position (segment number), whatever their timeline:
after a timeline switch this can keep a few orphaned sets longer, never fewer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from erp_backup.manifest import Manifest, ManifestError
from erp_backup.services.postgres.segments import DEFAULT_SEGMENT_SIZE, Segment, wal_file_kind
from erp_backup.services.postgres.wal import SERVICE, usable_sets

WAL_TYPE = "wal"
SNAPSHOT_TYPE = "snapshot"


@dataclass(frozen=True)
class WalSetInfo:
    backup_id: str
    first: Segment | None  # lowest position shipped (None: no segments)
    last: Segment | None  # highest position shipped
    history_timelines: frozenset[int] = field(default_factory=frozenset)  # timelines whose .history it holds

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> WalSetInfo:
        details = manifest.details
        size = int(details.get("wal_segment_size", DEFAULT_SEGMENT_SIZE))
        records = details.get("wal", [])
        segments = [Segment.parse(r["name"], size) for r in records if r.get("kind") == "segment"]
        histories = frozenset(int(r["name"][:8], 16) for r in records if wal_file_kind(r["name"]) == "history")
        return cls(
            manifest.backup_id,
            min(segments, key=lambda s: s.segno, default=None),
            max(segments, key=lambda s: s.segno, default=None),
            histories,
        )


@dataclass(frozen=True)
class BaseInfo:
    backup_id: str
    start: Segment  # first segment it needs (backup start)
    end: Segment  # last segment it needs to be consistent
    consistent_at: datetime  # when the backup finished: the earliest point it restores to

    @property
    def timeline(self) -> int:
        return self.start.timeline

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> BaseInfo:
        details = manifest.details
        size = int(details.get("wal_segment_size", DEFAULT_SEGMENT_SIZE))
        finished = datetime.fromisoformat(details["backup_end_time"]) if details.get("backup_end_time") else manifest.captured_finished_at
        return cls(
            manifest.backup_id,
            Segment.parse(details["start_segment"], size),
            Segment.parse(details["end_segment"], size),
            finished if finished.tzinfo else finished.replace(tzinfo=UTC),
        )


def anchor_base(bases: Iterable[BaseInfo], window_start: datetime) -> BaseInfo | None:
    """The newest base consistent at or before the WAL window start."""
    eligible = [b for b in bases if b.consistent_at <= window_start]
    return max(eligible, key=lambda b: (b.consistent_at, b.backup_id), default=None)


def protected_bases(bases: Iterable[BaseInfo], now: datetime, wal_retention: timedelta) -> dict[str, str]:
    """Base backups to keep whatever their age: the anchor of the WAL window, and every base inside it."""
    bases = list(bases)
    window_start = now - wal_retention
    protected = {
        b.backup_id: f"consistent inside the WAL window (after {window_start.isoformat()}): a starting point for PITR into it"
        for b in bases
        if b.consistent_at > window_start
    }
    anchor = anchor_base(bases, window_start)
    if anchor is not None:
        protected[anchor.backup_id] = (
            f"newest base backup consistent at or before the WAL window start ({window_start.isoformat()}): "
            f"point-in-time recovery into the last {_days(wal_retention)} starts from it; "
            f"kept until a newer base is that old"
        )
    return protected


def _days(delta: timedelta) -> str:
    days = delta.total_seconds() / 86400
    return f"{days:g} days"


def protected_wal_sets(
    wal_sets: Iterable[WalSetInfo],
    bases: Iterable[BaseInfo],
    now: datetime,
    wal_retention: timedelta,
) -> dict[str, str]:
    """WAL sets to keep whatever their age, with the reason. `bases` are the retained bases."""
    bases = list(bases)
    wal_sets = list(wal_sets)
    anchor = anchor_base(bases, now - wal_retention)
    ranges: list[tuple[int, float, str]] = [
        (b.start.segno, b.end.segno, f"holds WAL {b.start.name}..{b.end.name} that base {b.backup_id} needs to be consistent")
        for b in bases
    ]
    if anchor is not None:
        ranges.append(
            (
                anchor.start.segno,
                float("inf"),
                f"WAL from {anchor.start.name} forward rolls anchor base {anchor.backup_id} "
                f"(newest base before the WAL window) to any point in the window",
            )
        )
    protected: dict[str, str] = {}
    for wal_set in wal_sets:
        if wal_set.first is None or wal_set.last is None:
            continue
        for low, high, reason in ranges:
            if wal_set.first.segno <= high and wal_set.last.segno >= low:
                protected[wal_set.backup_id] = reason
                break
    needed_timelines = {b.timeline for b in bases}
    needed_timelines |= {s.last.timeline for s in wal_sets if s.backup_id in protected and s.last is not None}
    newest_needed = max(needed_timelines, default=0)
    for wal_set in wal_sets:
        kept = sorted(t for t in wal_set.history_timelines if t <= newest_needed)
        if wal_set.backup_id not in protected and kept:
            protected[wal_set.backup_id] = (
                f"holds the history file of timeline {kept[-1]}, which recovery of a retained base or WAL needs"
            )
    return protected


# --- gathering from staging and offsite --------------------------------------------------------


class ManifestSource(Protocol):
    """What chain protection reads offsite (the retention module's Offsite satisfies it)."""

    def list_backup_ids(self, service: str, backup_type: str) -> list[str]: ...

    def read_manifest(self, service: str, backup_type: str, backup_id: str) -> Manifest | None: ...


def _manifests(root: Path, backup_type: str, offsite: ManifestSource | None) -> dict[str, Manifest]:
    found = {s.backup_id: m for s, m in usable_sets(root, backup_type)}
    if offsite is not None:
        for backup_id in offsite.list_backup_ids(SERVICE, backup_type):
            if backup_id in found:
                continue
            try:
                manifest = offsite.read_manifest(SERVICE, backup_type, backup_id)
            except ManifestError:
                continue
            if manifest is not None:
                found[backup_id] = manifest
    return found


def chain_infos(root: Path, offsite: ManifestSource | None = None) -> tuple[list[WalSetInfo], list[BaseInfo]]:
    """WAL set and base infos from staging plus offsite (a set on either side counts)."""
    wal = [WalSetInfo.from_manifest(m) for m in _manifests(root, WAL_TYPE, offsite).values()]
    bases = []
    for manifest in _manifests(root, SNAPSHOT_TYPE, offsite).values():
        try:
            bases.append(BaseInfo.from_manifest(manifest))
        except (KeyError, ValueError):
            continue
    return wal, bases


def chain_protection(
    root: Path,
    now: datetime,
    wal_retention: timedelta,
    offsite: ManifestSource | None = None,
) -> dict[str, Mapping[str, str]]:
    """The `protected` argument for each backup type: {"wal": {...}, "snapshot": {...}}.

    Every base that still exists counts as retained, so WAL is freed only once
    its base is really gone.
    """
    wal, bases = chain_infos(root, offsite)
    return {
        WAL_TYPE: protected_wal_sets(wal, bases, now, wal_retention),
        SNAPSHOT_TYPE: protected_bases(bases, now, wal_retention),
    }
