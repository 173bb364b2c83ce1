"""The restore CLI: list, verify and restore backup sets and read the DR drill ledger, with Airflow down.

    PYTHONPATH=plugins python -m erp_backup list|verify|restore|drill-report|recover-estate ...
    include/scripts/erp-restore ...            # the same, with the project's venv

Sets are read from local staging (``--from local``, the default: ``--root``, else
$ERP_BACKUP_ROOT, else the plan's ``backup_root``) or from the offsite store
(``--from offsite``, the plan's ``offsite`` block). Nothing here needs the Airflow
metadata DB, scheduler or API server: connections (the offsite store, a restore
target) come from ``AIRFLOW_CONN_<ID>`` environment variables (URI or JSON), which
Airflow's hooks resolve in a plain process without any DB. Local operations do not
import Airflow at all.

Exit codes: 0 ok; 1 a verification, fetch or restore failed (the message says what);
2 usage error or bad input (unknown service, type or backup id, bad target).

Each subcommand is a module with a plain function ``cmd_*(args, console) -> int``;
``main()`` parses the arguments and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import TextIO

from erp_backup.cli.console import Console
from erp_backup.cli.drill_report import cmd_drill_report
from erp_backup.cli.listing import cmd_list
from erp_backup.cli.recover_estate import add_recover_estate
from erp_backup.cli.restore import _parse_option, cmd_restore, restore_target
from erp_backup.cli.source import EXIT_FAILED, EXIT_USAGE, Failure, FetchProgress, UsageError, offsite_hint
from erp_backup.cli.verify import cmd_verify
from erp_backup.plan import load_plan
from erp_backup.services import service_names

__all__ = ["Console", "Failure", "FetchProgress", "UsageError", "build_parser", "main", "restore_target"]

log = logging.getLogger(__name__)

AIRFLOW_LOG_LEVEL_ENV = "AIRFLOW__LOGGING__LOGGING_LEVEL"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--from", dest="source", choices=("local", "offsite"), default="local",
                        help="read sets from local staging (default) or the offsite store")
    common.add_argument("--root", help="local staging root (default: $ERP_BACKUP_ROOT, else the plan's backup_root)")
    common.add_argument("--plan", help="backup plan file (default: $ERP_BACKUP_PLAN, else include/backup_plan.yaml)")
    common.add_argument("--work-dir", help="where offsite sets are fetched to (default: the system temp dir)")
    common.add_argument("--identity", type=Path, metavar="FILE",
                        help="age identity file (age-keygen format) for encrypted sets (default: the plan's "
                             "identity connection, if defined)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument("-v", "--verbose", action="store_true", help="log each step")

    parser = argparse.ArgumentParser(
        prog="erp-restore",
        description="List, verify and restore ALL-ERP backup sets, and read the DR drill ledger. "
                    "Needs no running Airflow: connections come from AIRFLOW_CONN_<ID> variables.",
        epilog="exit codes: 0 ok, 1 verification/restore failure, 2 usage error or bad input",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", parents=[common], help="table of backup sets with their state")
    listing.add_argument("service", nargs="?", help=f"one of {', '.join(service_names())}")
    listing.add_argument("type", nargs="?", help="backup type, e.g. full")
    listing.set_defaults(handler=cmd_list)

    verify = commands.add_parser("verify", parents=[common], help="check a set's files against its manifest")
    verify.add_argument("service")
    verify.add_argument("type")
    verify.add_argument("backup_id")
    verify.add_argument("--deep", action="store_true",
                        help="also run the service's own checks (offsite: fetch into a temp dir and re-hash first)")
    verify.add_argument("--seal", action="store_true",
                        help="local only: record the result like the checksum task (SHA256SUMS or CHECKSUM_FAILED)")
    verify.set_defaults(handler=cmd_verify)

    restore = commands.add_parser("restore", parents=[common], help="restore a set into a target")
    restore.add_argument("service")
    restore.add_argument("type")
    restore.add_argument("backup_id")
    restore.add_argument("--target", help="where to restore; its form depends on the service (a connection string, "
                                          "a URI, a directory...): a wrong one is answered with what is expected")
    restore.add_argument("--target-conn", help="connection id (AIRFLOW_CONN_<ID>) of the target, for services whose "
                                               "target is a connection")
    restore.add_argument("--schema", help="restore only this schema (one tenant), where the service supports it")
    restore.add_argument("--database", action="append", help="restore only this database (repeatable)")
    restore.add_argument("--jobs", type=_positive_int, help="parallel restore jobs, where the service supports it")
    restore.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    restore.add_argument("-o", "--option", action="append", type=_parse_option, metavar="KEY=VALUE",
                         help="extra option for the service's restore (JSON values), e.g. -o keep_running=true")
    restore.set_defaults(handler=cmd_restore)

    drills = commands.add_parser("drill-report", parents=[common], help="print the DR drill ledger")
    drills.add_argument("--last", type=_positive_int, help="only the last N drills")
    drills.set_defaults(handler=cmd_drill_report)

    add_recover_estate(commands, common)
    return parser


@contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of a command unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=err,
                        format="%(levelname)s %(name)s: %(message)s")
    # Airflow (imported only for offsite and connections) logs through structlog to stdout:
    # quiet it unless -v, and send anything printed by libraries to stderr, so stdout stays ours (--json).
    console = Console(out, err)
    try:
        with redirect_stdout(err), _env_default(AIRFLOW_LOG_LEVEL_ENV, "INFO" if args.verbose else "WARNING"):
            return args.handler(args, console)
    except UsageError as exc:
        console.note(f"error: {exc}")
        return EXIT_USAGE
    except Failure as exc:
        console.note(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.note("interrupted")
        return 130
    except Exception as exc:
        from erp_backup.offsite import OFFSITE_FAILURES

        if isinstance(exc, OFFSITE_FAILURES):
            console.note(f"error: {exc}{offsite_hint(load_plan(args.plan))}")
            return EXIT_FAILED
        if args.verbose:
            log.exception("unexpected error")
        console.note(f"error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
