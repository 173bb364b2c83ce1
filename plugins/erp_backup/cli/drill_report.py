"""`drill-report`: the DR drill ledger as a table (or JSON), read locally or offsite."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erp_backup.cli.console import Console, human_seconds, table
from erp_backup.cli.source import EXIT_OK, Failure, Source, open_source

LEDGER_KEY = "drills/ledger.jsonl"  # relative to the backup root and to the offsite root


_WHEN_KEYS = ("finished_at", "timestamp", "recorded_at", "ended_at", "started_at", "at", "time")
_STATUS_KEYS = ("status", "result", "outcome")
_MEASURED_KEYS = ("rto_measured_seconds", "measured_rto_seconds", "rto_seconds", "restore_seconds",
                  "duration_seconds", "seconds", "rto_measured")
_TARGET_KEYS = ("rto_target_seconds", "target_rto_seconds", "rto_target", "target_rto")


def _first(entry: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if entry.get(key) not in (None, ""):
            return entry[key]
    return None


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        try:
            if text and text[-1] in units:
                return float(text[:-1]) * units[text[-1]]
            return float(text)
        except ValueError:
            return None
    return None


def ledger_row(entry: dict[str, Any]) -> dict[str, Any]:
    """The report's view of one ledger entry, whatever keys the drill wrote (missing ones are None)."""
    rto: dict[str, Any] = entry["rto"] if isinstance(entry.get("rto"), dict) else {}
    measured = _seconds(_first(entry, _MEASURED_KEYS) or _first(rto, ("measured_seconds", "measured", "seconds")))
    target = _seconds(_first(entry, _TARGET_KEYS) or _first(rto, ("target_seconds", "target")))
    status = _first(entry, _STATUS_KEYS)
    if status is None and isinstance(entry.get("ok"), bool):
        status = "ok" if entry["ok"] else "failed"
    met = entry.get("rto_met", rto.get("met"))
    if not isinstance(met, bool):
        met = None if measured is None or target is None else measured <= target
    return {
        "when": _first(entry, _WHEN_KEYS),
        "service": entry.get("service"),
        "backup_type": entry.get("backup_type") or entry.get("type"),
        "backup_id": entry.get("backup_id"),
        "status": status,
        "rto_measured_seconds": measured,
        "rto_target_seconds": target,
        "rto_met": met,
    }


def parse_ledger(text: str, origin: str, console: Console) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            console.note(f"warning: {origin} line {number} is not JSON, skipped ({exc.msg})")
            continue
        if not isinstance(entry, dict):
            console.note(f"warning: {origin} line {number} is not a JSON object, skipped")
            continue
        entries.append(entry)
    return entries


def read_ledger(source: Source, work_dir: str | None) -> tuple[str, str]:
    """(text, origin) of the drill ledger at the source."""
    if source.is_local:
        path = source.root / LEDGER_KEY
        if not path.is_file():
            raise Failure(f"no DR drill ledger at {path}: no drill has been recorded there (or --root is wrong)")
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    from erp_backup.offsite import OFFSITE_FAILURES

    origin = f"{source.store.description}/{LEDGER_KEY}"
    with tempfile.TemporaryDirectory(prefix="erp-ledger-", dir=work_dir) as work:
        local = Path(work) / "ledger.jsonl"
        try:
            found = source.store.get_file(LEDGER_KEY, local)
        except OFFSITE_FAILURES as exc:
            raise Failure(f"reading the drill ledger {origin} failed: {exc}") from exc
        if not found:
            raise Failure(f"no DR drill ledger at {origin}: no drill has been recorded offsite")
        return local.read_text(encoding="utf-8", errors="replace"), origin


def cmd_drill_report(args: argparse.Namespace, console: Console) -> int:
    source = open_source(args)
    text, origin = read_ledger(source, args.work_dir)
    entries = parse_ledger(text, origin, console)
    if args.last:
        entries = entries[-args.last:]
    if args.json:
        console.say(json.dumps(entries, indent=2))
        return EXIT_OK
    if not entries:
        console.say(f"the drill ledger {origin} has no entries")
        return EXIT_OK
    rows = []
    for entry in entries:
        row = ledger_row(entry)
        met = {True: "yes", False: "NO", None: "-"}[row["rto_met"]]
        rows.append((
            str(row["when"] or "-"), str(row["service"] or "-"), str(row["backup_type"] or "-"),
            str(row["backup_id"] or "-"), str(row["status"] or "-"),
            f"{human_seconds(row['rto_measured_seconds'])} / {human_seconds(row['rto_target_seconds'])}", met,
        ))
    console.say(table(("WHEN", "SERVICE", "TYPE", "BACKUP_ID", "STATUS", "RTO MEASURED / TARGET", "RTO MET"), rows))
    console.note(f"{len(entries)} drill(s) from {origin}")
    return EXIT_OK

