"""What every part of the benchmark shares: paths, units, the results record and the subprocess helpers.

Imports nothing from Airflow or erp_backup at module level: `bench/benchmark.py` points
Airflow at a throwaway home before anything imports it.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PYTHON = sys.executable
MB = 1_000_000
MIB = 1 << 20
RESULT_MARKER = "BENCH_RESULT "  # the line a child process prints its JSON result on


class BenchError(RuntimeError):
    pass


@dataclass
class Results:
    """Everything one run measured, phase by phase; the report is written from it."""

    args: argparse.Namespace
    machine: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    backup: dict[str, Any] = field(default_factory=dict)
    rss: dict[str, Any] = field(default_factory=dict)
    restore: dict[str, Any] = field(default_factory=dict)
    checksum: dict[str, Any] = field(default_factory=dict)
    offsite: dict[str, Any] = field(default_factory=dict)
    dags: dict[str, Any] = field(default_factory=dict)
    diagnose: dict[str, Any] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    load: dict[str, str] = field(default_factory=dict)


@cache
def shipped_level() -> int:
    """The zstd level the project ships for PostgreSQL: what the backup benchmark measures."""
    from erp_backup.plan import load_plan

    return int(load_plan().job("postgres", "full").options.get("compress_level", 3))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def shell(script: str, *, what: str, check: bool = True) -> tuple[float, str]:
    """Run a bash pipeline (pipefail); return (seconds, stderr)."""
    clock = time.monotonic()
    done = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, text=True)
    seconds = time.monotonic() - clock
    if check and done.returncode != 0:
        raise BenchError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return seconds, done.stderr


def child_result(stdout: str, what: str) -> dict[str, Any]:
    """The JSON a child process printed after RESULT_MARKER."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARKER):])
            return result
    raise BenchError(f"{what}: no result line in its output:\n{stdout[-2000:]}")


def backup_id(index: int) -> str:
    return (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=index)).strftime("%Y%m%dT%H%M%SZ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pg_args(port: int) -> str:
    return f"-h 127.0.0.1 -p {port} -U postgres"


def write_marked_section(path: Path, text: str, begin: str, end: str) -> None:
    """Put `text` (which starts with `begin` and ends with `end`) in place of that section of `path`, else append it."""
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end) + "\n?", re.S)
    path.write_text(pattern.sub(lambda _: text, current) if pattern.search(current)
                    else current.rstrip("\n") + "\n\n" + text, encoding="utf-8")
