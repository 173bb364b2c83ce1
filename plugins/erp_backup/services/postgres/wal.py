"""PostgreSQL WAL shipping: the 6-hourly `wal` backup type and the local WAL archive.

Owns: the local WAL archive written by `include/scripts/archive_wal.sh` (and its
`archive.log`), the continuity check (gap detection across sets and timelines),
and the `wal` backup set: every file archived in the run's window [start, end),
by its archive.log time, compressed with zstd as `wal/<name>.zst`. WAL names and
LSNs are in ``segments.py``; the `pg_stat_archiver` check is in ``archiver.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import zstandard

from erp_backup.crypto import set_recipients
from erp_backup.manifest import FileEntry, Manifest, ManifestError
from erp_backup.runs import utcnow
from erp_backup.services.base import BackupContext, BackupOutcome
from erp_backup.services.postgres.archiver import archiver_findings, failed_count_growth, read_archiver_status
from erp_backup.services.postgres.segments import (
    DEFAULT_SEGMENT_SIZE,
    HISTORY_NAME,
    Segment,
    format_lsn,
    parse_history,
    wal_file_kind,
)
from erp_backup.sets import BackupSet, SetState, list_sets
from erp_backup.stream import stream_to_file

log = logging.getLogger(__name__)

SERVICE = "postgres"
BACKUP_TYPE = "wal"
ARCHIVE_DIR = (SERVICE, "wal_archive")
ARCHIVE_LOG = "archive.log"
SEALED_SUFFIX = "zst.age"  # archive_wal.sh's sealed form: zstd, then age
SEALABLE_KINDS = ("segment", "partial")  # history and backup-label files hold no table data and stay clear
SET_SUBDIR = "wal"
DEFAULT_ARCHIVE_TIMEOUT = timedelta(seconds=60)
DEFAULT_ARCHIVE_MARGIN = timedelta(minutes=10)
READ_CHUNK = 1 << 20

_DURATION = re.compile(r"^(\d+)\s*(s|m|h|d|min)?$")


class WalBackupError(RuntimeError):
    """The WAL backup cannot be made as asked (bad archive, window not closed...)."""


class WalGapError(WalBackupError):
    """The WAL sequence has a hole. The message names the missing file(s)."""


class ArchiverError(WalBackupError):
    """pg_stat_archiver shows archiving is failing or stale."""


# --- the local archive -------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchivedFile:
    """One archive.log line: when archive_wal.sh made the file durable, and its content hash.

    `sha256` and `size` are always of the WAL file itself. A sealed file (archive_wal.sh
    with ERP_WAL_RECIPIENTS_FILE) is stored as `<name>.zst.age`; `stored_sha256` and
    `stored_size` are of those stored bytes, the only ones a worker without a key can check.
    """

    name: str
    archived_at: datetime
    sha256: str
    size: int
    sealed: bool = False
    stored_sha256: str = ""
    stored_size: int = 0

    @property
    def stored_name(self) -> str:
        """The file's name in the archive directory."""
        return f"{self.name}.{SEALED_SUFFIX}" if self.sealed else self.name


def parse_archive_log(text: str, origin: str = ARCHIVE_LOG) -> list[ArchivedFile]:
    """Parse archive.log. The first line for a name wins; malformed lines are skipped with a warning."""
    seen: dict[str, ArchivedFile] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            when, name, digest, size, *stored = parts
            archived_at = datetime.fromisoformat(when.replace("Z", "+00:00"))
            if stored:
                form, stored_digest, stored_size = stored
                if form != SEALED_SUFFIX or len(stored_digest) != 64:
                    raise ValueError("bad stored form")
                entry = ArchivedFile(name, archived_at, digest, int(size), True, stored_digest, int(stored_size))
            else:
                entry = ArchivedFile(name, archived_at, digest, int(size))
            if entry.archived_at.tzinfo is None or len(digest) != 64 or wal_file_kind(name) is None:
                raise ValueError("bad field")
        except ValueError:
            log.warning("%s:%d: skipping malformed line %r", origin, number, line[:200])
            continue
        seen.setdefault(entry.name, entry)
    return list(seen.values())


def read_archive_log(archive_dir: Path) -> list[ArchivedFile]:
    path = archive_dir / ARCHIVE_LOG
    if not archive_dir.is_dir():
        raise WalBackupError(
            f"WAL archive directory {archive_dir} does not exist: check archive_command and the "
            f"postgres option wal_archive_dir (see docs/pitr.md)"
        )
    if not path.is_file():
        return []
    return parse_archive_log(path.read_text(encoding="utf-8", errors="replace"), origin=str(path))


def files_in_window(entries: list[ArchivedFile], start: datetime, end: datetime) -> list[ArchivedFile]:
    """Entries archived in [start, end), by name (so the set is the same whatever the log order)."""
    return sorted((e for e in entries if start <= e.archived_at < end), key=lambda e: e.name)


def segment_size_of(entries: list[ArchivedFile], default: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The WAL segment size: every segment file is exactly that long."""
    for entry in entries:
        if wal_file_kind(entry.name) == "segment":
            return entry.size
    return default


def timeline_switches(archive_dir: Path) -> dict[int, tuple[int, int]]:
    """For each timeline with an archived history file: (parent timeline, switch LSN)."""
    switches: dict[int, tuple[int, int]] = {}
    for path in archive_dir.glob("*.history"):
        match = HISTORY_NAME.match(path.name)
        if not match:
            continue
        try:
            entries = parse_history(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot read timeline history: %s", path, exc)
            continue
        if entries:
            switches[int(match.group(1), 16)] = entries[-1]
    return switches


# --- continuity --------------------------------------------------------------------------------


@dataclass
class Continuity:
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.problems


def check_continuity(
    previous_last: Segment | None,
    segments: list[Segment],
    switches: Mapping[int, tuple[int, int]],
) -> Continuity:
    """Find holes in a window's segments, continuing from the previous set's last segment.

    Within a timeline segment numbers must be consecutive. A window may overlap
    the previous set (manual runs), so only numbers past the last shipped one
    must be present. A newer timeline starts at the segment holding its switch
    point (from its .history file); its parent must reach the segment before.
    """
    result = Continuity()
    if not segments:
        return result
    size = segments[0].size
    last_seen: dict[int, int] = {}
    if previous_last is not None:
        last_seen[previous_last.timeline] = previous_last.segno

    def missing(timeline: int, first: int, stop: int) -> None:
        result.missing.extend(Segment(timeline, segno, size).name for segno in range(first, stop))

    by_timeline: dict[int, list[int]] = {}
    for segment in segments:
        by_timeline.setdefault(segment.timeline, []).append(segment.segno)
    for timeline in sorted(by_timeline):
        numbers = sorted(by_timeline[timeline])
        if timeline in last_seen:
            if numbers[0] > last_seen[timeline] + 1:
                missing(timeline, last_seen[timeline] + 1, numbers[0])
        elif timeline in switches:
            parent, switch_lsn = switches[timeline]
            first_on_timeline = switch_lsn // size
            if previous_last is not None and numbers[0] > first_on_timeline:
                missing(timeline, first_on_timeline, numbers[0])
            if parent in last_seen and last_seen[parent] < first_on_timeline - 1:
                missing(parent, last_seen[parent] + 1, first_on_timeline)
        elif previous_last is not None and timeline > previous_last.timeline:
            result.problems.append(
                f"timeline {timeline} starts at {Segment(timeline, numbers[0], size).name} but "
                f"{timeline:08X}.history is not in the archive"
            )
        for before, after in itertools.pairwise(numbers):
            if after > before + 1:
                missing(timeline, before + 1, after)
        last_seen[timeline] = max(numbers[-1], last_seen.get(timeline, -1))
    result.missing.sort()
    return result


def last_segment(segments: list[Segment]) -> Segment | None:
    """The head of the newest timeline: where the next set must continue."""
    return max(segments, key=lambda s: (s.timeline, s.segno), default=None)


# --- options -----------------------------------------------------------------------------------


def duration_option(options: Mapping[str, Any], key: str, default: timedelta) -> timedelta:
    """A duration option: seconds as a number, or '60s', '10m', '1h', '7d'."""
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value).strip())
    if not match:
        raise WalBackupError(f"postgres option {key}: invalid duration {value!r} (use e.g. 60s, 10m, 1h)")
    unit = {"s": "seconds", None: "seconds", "m": "minutes", "min": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


def archive_dir_for(root: Path, options: Mapping[str, Any]) -> Path:
    """The local WAL archive: option wal_archive_dir, else $ERP_WAL_ARCHIVE_DIR, else $BACKUP_ROOT/postgres/wal_archive."""
    configured = options.get("wal_archive_dir") or os.environ.get("ERP_WAL_ARCHIVE_DIR")
    return Path(configured) if configured else root.joinpath(*ARCHIVE_DIR)


# --- sets --------------------------------------------------------------------------------------


def usable_sets(root: Path, backup_type: str) -> list[tuple[BackupSet, Manifest]]:
    """Sets of a type that hold a readable manifest and are not marked corrupt, oldest id first."""
    found = []
    for backup_set in list_sets(root, SERVICE, backup_type):
        if backup_set.state in (SetState.INCOMPLETE, SetState.CORRUPT):
            continue
        try:
            found.append((backup_set, backup_set.manifest()))
        except ManifestError as exc:
            log.warning("skipping %s: %s", backup_set.key, exc)
    return found


def previous_chain_set(root: Path, before_id: str) -> tuple[str, Segment] | None:
    """The newest earlier WAL set that shipped segments: (its id, its last segment)."""
    for backup_set, manifest in reversed(usable_sets(root, BACKUP_TYPE)):
        if backup_set.backup_id >= before_id:
            continue
        last = manifest.details.get("last_segment")
        if last:
            size = int(manifest.details.get("wal_segment_size", DEFAULT_SEGMENT_SIZE))
            return backup_set.backup_id, Segment.parse(last, size)
    return None


def previous_archiver_record(root: Path, current_id: str) -> tuple[str, dict[str, Any]] | None:
    """The archiver status recorded by the most recently *captured* WAL set (not the previous window)."""
    best: tuple[datetime, str, dict[str, Any]] | None = None
    for backup_set, manifest in usable_sets(root, BACKUP_TYPE):
        record = manifest.details.get("archive_check", {}).get("archiver")
        if backup_set.backup_id == current_id or not record:
            continue
        captured = manifest.captured_finished_at
        if captured.tzinfo is None:
            captured = captured.replace(tzinfo=UTC)
        if best is None or captured > best[0]:
            best = (captured, backup_set.backup_id, record)
    return (best[1], best[2]) if best else None


# --- shipping ----------------------------------------------------------------------------------


def _read_chunks(path: Path, digest: Any) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
            yield chunk


def ship_file(entry: ArchivedFile, archive_dir: Path, set_dir: Path, level: int) -> tuple[FileEntry, dict[str, Any]]:
    """Copy one archived file into the set, checking its bytes against archive.log.

    A clear file is compressed on the way (`wal/<name>.zst`). A sealed one is already
    compressed and encrypted on the database host: it goes in as it is (`wal/<name>.zst.age`),
    checked against the stored bytes' hash, since this worker holds no key to open it.
    """
    source = archive_dir / entry.stored_name
    raw = hashlib.sha256()
    relative = f"{SET_SUBDIR}/{entry.stored_name}" if entry.sealed else f"{SET_SUBDIR}/{entry.name}.zst"
    result = stream_to_file(_read_chunks(source, raw), set_dir, relative, level=level, compress=not entry.sealed)
    expected = (entry.stored_sha256, entry.stored_size) if entry.sealed else (entry.sha256, entry.size)
    if (raw.hexdigest(), result.raw_bytes) != expected:
        (set_dir / relative).unlink(missing_ok=True)
        raise WalBackupError(
            f"{source}: content does not match its archive.log line (sha256 {raw.hexdigest()[:12]}… "
            f"size {result.raw_bytes}, logged {expected[0][:12]}… size {expected[1]}): the archived copy is damaged"
        )
    record = {
        "name": entry.name,
        "kind": wal_file_kind(entry.name),
        "archived_at": entry.archived_at.isoformat(),
        "raw_size": entry.size,
        "raw_sha256": entry.sha256,
        "file": relative,
    }
    if entry.sealed:
        record.update(sealed=SEALED_SUFFIX, sealed_sha256=entry.stored_sha256, sealed_size=entry.stored_size)
    return result.entry, record


def closed_window(ctx: BackupContext, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The run's window [start, end), which must have ended."""
    start, end = ctx.run.window(ctx.job.interval)
    now = now or utcnow()
    if start >= end:
        raise WalBackupError(f"{ctx.job.dag_id}: empty window [{start}, {end}): the plan needs interval: 6h for postgres wal")
    if end > now:
        raise WalBackupError(
            f"{ctx.job.dag_id}: window [{start.isoformat()}, {end.isoformat()}) has not closed yet "
            f"(now {now.isoformat()}); a run ships a window only after it ends"
        )
    return start, end


@dataclass(frozen=True)
class WindowFiles:
    """The archived files of one window, checked for continuity with the previous WAL set."""

    start: datetime
    end: datetime
    present: list[ArchivedFile]
    segments: list[Segment]
    segment_size: int
    previous: tuple[str, Segment] | None  # (WAL set id, its last segment)

    def continuity(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "previous_set": self.previous[0] if self.previous else None,
            "previous_last_segment": self.previous[1].name if self.previous else None,
            "checked_segments": len(self.segments),
        }


def window_files(root: Path, archive_dir: Path, backup_id: str, start: datetime, end: datetime) -> WindowFiles:
    """The files archived in [start, end); raise WalGapError on a hole or a file missing from the archive."""
    entries = read_archive_log(archive_dir)
    chosen = files_in_window(entries, start, end)
    size = segment_size_of(entries)
    absent = [e.name for e in chosen if not (archive_dir / e.stored_name).is_file()]
    present = [e for e in chosen if e.name not in absent]
    segments = [Segment.parse(e.name, size) for e in present if wal_file_kind(e.name) == "segment"]

    previous = previous_chain_set(root, backup_id)
    continuity = check_continuity(previous[1] if previous else None, segments, timeline_switches(archive_dir))
    missing = sorted(set(continuity.missing) | {n for n in absent if wal_file_kind(n) == "segment"})
    problems = list(continuity.problems)
    problems += [f"{name} is in archive.log but missing from {archive_dir}" for name in absent]
    if absent:
        problems.append(
            "if the local archive was pruned after shipping, this window's set is safe offsite: "
            "do not rerun windows older than the local archive keeps"
        )
    if missing:
        after = f" after {previous[1].name} (last segment of WAL set {previous[0]})" if previous else ""
        raise WalGapError(
            f"WAL gap in window [{start.isoformat()}, {end.isoformat()}){after}: missing {', '.join(missing)}. "
            f"PITR across the gap is impossible; take a new base backup (backup_postgres_snapshot) "
            f"and check the archive_command log. " + "; ".join(problems)
        )
    if problems:
        raise WalGapError(f"WAL archive problem in window [{start.isoformat()}, {end.isoformat()}): " + "; ".join(problems))
    return WindowFiles(start, end, present, segments, size, previous)


def check_archiver(ctx: BackupContext, archive_check: dict[str, Any], source: dict[str, Any],
                   tools: dict[str, str]) -> None:
    """Record pg_stat_archiver in `archive_check`; raise ArchiverError when archiving is unhealthy."""
    options = ctx.options
    conn_id = ctx.conn_id("source")
    conn = ctx.connection("source")
    status = read_archiver_status(conn, conn_id)
    prior = previous_archiver_record(ctx.backup_set.root, ctx.backup_set.backup_id)
    problems, warnings = archiver_findings(
        status,
        prior[1] if prior else None,
        duration_option(options, "archive_timeout", DEFAULT_ARCHIVE_TIMEOUT),
        duration_option(options, "archive_margin", DEFAULT_ARCHIVE_MARGIN),
    )
    archive_check["archiver"] = status.as_dict()
    archive_check["archiver_previous_set"] = prior[0] if prior else None
    archive_check["failed_count_grew_by"] = failed_count_growth(status, prior[1] if prior else None)
    archive_check["problems"], archive_check["warnings"] = problems, warnings
    source.update(conn_id=conn_id, host=conn.host, port=conn.port)
    tools["server"] = status.server_version
    if problems:
        raise ArchiverError(f"WAL archiving on {conn_id} ({conn.host}) is unhealthy: " + "; ".join(problems))
    for warning in warnings:
        log.warning("%s: %s", ctx.job.dag_id, warning)


def window_details(window: WindowFiles, shipped: list[dict[str, Any]], archive_check: dict[str, Any]) -> dict[str, Any]:
    """The manifest details of a WAL set."""
    segments, present = window.segments, window.present
    first = min(segments, key=lambda s: (s.segno, s.timeline), default=None)
    last = last_segment(segments)
    return {
        "window": {"start": window.start.isoformat(), "end": window.end.isoformat()},
        "wal_segment_size": window.segment_size,
        "segment_count": len(segments),
        "first_segment": first.name if first else None,
        "last_segment": last.name if last else None,
        "start_lsn": format_lsn(first.start_lsn) if first else None,
        "end_lsn": format_lsn(last.end_lsn) if last else None,
        "timeline": last.timeline if last else None,
        "timelines": sorted({s.timeline for s in segments}),
        "first_archived_at": min((e.archived_at.isoformat() for e in present), default=None),
        "last_archived_at": max((e.archived_at.isoformat() for e in present), default=None),
        "wal": shipped,
        "archive_check": archive_check,
    }


def backup(ctx: BackupContext, *, now: datetime | None = None) -> BackupOutcome:
    """Ship the WAL archived in the run's window; fail on a gap or an unhealthy archiver."""
    options = ctx.options
    archive_dir = archive_dir_for(ctx.backup_set.root, options)
    start, end = closed_window(ctx, now)
    window = window_files(ctx.backup_set.root, archive_dir, ctx.backup_set.backup_id, start, end)

    archive_check: dict[str, Any] = {"continuity": window.continuity(), "problems": [], "warnings": []}
    source: dict[str, Any] = {"archive_dir": str(archive_dir), "window_start": start.isoformat(), "window_end": end.isoformat()}
    tools: dict[str, str] = {"archive_command": "include/scripts/archive_wal.sh"}
    if options.get("check_archiver", True):
        check_archiver(ctx, archive_check, source, tools)
    clear = [e.name for e in window.present if not e.sealed and wal_file_kind(e.name) in SEALABLE_KINDS]
    if clear and set_recipients(ctx.set_dir):
        warning = (f"{len(clear)} WAL file(s) of this window lie in clear in {archive_dir} although the plan encrypts: "
                   f"set ERP_WAL_RECIPIENTS_FILE in the server's environment so archive_wal.sh seals them (docs/pitr.md)")
        log.warning("%s", warning)
        archive_check["warnings"].append(warning)
    archive_check["status"] = "warning" if archive_check["warnings"] else "ok"
    alerts = [w for w in archive_check["warnings"] if w.startswith("failed_count grew")]

    level = int(options.get("compress_level", 3))
    files: list[FileEntry] = []
    shipped: list[dict[str, Any]] = []
    for entry in window.present:
        file_entry, record = ship_file(entry, archive_dir, ctx.set_dir, level)
        files.append(file_entry)
        shipped.append(record)
    log.info("%s: shipped %d WAL file(s) archived in [%s, %s)", ctx.job.dag_id, len(files), start, end)
    return BackupOutcome(files=files, source=source, tools=tools, details=window_details(window, shipped, archive_check),
                         warnings=alerts)


def verify(backup_set: BackupSet, manifest: Manifest) -> list[str]:
    """Decompress every shipped file and check it against its recorded raw SHA-256 and size.

    A file sealed on the database host cannot be opened here (no key): its stored bytes are
    checked against the hash archive_wal.sh logged for them, and its logged raw size against
    the segment size. age's own authentication checks its content when it is restored.
    """
    problems = []
    size = int(manifest.details.get("wal_segment_size", DEFAULT_SEGMENT_SIZE))
    for record in manifest.details.get("wal", []):
        path = backup_set.path / record["file"]
        if record.get("sealed"):
            problem = _sealed_file_problem(path, record)
            count = int(record["raw_size"])
        else:
            problem, count = _clear_file_problem(path, record)
        if problem:
            problems.append(f"{backup_set.key}/{record['file']}: {problem}")
            continue
        if record["kind"] == "segment" and count != size:
            problems.append(f"{backup_set.key}/{record['file']}: {count} bytes, a WAL segment has {size}")
    segments = [Segment.parse(r["name"], size) for r in manifest.details.get("wal", []) if r["kind"] == "segment"]
    inner = check_continuity(None, segments, {})
    if inner.missing:
        problems.append(f"{backup_set.key}: segments missing inside the set: {', '.join(inner.missing)}")
    return problems


def _clear_file_problem(path: Path, record: Mapping[str, Any]) -> tuple[str | None, int]:
    digest = hashlib.sha256()
    count = 0
    try:
        with open(path, "rb") as handle, zstandard.ZstdDecompressor().stream_reader(handle) as reader:
            while chunk := reader.read(READ_CHUNK):
                digest.update(chunk)
                count += len(chunk)
    except (OSError, zstandard.ZstdError) as exc:
        return f"cannot decompress: {exc}", count
    if digest.hexdigest() != record["raw_sha256"] or count != record["raw_size"]:
        return f"decompressed content differs from the archived {record['name']}", count
    return None, count


def _sealed_file_problem(path: Path, record: Mapping[str, Any]) -> str | None:
    digest = hashlib.sha256()
    try:
        count = sum(len(chunk) for chunk in _read_chunks(path, digest))
    except OSError as exc:
        return f"cannot read: {exc}"
    if digest.hexdigest() != record["sealed_sha256"] or count != record["sealed_size"]:
        return f"differs from the sealed {record['name']} archive_wal.sh stored"
    return None


def prune_local_archive(
    root: Path,
    archive_dir: Path,
    now: datetime,
    keep: timedelta,
    *,
    dry_run: bool,
) -> list[str]:
    """Remove files from the local archive once an offsite-verified WAL set holds them and they are older than `keep`.

    History files are never removed (they are tiny and every later timeline needs them).
    archive.log is append-only and is not rewritten.
    """
    shipped: set[str] = set()
    for backup_set, manifest in usable_sets(root, BACKUP_TYPE):
        if backup_set.state is SetState.OFFSITE:
            shipped.update(record["name"] for record in manifest.details.get("wal", []))
    removed = []
    for entry in read_archive_log(archive_dir):
        path = archive_dir / entry.stored_name
        if entry.name not in shipped or wal_file_kind(entry.name) == "history" or not path.is_file():
            continue
        if now - entry.archived_at <= keep:
            continue
        verb = "would remove" if dry_run else "removing"
        log.info("WAL archive: %s %s (archived %s, in an offsite-verified WAL set)", verb, entry.name, entry.archived_at.isoformat())
        if not dry_run:
            path.unlink()
        removed.append(entry.name)
    return removed
