"""PostgreSQL scale benchmark (issue 14): `bench/run --pg-scale [--scale 40] [--size-mb 300] [--repeat 3]`.

Two data shapes, each alone in a scratch cluster: `text` (pgbench -i at --scale plus
four tenant schemas of text and numeric tables) and `bytea` (bench/pgdata.py's
ERP-like database at --size-mb). Per shape, interleaved and rotated, --repeat times:

- backup: ours in a task-like child process, single `-Fc` stream and `-Fd -j2`
  (directory layout), against the floor `pg_dumpall > /dev/null`; the seed's
  `pg_dumpall | gzip` once, for its size;
- `pg_dump -Fd -Z0 -j2` against `-j1` (pg_dump alone, to a scratch directory);
- restore with our verification (`postgres.restore`, jobs 2) of both layouts, against
  raw `pg_restore -j2` of the same, already decompressed `-Fc` dump;
- zstd levels 1/3/6 at 2 threads on the raw `-Fc` dump: size and time.

Writes the "## PostgreSQL scale" section of BENCHMARKS.md (the rest is kept).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench.common import median, pg_args, shell
from bench.measurements import run_backup_child

log = logging.getLogger("bench.pgscale")

SECTION = "## PostgreSQL scale"
DB = {"text": "erp_text", "bytea": "erp_bench"}
TENANTS = 4


def build_text(cluster: Any, scale: int) -> None:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {DB['text']}")
    shell(f"pgbench -i -q -s {scale} {pg_args(cluster.port)} {DB['text']} 2>&1", what="pgbench -i")
    with psycopg.connect(cluster.conninfo(DB["text"]), autocommit=True) as conn:
        for n in range(TENANTS):
            conn.execute(f"CREATE SCHEMA tenant_{n}")
            conn.execute(f"CREATE TABLE tenant_{n}.accounts AS SELECT * FROM pgbench_accounts WHERE aid % {TENANTS * 10} = {n}")
            conn.execute(f"""CREATE TABLE tenant_{n}.invoices AS SELECT g AS id, (g % 997) * 1.37::numeric(12, 2) AS amount,
                'INV-' || lpad(g::text, 9, '0') AS number, 'customer ' || (g % 5000) || ' ' || md5((g % 5000)::text) AS party,
                now() - (g || ' minutes')::interval AS issued FROM generate_series(1, {scale * 5000}) g""")
            conn.execute(f"ALTER TABLE tenant_{n}.invoices ADD PRIMARY KEY (id)")
        conn.execute("VACUUM (FREEZE, ANALYZE)")
        conn.execute("CHECKPOINT")


def db_size(cluster: Any, dbname: str) -> int:
    with psycopg.connect(cluster.conninfo()) as conn:
        row = conn.execute("SELECT pg_database_size(%s)", (dbname,)).fetchone()
        assert row is not None
        return int(row[0])


def interleave(repeat: int, methods: dict[str, Callable[[int], dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    names = list(methods)
    for i in range(repeat):
        for offset in range(len(names)):
            name = names[(i + offset) % len(names)]
            runs[name].append(methods[name](i))
            log.info("%s run %d: %.2f s", name, i + 1, runs[name][-1]["seconds"])
    return runs


def backups(cluster: Any, dbname: str, work: Path, repeat: int) -> dict[str, list[dict[str, Any]]]:
    sets = work / "sets"

    def ours(index: int, *options: str) -> dict[str, Any]:
        result = run_backup_child(cluster.port, sets, index, "--database", dbname, *options)
        keep = work / ("set-dir" if "dump_jobs=2" in options else "set-custom")
        shutil.rmtree(keep, ignore_errors=True)
        shutil.move(result["set_dir"], keep)
        result["set_dir"] = str(keep)
        return result

    def floor(index: int) -> dict[str, Any]:
        return {"seconds": shell(f"pg_dumpall {pg_args(cluster.port)} > /dev/null", what="floor")[0]}

    def fd_jobs(jobs: int) -> dict[str, Any]:
        target = work / f"fd-j{jobs}"
        shutil.rmtree(target, ignore_errors=True)
        seconds = shell(f"pg_dump -Fd -Z0 -j{jobs} -f {target} {pg_args(cluster.port)} {dbname}", what="pg_dump -Fd")[0]
        shutil.rmtree(target)
        return {"seconds": seconds}

    return interleave(repeat, {
        "floor": floor,
        "ours_custom": lambda i: ours(i, "--option", "parallel_dump_min_mb=1e9"),
        "ours_dir_j2": lambda i: ours(50 + i, "--option", "parallel_dump_min_mb=0", "--option", "dump_jobs=2"),
        "pg_dump_fd_j1": lambda i: fd_jobs(1),
        "pg_dump_fd_j2": lambda i: fd_jobs(2),
    })


def restores(source: Any, target: Any, dbname: str, work: Path, repeat: int) -> dict[str, list[dict[str, Any]]]:
    from erp_backup.manifest import MANIFEST_NAME, Manifest
    from erp_backup.services import postgres

    raw = work / "raw.dump"
    shell(f"pg_dump -Fc -Z0 -f {raw} {pg_args(source.port)} {dbname}", what="pg_dump -Fc")
    shell(f"pg_dumpall --globals-only {pg_args(source.port)} > {work}/globals.sql", what="globals")

    def drop() -> None:
        with psycopg.connect(target.conninfo(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")

    def ours(layout: str) -> dict[str, Any]:
        drop()
        set_dir = work / f"set-{layout}"
        manifest = Manifest.read(set_dir / MANIFEST_NAME)
        clock = time.monotonic()
        report = postgres.restore(set_dir, manifest, target.conninfo(), options={"jobs": 2})
        seconds = time.monotonic() - clock
        if report.problems:
            raise RuntimeError(f"restore problems: {report.problems[:3]}")
        return {"seconds": seconds, "durations": report.details["durations"]}

    def raw_restore(index: int) -> dict[str, Any]:
        drop()
        script = (f"psql -X -q {pg_args(target.port)} -d postgres -f {work}/globals.sql >/dev/null 2>&1; "
                  f"pg_restore -j2 --create --exit-on-error {pg_args(target.port)} -d postgres {raw}")
        return {"seconds": shell(script, what="pg_restore -j2")[0]}

    return interleave(repeat, {"ours_custom": lambda i: ours("custom"), "ours_dir": lambda i: ours("dir"),
                               "pg_restore_j2": raw_restore})


def zstd_levels(work: Path) -> dict[str, dict[str, float]]:
    import zstandard

    raw = work / "raw.dump"
    found = {}
    for level in (1, 3, 6):
        compressor = zstandard.ZstdCompressor(level=level, threads=2)
        clock = time.monotonic()
        with open(raw, "rb") as src, open(work / "level.zst", "wb") as dst:
            compressor.copy_stream(src, dst)
        found[str(level)] = {"seconds": time.monotonic() - clock, "bytes": (work / "level.zst").stat().st_size}
    found["raw_bytes"] = {"bytes": raw.stat().st_size, "seconds": 0.0}
    return found


def measure_shape(shape: str, args: Any, work: Path, clusters: list) -> dict[str, Any]:
    from bench import pgdata

    source = pgdata.new_cluster(f"pgscale-{shape}", pgdata.SOURCE_SETTINGS)
    clusters.append(source)
    clock = time.monotonic()
    if shape == "text":
        build_text(source, args.scale)
    else:
        pgdata.build_database(source, DB[shape], args.size_mb)
    built = time.monotonic() - clock
    target = pgdata.new_cluster(f"pgscale-{shape}-target", pgdata.SOURCE_SETTINGS)
    clusters.append(target)
    shape_work = work / shape
    shape_work.mkdir()
    backup_runs = backups(source, DB[shape], shape_work, args.repeat)
    seed_seconds, _ = shell(f"pg_dumpall {pg_args(source.port)} | gzip > {shape_work}/seed.gz", what="seed")
    result = {
        "size_bytes": db_size(source, DB[shape]), "built_seconds": built, "backup": backup_runs,
        "seed": {"seconds": seed_seconds, "bytes": (shape_work / "seed.gz").stat().st_size},
        "restore": restores(source, target, DB[shape], shape_work, args.repeat), "zstd": zstd_levels(shape_work),
    }
    for cluster in (source, target):
        cluster.destroy()
        clusters.remove(cluster)
    return result


def _m(runs: list[dict[str, Any]], key: str = "seconds") -> float:
    return median([r[key] for r in runs])


def shape_rows(shape: str, r: dict[str, Any], level: int) -> list[str]:
    b, rs = r["backup"], r["restore"]
    floor, custom, directory = _m(b["floor"]), _m(b["ours_custom"]), _m(b["ours_dir_j2"])
    out_custom = b["ours_custom"][-1]["bytes"]
    restore_best = min(_m(rs["ours_custom"]), _m(rs["ours_dir"]))
    j = _m(b["pg_dump_fd_j1"]) / _m(b["pg_dump_fd_j2"])
    rss = max(run["self_peak_kib"] for run in b["ours_custom"] + b["ours_dir_j2"]) / 1024

    def row(what: str, ours: str, base: str, ratio: float, target: str) -> str:
        return f"| {shape} | {what} | {ours} | {base} | {ratio:.2f}× | {target} |"

    return [
        row("backup, single `-Fc` stream, in process, vs floor", f"{custom:.2f} s", f"{floor:.2f} s", custom / floor,
            "≤ 1.15× " + ("PASS" if custom / floor <= 1.15 else "MISS")),
        row("backup, `-Fd -j2`, in process, vs floor", f"{directory:.2f} s", f"{floor:.2f} s", directory / floor,
            "≤ 1.15× " + ("PASS" if directory / floor <= 1.15 else "MISS")),
        row(f"backup output (zstd level {level}) vs seed `pg_dumpall | gzip`", f"{out_custom / 2**20:.1f} MiB",
            f"{r['seed']['bytes'] / 2**20:.1f} MiB", out_custom / r["seed"]["bytes"],
            ("≤ 0.45× " + ("PASS" if out_custom / r["seed"]["bytes"] <= 0.45 else "MISS")) if shape == "text" else "info"),
        row("restore + verification (best layout) vs raw `pg_restore -j2`", f"{restore_best:.2f} s",
            f"{_m(rs['pg_restore_j2']):.2f} s", restore_best / _m(rs["pg_restore_j2"]),
            "≤ 1.1× " + ("PASS" if restore_best / _m(rs["pg_restore_j2"]) <= 1.1 else "MISS")),
        row("`pg_dump -Fd -j2` vs `-j1` (speed-up)", f"{_m(b['pg_dump_fd_j2']):.2f} s", f"{_m(b['pg_dump_fd_j1']):.2f} s",
            j, "≥ 1.6× on ≥ 2 GB: not measured at that size; " + ("PASS" if j >= 1.6 else "MISS") + " here"),
        f"| {shape} | backup task peak RSS (VmHWM, max of runs) | {rss:.0f} MiB | | | flat: see the other shape |",
    ]


def details(shape: str, r: dict[str, Any]) -> list[str]:
    b, rs = r["backup"], r["restore"]
    custom = b["ours_custom"]
    lines = [f"### {shape}: {r['size_bytes'] / 2**20:.0f} MiB on disk (built in {r['built_seconds']:.0f} s)", ""]
    lines.append("| Run | median s | all runs (s) |")
    lines.append("|---|---|---|")
    for name, runs in {**{f"backup {k}": v for k, v in b.items()}, **{f"restore {k}": v for k, v in rs.items()}}.items():
        all_runs = ", ".join(f"{x['seconds']:.2f}" for x in runs)
        lines.append(f"| {name} | {_m(runs):.2f} | {all_runs} |")
    whole = _m(custom, "process_seconds")
    imports = _m(custom, "imports_seconds")
    dump = median([sum(x["dump_seconds"].values()) for x in custom])
    lines += ["", f"Backup task, single stream: whole process {whole:.2f} s; Python start and imports "
              f"{imports:.2f} s before `postgres.backup` starts; inside it {_m(custom):.2f} s, of which the pg_dump "
              f"stream {dump:.2f} s (the rest: survey, role check, tool versions, globals, inventory wait, manifest).", ""]
    lines.append("zstd on the raw `-Fc` dump (" + f"{r['zstd']['raw_bytes']['bytes'] / 2**20:.0f} MiB), 2 threads: "
                 + "; ".join(f"level {k}: {v['bytes'] / 2**20:.1f} MiB in {v['seconds']:.2f} s"
                             for k, v in r["zstd"].items() if k != "raw_bytes")
                 + f". Seed gzip: {r['seed']['bytes'] / 2**20:.1f} MiB in {r['seed']['seconds']:.1f} s.")
    return [*lines, ""]


def section(results: dict[str, Any], args: Any, level: int, started: str, load: str) -> str:
    lines = [SECTION, "", f"Written by `bench/run --pg-scale --scale {args.scale} --size-mb {args.size_mb:g} "
             f"--repeat {args.repeat}` on {started}; medians of {args.repeat}, methods interleaved. {load}", "",
             "| Shape | Measure | Ours | Baseline | Ratio | Target |", "|---|---|---|---|---|---|"]
    for shape, r in results.items():
        lines += shape_rows(shape, r, level)
    lines.append("")
    for shape, r in results.items():
        lines += details(shape, r)
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION in current:
        head, _, rest = current.partition(SECTION)
        ends = [i for i in (rest.find("\n## "), rest.find("\n<!-- ")) if i >= 0]  # the next section or marker
        tail = rest[min(ends):] if ends else ""
        current = head + text + tail.lstrip("\n")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current)


def run(args: Any, work: Path, clusters: list, load: Callable[[], str]) -> None:
    from bench.common import shipped_level

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    before = load()
    results = {shape: measure_shape(shape, args, work, clusters) for shape in ("text", "bytea")}
    (work / "pgscale.json").write_text(json.dumps(results, indent=1, default=str))
    text = section(results, args, shipped_level(), started, f"Load average {before} at the start, {load()} at the end.")
    write_section(args.output, text)
    print(text)
