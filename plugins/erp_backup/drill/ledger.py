"""The drill ledger's one schema: `DrillLedgerEntry`, one JSON line per drilled (or undrillable) set.

Written by the drill's report step (`$BACKUP_ROOT/drills/ledger.jsonl` and `drills/ledger.jsonl`
offsite, append-only, a run's lines never twice) and read by the drill's pick, the CLI's
`drill-report`, the Backups page and the watchdog. Nothing here imports Airflow.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from erp_backup.manifest import write_atomic

log = logging.getLogger(__name__)

LEDGER_KEY = "drills/ledger.jsonl"  # relative to the backup root and to the offsite root
PASSED = frozenset({"passed", "prepared"})


class LedgerFormatError(ValueError):
    """A ledger line lacks a required field or has one of the wrong type."""


@dataclass(frozen=True)
class DrillLedgerEntry:
    run_id: str
    finished_at: datetime
    service: str
    status: str  # passed, prepared (fetched and checked, not restored) or failed
    backup_type: str | None = None  # None when no set could be picked
    backup_id: str | None = None
    captured_at: datetime | None = None
    failed_step: str | None = None
    error: str | None = None
    source: str | None = None
    backend: str | None = None
    seed: int | None = None
    rto_measured_s: float | None = None
    rto_extrapolated_s: float | None = None
    rto_target_s: float | None = None
    kind: str = "drill"  # "drill" (the weekly one-set drill) or "estate" (a whole-estate recovery)
    details: dict[str, Any] = field(default_factory=dict)  # kind-specific, e.g. the estate's T and skew

    @property
    def key(self) -> tuple[str, str, str | None, str | None]:
        return self.run_id, self.service, self.backup_type, self.backup_id

    @property
    def set_name(self) -> str | None:
        """`<type>/<id>`, or None when no set was picked."""
        return f"{self.backup_type}/{self.backup_id}" if self.backup_type and self.backup_id else None

    @property
    def rto_met(self) -> bool | None:
        """Whether the extrapolated (else the measured) RTO is within the target; None if either is unknown."""
        rto = self.rto_extrapolated_s if self.rto_extrapolated_s is not None else self.rto_measured_s
        return None if rto is None or self.rto_target_s is None else rto <= self.rto_target_s

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["finished_at"] = self.finished_at.isoformat()
        data["captured_at"] = self.captured_at.isoformat() if self.captured_at else None
        return data

    def to_line(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DrillLedgerEntry:
        missing = [name for name in ("run_id", "finished_at", "service", "status") if not data.get(name)]
        if missing:
            raise LedgerFormatError(f"missing {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        try:
            values["finished_at"] = datetime.fromisoformat(str(data["finished_at"]))
            values["captured_at"] = datetime.fromisoformat(str(data["captured_at"])) if data.get("captured_at") else None
            for name in ("rto_measured_s", "rto_extrapolated_s", "rto_target_s"):
                values[name] = None if data.get(name) is None else float(data[name])
        except (TypeError, ValueError) as exc:
            raise LedgerFormatError(str(exc)) from None
        return cls(**values)


def _warn(number: int, why: str) -> None:
    log.warning("drill ledger line %d %s; skipped", number, why)


def parse(text: str, on_bad_line: Callable[[int, str], None] = _warn) -> list[DrillLedgerEntry]:
    """The entries of a ledger's text, in file order; a bad line is reported and skipped."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            on_bad_line(number, "is not JSON")
            continue
        if not isinstance(data, dict):
            on_bad_line(number, "is not a JSON object")
            continue
        try:
            entries.append(DrillLedgerEntry.from_dict(data))
        except LedgerFormatError as exc:
            on_bad_line(number, f"is not a ledger entry ({exc})")
    return entries


def merge(existing: str, new: Iterable[DrillLedgerEntry]) -> tuple[str, int]:
    """`existing` plus the entries of `new` it lacks (same run, service, type and backup), and how many were added."""
    have = {entry.key for entry in parse(existing, lambda *_: None)}
    added = []
    for entry in new:
        if entry.key not in have:
            have.add(entry.key)
            added.append(entry)
    text = existing if not existing or existing.endswith("\n") else existing + "\n"
    return text + "".join(entry.to_line() for entry in added), len(added)


def append(path: Path, entries: Iterable[DrillLedgerEntry]) -> int:
    """Append entries to a ledger file (created 0700/0600), atomically; returns how many were new."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text, added = merge(path.read_text() if path.is_file() else "", entries)
    write_atomic(path, text.encode())
    return added


def deduplicated(entries: Iterable[DrillLedgerEntry]) -> list[DrillLedgerEntry]:
    seen: set[tuple[str, str, str | None, str | None]] = set()
    kept = []
    for entry in entries:
        if entry.key not in seen:
            seen.add(entry.key)
            kept.append(entry)
    return kept


def latest_by_service(entries: Iterable[DrillLedgerEntry]) -> dict[str, DrillLedgerEntry]:
    """Each service's most recently finished entry."""
    latest: dict[str, DrillLedgerEntry] = {}
    for entry in entries:
        if entry.service not in latest or entry.finished_at >= latest[entry.service].finished_at:
            latest[entry.service] = entry
    return latest


def last_drill_lines(entries: Iterable[DrillLedgerEntry]) -> list[str]:
    """One line per service: its last drill, the set, the result and the RTO against the target."""
    lines = []
    for service, entry in sorted(latest_by_service(entries).items()):
        rto = entry.rto_extrapolated_s if entry.rto_extrapolated_s is not None else entry.rto_measured_s
        verdict = {True: "within", False: "OVER", None: "no RTO against"}[entry.rto_met]
        rto_text = f", RTO {rto:.1f} s {verdict} the target" if rto is not None else ""
        target = f" {entry.rto_target_s:.0f} s" if rto is not None and entry.rto_target_s is not None else ""
        lines.append(f"{service}: {entry.status} {entry.finished_at.isoformat()} ({entry.set_name or 'no set'})"
                     f"{rto_text}{target}")
    return lines
