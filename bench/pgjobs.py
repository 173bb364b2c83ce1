"""Parallel dump on many tables (issue 14): bench/run-pg-jobs [--size-mb 2048] [--tables 40] [--repeat 3].

The `-j2` vs `-j1` target needs "a database of at least 2 GB with many tables"; the
pgscale shapes are dominated by one table. This builds one: --tables tables of text
and numeric rows of about equal size, --size-mb in all, in a scratch cluster. Then,
interleaved and rotated, --repeat times:

- `pg_dump -Fd -Z0 -j1` against `-j2` (pg_dump alone, to a scratch directory);
- our backup in a task-like child process, directory layout, `dump_jobs=1` against
  `dump_jobs=2` (each file compressed and hashed as pg_dump writes it).

Writes the "PostgreSQL parallel dump, many tables" section of BENCHMARKS.md (between
its markers) and prints it. Target: `-j2` at least 1.6× faster than `-j1`.

With `--rss-sizes 512,4096` it measures instead the backup task's peak memory on the
same shape at each size (one backup each, the plan's default options) and writes the
"PostgreSQL backup memory by size" section. Target: flat.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import psycopg

from bench.benchmark import load_average, scratch_source
from bench.common import ROOT, median, pg_args, shell, write_marked_section

BEGIN, END = "<!-- pgjobs:begin -->", "<!-- pgjobs:end -->"
RSS_BEGIN, RSS_END = "<!-- pgrss:begin -->", "<!-- pgrss:end -->"
DB = "erp_many"
ROW_BYTES = 140  # on disk, per row of the table below (measured: 2161 MB for 40 x 420,000 rows)
TARGET = 1.6
log = logging.getLogger("bench.pgjobs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run-pg-jobs", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=2048, help="database size on disk in MB (default 2048)")
    parser.add_argument("--tables", type=int, default=40, help="tables of about equal size (default 40)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each method, rotated (default 3)")
    parser.add_argument("--rss-sizes", help="instead: peak RSS of one backup at each size in MB, e.g. 512,4096")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    return parser.parse_args(argv)


def build(cluster: Any, size_mb: float, tables: int) -> int:
    """The many-tables database; returns its size in bytes."""
    rows = max(1, int(size_mb * 2**20 / ROW_BYTES / tables))
    with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB}")
        admin.execute(f"CREATE DATABASE {DB}")
    with psycopg.connect(cluster.conninfo(DB), autocommit=True) as conn:
        for n in range(1, tables + 1):
            conn.execute(f"CREATE TABLE t{n} (id bigint PRIMARY KEY, ref text, amount numeric(14, 2), label text)")
            conn.execute(f"""INSERT INTO t{n} SELECT g, md5(g::text) || md5((g + {n})::text), (g % 99991) * 1.37,
                repeat(chr(65 + ((g + {n}) % 26)), 20) FROM generate_series(1, {rows}) g""")
        conn.execute("VACUUM (FREEZE, ANALYZE)")
        conn.execute("CHECKPOINT")
        row = conn.execute("SELECT pg_database_size(%s)", (DB,)).fetchone()
    assert row is not None
    return int(row[0])


def measure(cluster: Any, work: Path, repeat: int) -> dict[str, list[float]]:
    from bench.measurements import run_backup_child

    def raw(jobs: int) -> float:
        target = work / f"fd-j{jobs}"
        shutil.rmtree(target, ignore_errors=True)
        seconds = shell(f"pg_dump -Fd -Z0 -j{jobs} -f {target} {pg_args(cluster.port)} {DB}", what="pg_dump -Fd")[0]
        shutil.rmtree(target)
        return seconds

    def ours(jobs: int, index: int) -> float:
        result = run_backup_child(cluster.port, work / "sets", index, "--database", DB,
                                  "--option", "parallel_dump_min_mb=0", "--option", f"dump_jobs={jobs}")
        shutil.rmtree(result["set_dir"])
        return float(result["seconds"])

    methods = {
        "pg_dump -j1": lambda i: raw(1),
        "pg_dump -j2": lambda i: raw(2),
        "ours dump_jobs=1": lambda i: ours(1, 100 + i),
        "ours dump_jobs=2": lambda i: ours(2, 200 + i),
    }
    runs: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for i in range(repeat):
        for offset in range(len(names)):
            name = names[(i + offset) % len(names)]
            runs[name].append(methods[name](i))
            log.info("%s run %d: %.2f s", name, i + 1, runs[name][-1])
    return runs


def section(runs: dict[str, list[float]], args: argparse.Namespace, size: int, load: str) -> str:
    def ratio(slow: str, fast: str) -> float:
        return median(runs[slow]) / median(runs[fast])

    def row(what: str, one: str, two: str) -> str:
        speedup = ratio(one, two)
        verdict = "PASS" if speedup >= TARGET else "MISS"
        return (f"| {what} | {median(runs[one]):.2f} s | {median(runs[two]):.2f} s | {speedup:.2f}× "
                f"| ≥ {TARGET}× {verdict} |")

    every = "; ".join(f"{name} " + " / ".join(f"{s:.2f}" for s in values) + " s" for name, values in runs.items())
    lines = [
        BEGIN,
        "## PostgreSQL parallel dump, many tables",
        "",
        f"`bench/run-pg-jobs --size-mb {args.size_mb:g} --tables {args.tables} --repeat {args.repeat}`: "
        f"{size / 2**20:.0f} MiB on disk in {args.tables} tables of text and numeric rows of about equal size, "
        f"on {os.cpu_count()} cores; medians, methods rotated. Load average at the end: {load}.",
        "",
        "| | `-j1` | `-j2` | speed-up | target |",
        "|---|---|---|---|---|",
        row("`pg_dump -Fd -Z0`, alone", "pg_dump -j1", "pg_dump -j2"),
        row("our backup, directory layout (zstd + SHA-256 per file, table inventory)", "ours dump_jobs=1",
            "ours dump_jobs=2"),
        "",
        f"Every run: {every}.",
        END,
    ]
    return "\n".join(lines) + "\n"


def measure_rss(cluster: Any, work: Path, sizes_mb: list[float], tables: int) -> list[dict[str, Any]]:
    """One backup (the plan's default options) per size, each database built afresh."""
    from bench.measurements import run_backup_child

    rows = []
    for index, size_mb in enumerate(sizes_mb):
        size = build(cluster, size_mb, tables)
        result = run_backup_child(cluster.port, work / "sets", 300 + index, "--database", DB)
        shutil.rmtree(result["set_dir"])
        rows.append({"size": size, "seconds": float(result["seconds"]),
                     "peak_kib": result["self_peak_kib"] - result["baseline_kib"],
                     "child_kib": max(result["children_kib"].values(), default=0)})
        log.info("%d MiB: %.1f s, peak %d KiB over baseline", size // 2**20, rows[-1]["seconds"], rows[-1]["peak_kib"])
    return rows


def rss_section(rows: list[dict[str, Any]], args: argparse.Namespace, load: str) -> str:
    first, last = rows[0], rows[-1]
    ratio = last["peak_kib"] / max(first["peak_kib"], 1)
    lines = [
        RSS_BEGIN,
        "## PostgreSQL backup memory by size",
        "",
        f"`bench/run-pg-jobs --rss-sizes {args.rss_sizes} --tables {args.tables}`: one backup per size, in a "
        f"task-like child process with the plan's default options, of the many-tables shape above. "
        f"Load average at the end: {load}.",
        "",
        "| database on disk | backup wall time | our peak RSS over baseline | largest child peak RSS |",
        "|---|---|---|---|",
        *(f"| {r['size'] / 2**20:.0f} MiB | {r['seconds']:.1f} s | {r['peak_kib'] / 1024:.1f} MiB "
          f"| {r['child_kib'] / 1024:.1f} MiB |" for r in rows),
        "",
        f"Peak RSS at {last['size'] / 2**20:.0f} MiB is {ratio:.2f}× that at {first['size'] / 2**20:.0f} MiB "
        f"(target: flat).",
        RSS_END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with scratch_source("pgjobs") as (work, source):
        if args.rss_sizes:
            rows = measure_rss(source, work, [float(v) for v in args.rss_sizes.split(",")], args.tables)
        else:
            size = build(source, args.size_mb, args.tables)
            log.info("built %s: %d MiB in %d tables", DB, size // 2**20, args.tables)
            runs = measure(source, work, args.repeat)
    if args.rss_sizes:
        text = rss_section(rows, args, load_average())
        write_marked_section(args.output, text, RSS_BEGIN, RSS_END)
    else:
        text = section(runs, args, size, load_average())
        write_marked_section(args.output, text, BEGIN, END)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
