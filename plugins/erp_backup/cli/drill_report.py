"""`drill-report`: the DR drill ledger as a table (or JSON), read locally or offsite."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from erp_backup.cli.console import Console, human_seconds, table
from erp_backup.cli.source import EXIT_OK, Failure, Source, open_source
from erp_backup.drill import ledger
from erp_backup.drill.ledger import LEDGER_KEY, DrillLedgerEntry


def parse_ledger(text: str, origin: str, console: Console) -> list[DrillLedgerEntry]:
    return ledger.parse(text, lambda number, why: console.note(f"warning: {origin} line {number} {why}, skipped"))


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
        console.say(json.dumps([entry.as_dict() for entry in entries], indent=2))
        return EXIT_OK
    if not entries:
        console.say(f"the drill ledger {origin} has no entries")
        return EXIT_OK
    rows = [(
        entry.finished_at.isoformat(), entry.service, entry.backup_type or "-", entry.backup_id or "-",
        entry.status + (f" at {entry.failed_step}" if entry.failed_step else ""),
        f"{human_seconds(entry.rto_measured_s)} / {human_seconds(entry.rto_extrapolated_s)} / {human_seconds(entry.rto_target_s)}",
        {True: "yes", False: "NO", None: "-"}[entry.rto_met],
    ) for entry in entries]
    console.say(table(("WHEN", "SERVICE", "TYPE", "BACKUP_ID", "STATUS", "RTO MEASURED / EXTRAPOLATED / TARGET", "RTO MET"),
                      rows))
    console.note(f"{len(entries)} drill(s) from {origin}")
    return EXIT_OK
