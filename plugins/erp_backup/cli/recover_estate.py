"""`recover-estate --at T`: restore every enabled service from offsite into scratch targets as of T, and check references."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from erp_backup.cli.console import Console
from erp_backup.cli.source import EXIT_FAILED, EXIT_OK, UsageError
from erp_backup.plan import load_plan


def parse_at(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--at {text!r}: not an ISO time; give e.g. 2026-11-26T10:15:00+09:00") from None
    if moment.tzinfo is None:
        raise UsageError(f"--at {text!r} has no timezone; give one, e.g. 2026-11-26T10:15:00+09:00")
    return moment


def _dry_run_text(plan: dict) -> str:
    lines = [f"Plan of sets to recover the estate to {plan['at']}"
             + (" (PARTIAL)" if plan["partial"] else "") + ":",
             "order: " + " → ".join("[" + ", ".join(layer) + "]" for layer in plan["order"])]
    for name, service in plan["services"].items():
        sets = ", ".join(f"{s['backup_type']}/{s['backup_id']} (captured {s['captured_at']})" for s in service["sets"])
        how = " by PITR to --at" if service["pitr"] else ""
        lines.append(f"  {name}{how}: {sets}")
    lines += [f"  {name}: NOT RECOVERED: {why}" for name, why in plan["missing"].items()]
    return "\n".join(lines)


def cmd_recover_estate(args: argparse.Namespace, console: Console) -> int:
    from erp_backup import crypto
    from erp_backup.estate.choose import EstateRefused
    from erp_backup.estate.report import render_markdown
    from erp_backup.estate.run import recover_estate

    at = parse_at(args.at)
    plan = load_plan(args.plan)
    run_id = args.run_id or f"manual__{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    try:
        identity = getattr(args, "identity", None)
        report = recover_estate(plan, at, run_id=run_id, allow_partial=args.allow_partial, dry_run=args.dry_run,
                                keep_scratch=args.keep_scratch, backend=args.backend,
                                identities=(lambda: crypto.identities_from_file(identity)) if identity else None)
    except EstateRefused as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        console.say(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        console.say(_dry_run_text(report) if args.dry_run else render_markdown(report))
    return EXIT_OK if args.dry_run or report["status"] == "passed" else EXIT_FAILED


def add_recover_estate(commands: Any, common: argparse.ArgumentParser) -> None:
    """The `recover-estate` subcommand's arguments."""
    estate = commands.add_parser("recover-estate", parents=[common],
                                 help="restore every enabled service from offsite into scratch targets as of one time")
    estate.add_argument("--at", required=True, help="the time to recover to, ISO with a timezone (2026-11-26T10:15:00+09:00)")
    estate.add_argument("--dry-run", action="store_true", help="print the plan of sets only; restore nothing")
    estate.add_argument("--allow-partial", action="store_true",
                        help="recover the other services when one has no set at or before --at (the report says so)")
    estate.add_argument("--keep-scratch", action="store_true", help="leave the scratch targets running")
    estate.add_argument("--backend", choices=("local", "docker"),
                        help="where the scratch targets run (default: the plan's drill.backend); with docker, a service "
                             "that cannot run in a container (PITR, no image) stays local and the report says why")
    estate.add_argument("--run-id", help="name of this recovery (default: manual__<now>)")
    estate.set_defaults(handler=cmd_recover_estate)
