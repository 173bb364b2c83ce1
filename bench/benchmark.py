"""The benchmark behind `bench/run`: our backup, restore, checksum, upload and DAG parsing against baselines.

Builds ERP-like databases in scratch PostgreSQL clusters (never the shared server),
runs each measurement `--repeat` times (methods interleaved, order rotated) and
writes medians, ratios and PASS/MISS against the targets to BENCHMARKS.md.
A "## Notes" section already in BENCHMARKS.md is kept as it is.

Not part of the test suite: numbers depend on the machine and on its load.
This module is the command line: the phases are in `bench.measurements`,
the report in `bench.report`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bench.common import BENCH, ROOT, Results
from bench.machine import machine_info
from bench.measurements import (
    build_data,
    custom_dumps,
    phase_backup,
    phase_checksum,
    phase_dags,
    phase_diagnose,
    phase_offsite,
    phase_restore,
    phase_rss_small,
)
from bench.report import print_summary, write_report

if TYPE_CHECKING:
    from erp_backup.scratch.postgres import ScratchPostgres

T = TypeVar("T")

log = logging.getLogger("bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=300, help="database size on disk in MB (default 300)")
    parser.add_argument("--small-size-mb", type=float, help="the second size for peak RSS (default size/4)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; medians are reported (default 3)")
    parser.add_argument("--checksum-mb", type=int, default=512, help="size of the generated checksum file in MiB (default 512)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--diagnose", action="store_true", help="also time backup variants and compression levels")
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory (backup sets, dumps)")
    parser.add_argument("--pg-scale", action="store_true",
                        help="only the PostgreSQL scale benchmark (bench/pgscale.py): its section of BENCHMARKS.md")
    parser.add_argument("--scale", type=int, default=40, help="pgbench scale of --pg-scale's text shape (default 40)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb <= 0 or args.checksum_mb < 8:
        parser.error("--repeat ≥ 1, --size-mb > 0 and --checksum-mb ≥ 8 please")
    args.small_size_mb = args.small_size_mb or args.size_mb / 4
    return args


def prepare_environment(work: Path) -> None:
    """Airflow reads its config at import: point it at a throwaway home before anything imports it."""
    os.environ["AIRFLOW_HOME"] = str(work / "airflow-home")
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
    os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ.setdefault("ERP_BACKUP_ROOT", str(work / "backup-root"))
    paths = [str(ROOT / "plugins"), str(ROOT), str(BENCH)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)


@contextmanager
def scratch_source(name: str) -> Iterator[tuple[Path, Any]]:
    """(a throwaway work dir with Airflow pointed at it, a started scratch source cluster); both removed on exit."""
    work = Path(tempfile.mkdtemp(prefix=f"erp-bench-{name}-"))
    prepare_environment(work)
    from bench import pgdata

    source = pgdata.new_cluster(f"bench-{name}", pgdata.SOURCE_SETTINGS)
    try:
        yield work, source
    finally:
        source.destroy()
        shutil.rmtree(work, ignore_errors=True)


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def timed(res: Results, name: str, func: Callable[[], T]) -> T:
    """Run one phase, logging its name and recording its seconds."""
    log.info("== %s", name)
    clock = time.monotonic()
    value = func()
    res.phase_seconds[name] = time.monotonic() - clock
    return value


def run_phases(res: Results, work: Path, clusters: list[ScratchPostgres]) -> None:
    """Every measurement in order; each cluster is destroyed as soon as the phases are done with it."""
    source, small = timed(res, "build data", lambda: build_data(res, clusters))
    set_dir, seed_file = timed(res, "backup", lambda: phase_backup(res, source, work))
    timed(res, "peak RSS (small database)", lambda: phase_rss_small(res, small, work))
    small.destroy()
    clusters.remove(small)
    if res.args.diagnose:
        timed(res, "diagnostics", lambda: phase_diagnose(res, source, work, set_dir))
    custom_dir = work / "custom"
    custom_dir.mkdir()
    expected = timed(res, "pg_dump -Fc for the restore baseline (not timed)", lambda: custom_dumps(source, custom_dir))
    source.destroy()
    clusters.remove(source)
    timed(res, "restore", lambda: phase_restore(res, set_dir, seed_file, custom_dir, expected))
    timed(res, "checksum", lambda: phase_checksum(res, set_dir, work))
    timed(res, "offsite upload", lambda: phase_offsite(res, set_dir))
    timed(res, "DAG parse", lambda: phase_dags(res))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="erp-bench-"))
    prepare_environment(work)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below

    from erp_backup.scratch.postgres import cleanup_stale

    cleanup_stale("bench:")
    res = Results(args=args)
    res.load["start"] = load_average()
    res.machine = machine_info()
    clusters: list[ScratchPostgres] = []
    started = time.monotonic()
    try:
        if args.pg_scale:
            from bench import pgscale

            pgscale.run(args, work, clusters, load_average)
        else:
            run_phases(res, work, clusters)
    finally:
        for cluster in clusters:
            cluster.destroy()
        if args.keep_work:
            log.info("work directory kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    if args.pg_scale:
        print(f"\nwritten to {args.output} ({(time.monotonic() - started) / 60:.1f} min)")
        return 0
    res.phase_seconds["total"] = time.monotonic() - started
    res.load["end"] = load_average()
    write_report(res, args.output)
    print()
    print_summary(res)
    print(f"\nwritten to {args.output} ({res.phase_seconds['total'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
