"""One PostgreSQL full backup in its own process, reporting time and memory as JSON on stdout.

Run by bench/measurements.py as `python bench/backup_child.py --port N --root DIR --backup-id ID`.
The backup goes through `erp_backup.services.postgres.backup(ctx)` with a
BackupContext built the way tests/integration/test_postgres_roundtrip.py builds
one (an `airflow.sdk.Connection`, as a task has), then the manifest is written
as `erp_backup.steps.backup` writes it.

Memory: `self_peak_kib` is this process's high-water mark (VmHWM), `baseline_kib`
its RSS after the imports and before the backup, `children_peak_kib` the largest
child (pg_dump / pg_dumpall) from getrusage(RUSAGE_CHILDREN).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from erp_backup.services.base import BackupContext

STARTED = time.monotonic()
RESULT_MARKER = "BENCH_RESULT "  # the line the parent parses; logs may share stdout


def status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--backup-id", required=True)
    parser.add_argument("--database", action="append", help="back up only these databases (default: all)")
    parser.add_argument("--compress-level", type=int, default=None, help="default: the plan's postgres compress_level")
    parser.add_argument("--no-inventory", action="store_true", help="diagnostic: skip the table hashing")
    parser.add_argument("--no-compress", action="store_true", help="diagnostic: write the dumps uncompressed")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=NUMBER",
                        help="a numeric postgres plan option, e.g. dump_jobs=2 or parallel_dump_min_mb=0")
    parser.add_argument("--encrypt", action="store_true",
                        help="age-encrypt in the stream, as a set with `encrypt: true` is (a fresh X25519 recipient)")
    return parser.parse_args()


def patch_for_diagnosis(no_inventory: bool, no_compress: bool) -> None:
    """Diagnostic variants: back up without the table inventory, or without zstd."""
    if no_inventory:
        from erp_backup.services.postgres import content as pg_content

        pg_content.inventory = lambda conn, schema=None, cancelled=None: []
    if no_compress:
        from erp_backup.services.postgres import dump
        from erp_backup.stream import stream_to_file

        dump._stream_labelled = (
            lambda chunks, set_dir, relative, label, level: stream_to_file(
                chunks, set_dir, relative, compress=False, label=label
            )
        )


def backup_context(args: argparse.Namespace) -> BackupContext:
    """The context an Airflow task would hand `postgres.backup`, for a new set under `args.root`."""
    from airflow.sdk import Connection

    from bench.common import shipped_level
    from erp_backup.plan import BackupJob
    from erp_backup.services.base import BackupContext, RunInfo
    from erp_backup.sets import BackupSet

    level = shipped_level() if args.compress_level is None else args.compress_level
    options: dict[str, Any] = {"exec_mode": "network", "compress_level": level}
    if args.database:
        options["databases"] = args.database
    for option in args.option:
        key, _, value = option.partition("=")
        options[key] = float(value)
    job = BackupJob(
        service="postgres", backup_type="full", schedule="0 2 * * *", timezone="Asia/Seoul",
        retention=timedelta(days=30), method="pg_dump", rpo=timedelta(hours=6), rto=timedelta(hours=2),
        connections={"source": "erp_postgres"}, enabled=True, options=options,
    )
    connection = Connection(
        conn_id="erp_postgres", conn_type="postgres", host=args.host, port=args.port, login="postgres", schema="postgres"
    )
    backup_set = BackupSet(args.root, "postgres", "full", args.backup_id)
    backup_set.create_dir()
    if args.encrypt:
        from pyrage import x25519

        from erp_backup.crypto import prepare_set

        prepare_set(backup_set.path, [str(x25519.Identity.generate().to_public())])
    run = RunInfo(dag_id="backup_postgres_full", run_id=f"bench__{args.backup_id}", run_after=datetime.now(UTC))
    return BackupContext(job=job, backup_set=backup_set, run=run, get_connection=lambda conn_id: connection)


def main() -> None:
    args = parse_args()
    patch_for_diagnosis(args.no_inventory, args.no_compress)
    ctx = backup_context(args)

    from erp_backup.manifest import Manifest, write_manifest
    from erp_backup.services import postgres

    imports_seconds = time.monotonic() - STARTED
    baseline = status_kib("VmRSS")
    started_at = datetime.now(UTC)
    clock = time.monotonic()
    outcome = postgres.backup(ctx)
    manifest = Manifest(
        service="postgres", backup_type="full", backup_id=args.backup_id,
        captured_started_at=started_at, captured_finished_at=datetime.now(UTC), run=ctx.run.as_dict(),
        source=outcome.source, tools=outcome.tools, files=outcome.files, details=outcome.details,
    )
    write_manifest(ctx.backup_set.path, manifest)
    seconds = time.monotonic() - clock

    sys.stdout.write(RESULT_MARKER)
    json.dump({
        "seconds": seconds,
        "imports_seconds": imports_seconds,
        "layouts": {name: d.get("format", "custom") for name, d in outcome.details["databases"].items()},
        "set_dir": str(ctx.backup_set.path),
        "bytes": manifest.total_size,
        "raw_bytes": outcome.details["raw_bytes"],
        "files": len(manifest.files),
        "dump_seconds": {name: d["dump_seconds"] for name, d in outcome.details["databases"].items()},
        "baseline_kib": baseline,
        "self_peak_kib": status_kib("VmHWM"),
        "self_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "children_peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }, sys.stdout)
    sys.stdout.write("\n")

if __name__ == "__main__":
    main()
