"""WAL file names and LSN arithmetic: segments, timelines, history files. Pure.

Used by the `wal` and `snapshot` backups, chain retention and point-in-time recovery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024

_SEGMENT = re.compile(r"^[0-9A-F]{24}$")
HISTORY_NAME = re.compile(r"^([0-9A-F]{8})\.history$")
_BACKUP_LABEL = re.compile(r"^([0-9A-F]{24})\.[0-9A-F]{8}\.backup$")
_PARTIAL = re.compile(r"^([0-9A-F]{24})\.partial$")
_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    match = _LSN.match(text.strip())
    if not match:
        raise ValueError(f"not an LSN: {text!r} (expected e.g. 0/3000028)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _segments_per_xlogid(segment_size: int) -> int:
    if segment_size <= 0 or segment_size & (segment_size - 1) or not (1 << 20) <= segment_size <= (1 << 30):
        raise ValueError(f"invalid WAL segment size {segment_size}: must be a power of two from 1 MB to 1 GB")
    return 0x100000000 // segment_size


@dataclass(frozen=True)
class Segment:
    """One WAL segment: timeline + segment number (position = segno * size)."""

    timeline: int
    segno: int
    size: int = DEFAULT_SEGMENT_SIZE

    @classmethod
    def parse(cls, name: str, size: int = DEFAULT_SEGMENT_SIZE) -> Segment:
        if not _SEGMENT.match(name):
            raise ValueError(f"not a WAL segment name: {name!r} (24 hex digits TTTTTTTTXXXXXXXXYYYYYYYY)")
        per_id = _segments_per_xlogid(size)
        low = int(name[16:24], 16)
        if low >= per_id:
            raise ValueError(f"{name}: segment part {name[16:24]} is out of range for {size}-byte segments")
        return cls(int(name[0:8], 16), int(name[8:16], 16) * per_id + low, size)

    @classmethod
    def of_lsn(cls, lsn: int, timeline: int, size: int = DEFAULT_SEGMENT_SIZE) -> Segment:
        return cls(timeline, lsn // size, size)

    @property
    def name(self) -> str:
        per_id = _segments_per_xlogid(self.size)
        return f"{self.timeline:08X}{self.segno // per_id:08X}{self.segno % per_id:08X}"

    @property
    def start_lsn(self) -> int:
        return self.segno * self.size

    @property
    def end_lsn(self) -> int:
        return (self.segno + 1) * self.size

    def on(self, timeline: int, segno: int) -> Segment:
        return Segment(timeline, segno, self.size)

    def __str__(self) -> str:
        return self.name


def wal_file_kind(name: str) -> str | None:
    """'segment', 'history', 'backup' (backup history file), 'partial', or None for anything else."""
    if _SEGMENT.match(name):
        return "segment"
    if HISTORY_NAME.match(name):
        return "history"
    if _BACKUP_LABEL.match(name):
        return "backup"
    if _PARTIAL.match(name):
        return "partial"
    return None


def segment_part(name: str) -> str | None:
    """The 24-hex segment a WAL file belongs to (segments, .backup and .partial files)."""
    for pattern in (_SEGMENT, _BACKUP_LABEL, _PARTIAL):
        match = pattern.match(name)
        if match:
            return name[:24]
    return None


def parse_history(text: str) -> list[tuple[int, int]]:
    """A timeline history file: [(parent timeline, switch LSN)], oldest first."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise ValueError(f"malformed timeline history line: {line!r}")
        entries.append((int(parts[0]), parse_lsn(parts[1])))
    return entries
