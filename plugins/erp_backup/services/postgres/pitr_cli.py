"""Point-in-time restore of PostgreSQL into a new scratch cluster: the runbook CLI.

    python -m erp_backup.services.postgres.pitr_cli restore --target-time 2026-11-26T10:15:00+09:00
    python -m erp_backup.services.postgres.pitr_cli coverage

`include/scripts/pitr_restore.sh` wraps it. The restore itself is ``pitr.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from erp_backup.crypto import EncryptionError, identities_from_file
from erp_backup.scratch.postgres import ScratchPostgres
from erp_backup.sealing import plan_identities
from erp_backup.services.postgres.chain import SNAPSHOT_TYPE, WAL_TYPE
from erp_backup.services.postgres.pitr import (
    DEFAULT_TIMEOUT_S,
    RestoreError,
    build_inventory,
    coverage,
    restore_to_time,
)
from erp_backup.services.postgres.wal import SERVICE, archive_dir_for, read_archive_log, usable_sets


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r} (e.g. 2026-11-26T10:15:00+09:00)") from exc
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no timezone offset (e.g. +09:00 for Asia/Seoul)")
    return moment


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", type=Path, help="backup root (default: the plan's backup_root / $ERP_BACKUP_ROOT)")
    common.add_argument("--archive-dir", type=Path, help="local WAL archive (default: the plan's wal_archive_dir or <root>/postgres/wal_archive)")
    parser = argparse.ArgumentParser(prog="python -m erp_backup.services.postgres.pitr_cli", description=(__doc__ or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    restore = commands.add_parser("restore", parents=[common], help="restore into a new scratch cluster as of --target-time")
    restore.add_argument("--target-time", required=True, type=_parse_time, help="ISO 8601 with offset, e.g. 2026-11-26T10:15:00+09:00")
    restore.add_argument("--dry-run", action="store_true", help="only show the base and WAL that would be used")
    restore.add_argument("--no-local-archive", action="store_true", help="use WAL sets only")
    restore.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for recovery (default 7200)")
    restore.add_argument("--stop", action="store_true", help="stop the restored cluster when done (default: leave it running)")
    restore.add_argument("--superuser", default="postgres", help="a superuser role of the source cluster (default postgres)")
    restore.add_argument("--identity", type=Path, metavar="FILE",
                         help="age identity file for sealed sets and a sealed WAL archive (default: the plan's identity connection)")
    commands.add_parser("coverage", parents=[common], help="list the span of target times each base backup reaches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)

    root = args.root
    options: Mapping[str, Any] = {}
    if root is None:
        from erp_backup.plan import load_plan

        plan = load_plan()
        root = plan.backup_root
        options = plan.job(SERVICE, WAL_TYPE).options
    archive_dir = args.archive_dir or archive_dir_for(root, options)

    if args.command == "coverage":
        entries = [(e.name, e.archived_at) for e in read_archive_log(archive_dir)] if archive_dir.is_dir() else []
        inventory = build_inventory(
            [m for _, m in usable_sets(root, SNAPSHOT_TYPE)], [m for _, m in usable_sets(root, WAL_TYPE)], entries
        )
        print(json.dumps([span.describe() for span in coverage(inventory)], indent=2))
        return 0
    try:
        report = restore_to_time(
            args.target_time,
            root=root,
            archive_dir=archive_dir,
            use_local_archive=not args.no_local_archive,
            timeout=args.timeout,
            dry_run=args.dry_run,
            owner="pitr-cli",
            superuser=args.superuser,
            identities=(lambda: identities_from_file(args.identity)) if args.identity else plan_identities,
        )
    except (RestoreError, EncryptionError) as exc:
        print(f"PITR failed: {exc}", file=sys.stderr)
        return 2
    if args.stop and not args.dry_run:
        ScratchPostgres(Path(report["data_dir"]).parent, port=report["port"]).stop()
        report["stopped"] = True
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
