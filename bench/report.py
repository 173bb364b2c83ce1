"""BENCHMARKS.md and the console summary: the targets, the summary table, the detail sections.

The "## Notes" section already in the output file is written by hand and kept as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import MB, MIB, Results, median, shipped_level

# Targets (see BENCHMARKS.md).
BACKUP_VS_FLOOR_MAX = 1.15
OUTPUT_VS_SEED_MAX = 0.45
PEAK_RSS_MAX_MIB = 256
PEAK_RSS_FLAT_GROWTH = 0.10  # the larger database may add at most 10% to the peak
CHECKSUM_VS_SHA256SUM_MIN = 0.8
DAG_PARSE_MAX_S = 0.3

NOTES_PLACEHOLDER = """## Notes

(Written by hand after reading the numbers: why a target is missed and what would fix it.
`bench/run` keeps this section when it rewrites the file.)
"""

SummaryRow = tuple[str, str, str, str, str]  # measure, ours, baseline, ratio, target + verdict


def spread(values: list[float], unit: str = "s", digits: int = 2) -> str:
    """`median (min–max)`."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} {unit}"
    return f"{median(values):.{digits}f} {unit} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def mib(kib: float) -> float:
    return kib / 1024


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------


def backup_rows(res: Results) -> list[SummaryRow]:
    b = res.backup
    ours_s, floor_s, seed_s = median(b["ours_seconds"]), median(b["floor_seconds"]), median(b["seed_seconds"])
    size_ratio = b["ours_bytes"] / b["seed_bytes"]
    return [
        ("Backup wall time vs floor `pg_dumpall > /dev/null`", f"{ours_s:.2f} s", f"{floor_s:.2f} s",
         f"{ours_s / floor_s:.2f}×", f"≤ {BACKUP_VS_FLOOR_MAX}× {verdict(ours_s / floor_s <= BACKUP_VS_FLOOR_MAX)}"),
        ("Backup wall time vs seed `pg_dumpall | gzip`", f"{ours_s:.2f} s", f"{seed_s:.2f} s",
         f"{ours_s / seed_s:.2f}×", "info"),
        ("Backup output size vs seed", f"{b['ours_bytes'] / MB:.1f} MB", f"{b['seed_bytes'] / MB:.1f} MB",
         f"{size_ratio:.2f}×", f"≤ {OUTPUT_VS_SEED_MAX}× {verdict(size_ratio <= OUTPUT_VS_SEED_MAX)}"),
    ]


def restore_rows(res: Results) -> list[SummaryRow]:
    r = res.restore
    ours_r = median(r["ours_seconds"])
    rows: list[SummaryRow] = []
    for name, label in (("pg_restore", f"`pg_restore -j{r['jobs']}` of `pg_dump -Fc`"), ("seed", "seed `gunzip | psql`")):
        base = median(r[f"{name}_seconds"])
        rows.append((f"Restore (incl. our verification) vs {label}", f"{ours_r:.2f} s", f"{base:.2f} s",
                     f"{ours_r / base:.2f}×", "info"))
    return rows


def rss_row(res: Results) -> SummaryRow:
    small_peak = max(x["self_peak_kib"] for x in res.rss["small"])
    large_peak = max(x["self_peak_kib"] for x in res.rss["large"])
    flat = large_peak <= small_peak * (1 + PEAK_RSS_FLAT_GROWTH)
    return (f"Backup task peak RSS, {res.data['large_mb']:.0f} MB vs {res.data['small_mb']:.0f} MB database",
            f"{mib(large_peak):.0f} MiB", f"{mib(small_peak):.0f} MiB", f"{large_peak / small_peak:.2f}×",
            f"≤ {PEAK_RSS_MAX_MIB} MiB, flat {verdict(flat and mib(large_peak) <= PEAK_RSS_MAX_MIB)}")


def checksum_rows(res: Results) -> list[SummaryRow]:
    c = res.checksum
    rows: list[SummaryRow] = []
    for case, label in (("big", f"{c['big_bytes'] / MIB:.0f} MiB file"), ("set", "backup set")):
        ours_tp = c[f"{case}_bytes"] / median(c[f"{case}_ours"]) / MB
        base_tp = c[f"{case}_bytes"] / median(c[f"{case}_sha256sum"]) / MB
        target = (f"≥ {CHECKSUM_VS_SHA256SUM_MIN}× {verdict(ours_tp / base_tp >= CHECKSUM_VS_SHA256SUM_MIN)}"
                  if case == "big" else "info")
        rows.append((f"Checksum throughput vs `sha256sum` ({label})", f"{ours_tp:.0f} MB/s", f"{base_tp:.0f} MB/s",
                     f"{ours_tp / base_tp:.2f}×", target))
    return rows


def offsite_row(res: Results) -> SummaryRow:
    ours_u, boto_u = median(res.offsite["ours"]), median(res.offsite["boto3"])
    return ("Offsite upload vs boto3 `upload_file` (moto)", f"{ours_u:.2f} s", f"{boto_u:.2f} s",
            f"{ours_u / boto_u:.2f}×", "info")


def dag_rows(res: Results) -> list[SummaryRow]:
    rows: list[SummaryRow] = []
    for name, entry in res.dags.items():
        seconds = median(entry["seconds"])
        rows.append((f"DAG parse `dags/{name}` ({entry['dags']} DAGs)", f"{seconds:.3f} s", "", "",
                     f"≤ {DAG_PARSE_MAX_S} s {verdict(seconds <= DAG_PARSE_MAX_S and not entry['import_errors'])}"))
    return rows


def summary_rows(res: Results) -> list[SummaryRow]:
    """(measure, ours, baseline, ratio, target + verdict) rows."""
    return [*backup_rows(res), *restore_rows(res), rss_row(res), *checksum_rows(res), offsite_row(res),
            *dag_rows(res)]


# ---------------------------------------------------------------------------
# BENCHMARKS.md sections, each ending with a blank line
# ---------------------------------------------------------------------------


def heading(res: Results) -> list[str]:
    a, m = res.args, res.machine
    return [
        "# Benchmarks",
        "",
        f"Written by `bench/run --size-mb {a.size_mb:g} --repeat {a.repeat}` on {m['date']} "
        f"(whole run {res.phase_seconds.get('total', 0) / 60:.1f} min). Not part of the test suite.",
        "",
        "**Measured on a shared machine**: other engineers' test suites were running on the same 2 cores "
        f"(load average {res.load.get('start', '?')} at the start, {res.load.get('end', '?')} at the end), "
        "so every number is noisy. Values are medians of the repeats, with (min–max) in the details.",
        "",
    ]


def machine_section(res: Results) -> list[str]:
    m = res.machine
    return [
        "## Machine",
        "",
        "| | |", "|---|---|",
        f"| CPUs (`nproc`) | {m['nproc']} |",
        f"| CPU | {m['cpu']} |",
        f"| RAM | {m['ram']} |",
        f"| Kernel | {m['kernel']} |",
        f"| PostgreSQL | {res.data['server_version']}; client `{m['pg_dump']}` |",
        f"| Python | {m['python']} (zstandard {m['zstandard']}) |",
        f"| Date | {m['date']} |",
        "",
    ]


def data_section(res: Results) -> list[str]:
    d, b = res.data, res.backup
    return [
        "## Data",
        "",
        "Scratch clusters (initdb + pg_ctl as user postgres, 127.0.0.1, shared_buffers 256MB, "
        "max_wal_size 4GB), never the shared server. Database `erp_bench`, schema `erp`: customers, products "
        "(every third with a 3 KiB random thumbnail), orders, order lines, invoices (2 KiB random + 1 KiB "
        "repetitive PDF-like bytea each), audit log (jsonb); primary keys, foreign keys, 7 secondary indexes; "
        "text, numeric, jsonb, timestamptz, bytea. Built with generate_series.",
        "",
        "| | requested | on disk (pg_database_size) | rows | built in |", "|---|---|---|---|---|",
        f"| large (all comparisons) | {d['large_mb']:.0f} MB | {d['large_bytes'] / MB:.0f} MB | {d['large_rows']:,} | {d['large_seconds']:.0f} s |",
        f"| small (peak RSS only) | {d['small_mb']:.0f} MB | {d['small_bytes'] / MB:.0f} MB | {d['small_rows']:,} | {d['small_seconds']:.0f} s |",
        "",
        f"Dump sizes of the large cluster: plain `pg_dumpall` {b['plain_bytes'] / MB:.1f} MB; our "
        f"`pg_dump -Fc -Z0` streams {b['ours_raw_bytes'] / MB:.1f} MB raw.",
        "",
    ]


def summary_section(res: Results) -> list[str]:
    return [
        "## Summary",
        "",
        "| Measure | Ours | Baseline | Ratio | Target |", "|---|---|---|---|---|",
        *["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in summary_rows(res)],
        "",
    ]


def backup_details(res: Results) -> list[str]:
    b = res.backup
    return [
        "## Details",
        "",
        "### Backup (whole large cluster: globals + every database)",
        "",
        "| Method | Wall time | Output |", "|---|---|---|",
        f"| Ours: `postgres.backup(ctx)` + manifest, in a task-like process | {spread(b['ours_seconds'])} | "
        f"{b['ours_bytes'] / MB:.1f} MB (zstd level {shipped_level()}, {b['ours_bytes'] / b['ours_raw_bytes']:.3f} of raw) |",
        f"| Ours, whole process incl. Python start and imports | {spread(b['ours_process_seconds'])} | |",
        f"| Ours, pg_dump streams only (sum over databases) | {spread(b['ours_dump_seconds'])} | |",
        f"| Seed: `pg_dumpall \\| gzip` (gzip -6) | {spread(b['seed_seconds'])} | {b['seed_bytes'] / MB:.1f} MB "
        f"({b['seed_bytes'] / b['plain_bytes']:.3f} of plain) |",
        f"| Floor: `pg_dumpall > /dev/null` | {spread(b['floor_seconds'])} | ({b['plain_bytes'] / MB:.1f} MB plain) |",
        "",
        "Our time is measured inside the backup process around `postgres.backup(ctx)` and the manifest write "
        "(the Airflow task's own start-up is not part of a backup). It includes the table inventory that runs "
        "in the dump's snapshot, zstd, SHA-256 and the fsync of every file.",
        "",
    ]


def rss_line(label: str, size: int, runs: list[dict[str, Any]]) -> str:
    """One database's row: the task's peak over the repeats, its RSS after imports, each child's peak."""
    peak = max(x["self_peak_kib"] for x in runs)
    base = min(x["baseline_kib"] for x in runs)
    children: dict[str, int] = {}
    for x in runs:
        for name, kib in x["children_kib"].items():
            children[name] = max(children.get(name, 0), kib)
    kids = ", ".join(f"{name} {mib(kib):.0f} MiB" for name, kib in sorted(children.items())) or "none seen"
    return (f"| {label} ({size / MB:.0f} MB) | {mib(peak):.0f} MiB | {mib(base):.0f} MiB | "
            f"{mib(peak - base):.0f} MiB | {kids} |")


def rss_details(res: Results) -> list[str]:
    d = res.data
    return [
        "### Peak RSS of the backup task",
        "",
        "Backup run in a subprocess (as the Airflow task, with `airflow.sdk` imported); its VmHWM, its RSS after "
        "imports, and each child program's VmHWM sampled every 0.1 s from /proc (pg_dump, pg_dumpall). "
        "Maximum over the repeats.",
        "",
        "| Database | Task peak (VmHWM) | Task RSS after imports | Added by the backup | Children |",
        "|---|---|---|---|---|",
        rss_line("small", d["small_bytes"], res.rss["small"]),
        rss_line("large", d["large_bytes"], res.rss["large"]),
        "",
    ]


def restore_details(res: Results) -> list[str]:
    r = res.restore
    return [
        f"### Restore (into a fresh scratch cluster each time, jobs = {r['jobs']})",
        "",
        "| Method | Wall time |", "|---|---|",
        f"| Ours: `postgres.restore` (globals, decompress, pg_restore, row counts + content hashes) | {spread(r['ours_seconds'])} |",
        *[f"| — ours, step `{step}` | {spread(values)} |" for step, values in r["ours_steps"].items()],
        f"| `psql` globals + `pg_restore -j{r['jobs']} --create` of `pg_dump -Fc` files | {spread(r['pg_restore_seconds'])} |",
        f"| Seed: `gunzip \\| psql` of the `pg_dumpall \\| gzip` file | {spread(r['seed_seconds'])} |",
        "",
        "Cluster creation is not timed. Every restore is checked afterwards (row counts of three tables).",
        "",
    ]


def checksum_details(res: Results) -> list[str]:
    c = res.checksum
    return [
        "### Checksum verification",
        "",
        "| Input | `find_problems` (sha256_file) | `sha256sum` |", "|---|---|---|",
        f"| backup set, {c['set_bytes'] / MB:.1f} MB | {spread(c['set_ours'], digits=3)} | {spread(c['set_sha256sum'], digits=3)} |",
        f"| generated file, {c['big_bytes'] / MIB:.0f} MiB | {spread(c['big_ours'], digits=3)} | {spread(c['big_sha256sum'], digits=3)} |",
        "",
        "Page cache warm (one unmeasured round first), so this compares hashing, not the disk.",
        "",
    ]


def offsite_details(res: Results) -> list[str]:
    o = res.offsite
    return [
        "### Offsite upload",
        "",
        f"{o['files']} objects, {o['bytes'] / MB:.1f} MB, to moto_server (own process) on 127.0.0.1.",
        "",
        "| Method | Wall time |", "|---|---|",
        f"| `S3Offsite.upload_set` (SHA-256 checksums, head + verify each object, manifest last, receipt) | {spread(o['ours'])} |",
        f"| boto3 `upload_file` per file, default TransferConfig | {spread(o['boto3'])} |",
        "",
    ]


def dag_details(res: Results) -> list[str]:
    return [
        "### DAG parse time",
        "",
        "`DagBag(dag_folder=<file>)` in a fresh process with Airflow already imported (as the DAG processor "
        "does), so the time is the file's own imports and DAG building.",
        "",
        "| File | DAGs | Parse time | Import errors |", "|---|---|---|---|",
        *[f"| `dags/{name}` | {e['dags']} | {spread(e['seconds'], digits=3)} | {len(e['import_errors'])} |"
          for name, e in res.dags.items()],
        "",
    ]


def diagnose_details(res: Results) -> list[str]:
    """Only with `--diagnose`: backup variants, compressors on a sample, DAG parse with the costs paid first."""
    if not res.diagnose:
        return []
    b, dg = res.backup, res.diagnose
    return [
        "### Diagnostics (`--diagnose`)",
        "",
        "| Backup variant (same process and data as above) | Wall time | Output | Task peak RSS |",
        "|---|---|---|---|",
        f"| as shipped (zstd level {shipped_level()}, inventory) | {spread(b['ours_seconds'])} | {b['ours_bytes'] / MB:.1f} MB | "
        f"{mib(max(x['self_peak_kib'] for x in res.rss['large'])):.0f} MiB |",
        *[f"| {name} | {spread(v['seconds'])} | {v['bytes'] / MB:.1f} MB | {mib(v['peak_kib']):.0f} MiB |"
          for name, v in dg["variants"].items()],
        f"| floor `pg_dumpall > /dev/null` | {spread(b['floor_seconds'])} | | |",
        "",
        f"Compressors on the first {dg['sample_bytes'] / MIB:.0f} MiB of our raw `pg_dump -Fc -Z0` of `erp_bench`, "
        "one run each (zstd in memory with threads=-1; gzip from the page cache):",
        "",
        "| Compressor | Output / input | Time |", "|---|---|---|",
        *[f"| {name} | {v['bytes'] / dg['sample_bytes']:.3f} | {v['seconds']:.2f} s |"
          for name, v in dg["levels"].items()],
        "",
        "DAG parse with the two parse-time costs paid first, in the same fresh process "
        "(`dag_parse_child.py --preload`):",
        "",
        "| File | Parse time, rest of the file | Slack notifier import | First Asset with a URI |",
        "|---|---|---|---|",
        *[f"| `dags/{name}` | {spread(v['seconds'], digits=3)} | {spread(v['slack_notifier_import'], digits=3)} | "
          f"{spread(v['first_asset_uri'], digits=3)} |" for name, v in dg["parse"].items()],
        "",
    ]


def phases_section(res: Results) -> list[str]:
    return [
        "### Phases of this run",
        "",
        "| Phase | Seconds |", "|---|---|",
        *[f"| {name} | {seconds:.0f} |" for name, seconds in res.phase_seconds.items()],
        "",
    ]


def markdown(res: Results, notes: str) -> str:
    sections = (heading, machine_section, data_section, summary_section, backup_details, rss_details,
                restore_details, checksum_details, offsite_details, dag_details, diagnose_details, phases_section)
    lines = [line for section in sections for line in section(res)]
    return "\n".join(lines) + "\n" + notes


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def existing_notes(path: Path) -> str:
    """The "## Notes" section of the file the report replaces, or a placeholder asking for one."""
    if path.exists():
        text = path.read_text(encoding="utf-8")
        index = text.find("\n## Notes")
        if index >= 0:
            return text[index + 1:]
    return NOTES_PLACEHOLDER


def write_report(res: Results, path: Path) -> None:
    """Rewrite `path` from the results, keeping its hand-written Notes."""
    path.write_text(markdown(res, existing_notes(path)), encoding="utf-8")


def print_summary(res: Results) -> None:
    rows = summary_rows(res)
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
