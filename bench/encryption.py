"""Encryption overhead of the PostgreSQL full backup: bench/run-encryption [--size-mb 300] [--repeat 5].

Builds the benchmark database once, then alternates backups with and without the age
stage (bench/backup_child.py, with and without --encrypt), and compares the median wall
time and the peak memory (our process's VmHWM above its baseline, and the largest
child). Writes the "Encryption overhead" section of BENCHMARKS.md (between its markers)
and prints it. Target: at most 10 % more wall time, no more peak memory.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.benchmark import load_average, scratch_source
from bench.common import ROOT, median, write_marked_section

BEGIN, END = "<!-- encryption:begin -->", "<!-- encryption:end -->"
log = logging.getLogger("bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run-encryption", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=300, help="database size on disk in MB (default 300)")
    parser.add_argument("--repeat", type=int, default=5, help="backups of each kind, alternated (default 5)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    return parser.parse_args(argv)


def measure(port: int, work: Path, repeat: int) -> dict[str, list[dict[str, Any]]]:
    from bench.measurements import run_backup_child

    runs: dict[str, list[dict[str, Any]]] = {"clear": [], "encrypted": []}
    for i in range(repeat):
        order = ("clear", "encrypted") if i % 2 == 0 else ("encrypted", "clear")
        for kind in order:
            extra = ("--encrypt",) if kind == "encrypted" else ()
            result = run_backup_child(port, work / kind, len(runs[kind]), *extra)
            shutil.rmtree(result["set_dir"])
            runs[kind].append(result)
            log.info("%s backup %d: %.2f s, peak %d KiB over baseline", kind, i + 1, result["seconds"],
                     result["self_peak_kib"] - result["baseline_kib"])
    return runs


def section(runs: dict[str, list[dict[str, Any]]], size_mb: float, load: str) -> str:
    def stats(kind: str) -> tuple[float, int, int, int]:
        rows = runs[kind]
        return (median([r["seconds"] for r in rows]), max(r["self_peak_kib"] - r["baseline_kib"] for r in rows),
                max(max(r["children_kib"].values(), default=0) for r in rows), rows[-1]["bytes"])

    clear, sealed = stats("clear"), stats("encrypted")
    overhead = (sealed[0] / clear[0] - 1) * 100
    spans = {kind: (min(r["seconds"] for r in rows), max(r["seconds"] for r in rows)) for kind, rows in runs.items()}
    noise = (" The two ranges of wall times overlap: on this machine, at this load, the difference is within the noise."
             if spans["clear"][0] <= spans["encrypted"][1] and spans["encrypted"][0] <= spans["clear"][1] else "")
    peaks = {kind: [(r["self_peak_kib"] - r["baseline_kib"]) / 1024 for r in rows] for kind, rows in runs.items()}
    memory_noise = (" The two ranges of peak RSS overlap as well."
                    if min(peaks["clear"]) <= max(peaks["encrypted"]) and min(peaks["encrypted"]) <= max(peaks["clear"]) else "")
    lines = [
        BEGIN,
        "## Encryption overhead (PostgreSQL full backup)",
        "",
        f"`bench/run-encryption --size-mb {size_mb:g} --repeat {len(runs['clear'])}`: the same database backed up "
        "alternately with and without the age stage (zstd → age → SHA-256 → file); medians of wall time, "
        f"maxima of peak memory. Load average at the end: {load}.",
        "",
        "| | wall time (median) | our peak RSS over baseline | largest child peak RSS | stored bytes |",
        "|---|---|---|---|---|",
        f"| clear | {clear[0]:.2f} s | {clear[1] / 1024:.1f} MiB | {clear[2] / 1024:.1f} MiB | {clear[3]:,} |",
        f"| encrypted | {sealed[0]:.2f} s | {sealed[1] / 1024:.1f} MiB | {sealed[2] / 1024:.1f} MiB | {sealed[3]:,} |",
        "",
        f"Encryption adds **{overhead:+.1f} %** wall time (target ≤ 10 %) and "
        f"**{(sealed[1] - clear[1]) / 1024:+.1f} MiB** to our peak RSS (target 0; age pulls from zstd in the "
        "task's own thread: no encryption thread, no queue). Every run: " + ", ".join(
            f"{kind} " + " / ".join(f"{r['seconds']:.2f}" for r in rows) + " s" for kind, rows in runs.items()) + "." + noise
        + " Peak RSS over baseline, every run: " + ", ".join(
            f"{kind} " + " / ".join(f"{peak:.1f}" for peak in values) + " MiB" for kind, values in peaks.items())
        + "." + memory_noise,
        END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with scratch_source("enc") as (work, source):
        from bench import pgdata

        pgdata.build_database(source, "erp_bench", args.size_mb)
        runs = measure(source.port, work, args.repeat)
    text = section(runs, args.size_mb, load_average())
    write_marked_section(args.output, text, BEGIN, END)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
