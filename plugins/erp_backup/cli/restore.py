"""`restore`: a verified set into a target, through the service module's own restore verb.

The target comes from the service (`target_from_cli`); options come from the generic
flags (`--schema`, `--database`, `--jobs`, `-o KEY=VALUE`) and are checked against the
options the service's restore accepts (`RESTORE_OPTIONS`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from erp_backup.cli.console import Console
from erp_backup.cli.source import (
    EXIT_OK,
    Failure,
    UsageError,
    check_service_type,
    open_source,
    require_backup,
    staged_set,
)
from erp_backup.services import get_service
from erp_backup.services.base import CliTarget, RestoreReport, TargetUsageError, airflow_connection

# Service details worth a line in the text output, when a service reports them.
SUMMARY_KEYS = ("status", "tables_checked", "rows_checked", "keys_restored", "sampled_keys_matched", "imported",
                "rows", "objects", "verified", "data_dir", "prepared_dir", "runbook_command_text", "durations")
# Generic flags and the restore option each one sets.
FLAG_OPTIONS = {"schema": "schema", "database": "databases", "jobs": "jobs"}


def _parse_option(text: str) -> tuple[str, Any]:
    """`key=value`; the value is JSON when it parses (true, 3, ["a"]), else the plain string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def restore_target(service: str, backup_type: str, target: str | None, target_conn: str | None) -> CliTarget:
    """What the service's restore() takes, from --target / --target-conn."""
    try:
        return get_service(service).target_from_cli(backup_type, target, target_conn, airflow_connection)
    except (TargetUsageError, LookupError) as exc:
        raise UsageError(str(exc)) from exc


def restore_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options from the flags, refused when the service's restore does not take them."""
    options: dict[str, Any] = {}
    given: dict[str, str] = {}  # option -> the flag that set it, for the error message
    for flag, option in FLAG_OPTIONS.items():
        value = getattr(args, flag)
        if value not in (None, []):
            options[option], given[option] = value, f"--{flag}"
    for option, value in args.option or ():
        options[option], given[option] = value, f"-o {option}"
    accepted = get_service(args.service).RESTORE_OPTIONS
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UsageError(f"{', '.join(given[name] for name in unknown)}: not an option of {args.service} "
                         f"{args.type} restores (its options: {', '.join(sorted(accepted)) or 'none'})")
    return options


def _check_restorable(service: str, backup_type: str) -> None:
    module = get_service(service)
    if backup_type in module.RESTORE_TYPES:
        return
    hint = (" For a point-in-time restore from these sets, use "
            "`include/scripts/pitr_restore.sh --target-time ...`." if backup_type in module.PITR_TYPES else "")
    raise UsageError(f"the {service} module cannot restore {backup_type!r} backups alone "
                     f"(restorable: {', '.join(sorted(module.RESTORE_TYPES))}).{hint}")


def _print_report(console: Console, report: RestoreReport) -> None:
    for action in report.actions:
        console.say(f"  - {action}")
    for check in report.checks:
        console.say(f"  ✓ {check}")
    for problem in report.problems:
        console.say(f"  ✗ {problem}")
    for key in SUMMARY_KEYS:
        value = report.details.get(key)
        if value not in (None, "", {}, []):
            console.say(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if report.restored_bytes:
        console.say(f"  restored_bytes: {report.restored_bytes}")


def cmd_restore(args: argparse.Namespace, console: Console) -> int:
    source = open_source(args)
    check_service_type(args.service, args.type)
    _check_restorable(args.service, args.type)
    chosen = restore_target(args.service, args.type, args.target, args.target_conn)
    options = restore_options(args)
    require_backup(source, args.service, args.type, args.backup_id)
    key = f"{args.service}/{args.type}/{args.backup_id}"
    module = get_service(args.service)

    with staged_set(args, source, console) as (set_dir, manifest):
        console.note(f"restoring {key} into {chosen.description}{' (dry run)' if args.dry_run else ''}")
        console.progress(f"restoring {key} (-v shows each step)")
        try:
            report = module.restore(set_dir, manifest, chosen.target, dry_run=args.dry_run, options=options)
        except Exception as exc:
            console.clear()
            raise Failure(f"restore of {key} into {chosen.description} failed: {type(exc).__name__}: {exc}") from exc
        console.clear()
    if args.json:
        console.say(json.dumps({"backup": key, "target": chosen.description, **report.as_dict()}, indent=2, default=str))
    elif args.dry_run:
        console.say(f"DRY RUN: nothing was changed. Restoring {key} into {chosen.description} would:")
        _print_report(console, report)
    elif report.problems:
        _print_report(console, report)
    else:
        console.say(f"OK: restored {key} into {chosen.description}")
        _print_report(console, report)
    if report.problems:
        raise Failure(f"restored {key} into {chosen.description}, but it does not match the manifest: "
                      + "; ".join(report.problems[:5]))
    return EXIT_OK
