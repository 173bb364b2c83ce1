"""The machine under the benchmark: its facts for the report, and the peak memory of a process tree."""

from __future__ import annotations

import platform
import subprocess
import threading
from datetime import UTC, datetime

from bench.common import MIB

# A child seen between fork and exec still reports its parent's memory; pg_wrapper (perl) execs pg_dump.
NOT_YET_EXECUTED = ("python", "perl", "bash", "sh")


def machine_info() -> dict[str, str]:
    import zstandard

    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
        cpuinfo = handle.read()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               "unknown")
    with open("/proc/meminfo", encoding="ascii") as handle:
        mem_kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
    return {
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "cpu": cpu + (" (SHA-NI)" if " sha_ni" in cpuinfo else ""),
        "ram": f"{mem_kib / MIB:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pg_dump": subprocess.run(["pg_dump", "--version"], capture_output=True, text=True).stdout.strip(),
        "zstandard": zstandard.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def read_kib(pid: int, field_name: str) -> tuple[str, int] | None:
    """(process name, value in KiB) of a /proc/<pid>/status field; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            name, value = "", None
            for line in handle:
                if line.startswith("Name:"):
                    name = line.split(None, 1)[1].strip()
                elif line.startswith(field_name + ":"):
                    value = int(line.split()[1])
            return (name, value) if value is not None else None
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


class TreeSampler:
    """Polls the descendants of a process and keeps each program's highest VmHWM (KiB)."""

    def __init__(self, pid: int, every_s: float = 0.1):
        self.pid, self.every_s = pid, every_s
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                found = read_kib(child.pid, "VmHWM")
                if found and not found[0].startswith(NOT_YET_EXECUTED):
                    self.peaks[found[0]] = max(self.peaks.get(found[0], 0), found[1])
            self._stop.wait(self.every_s)
