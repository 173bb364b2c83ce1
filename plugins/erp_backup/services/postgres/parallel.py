"""The directory layout of a database dump: ``pg_dump -Fd -j N`` out, ``pg_restore -j N`` back in.

Databases at or above the plan's ``parallel_dump_min_mb`` are dumped this way, with
``dump_jobs`` workers (default: the worker's cores); smaller ones keep the single
``-Fc`` stream. The set then holds ``databases/<name>.dir/<file>.zst``: every file
of the dump directory (``toc.dat``, ``<id>.dat`` per table, ``blobs.toc`` and
``blob_<oid>.dat``), each compressed and hashed through the shared stream chain.

pg_dump writes each file itself, so the files land in a spool directory inside the
set first. ``--verbose`` reports every finished item; that item's file is then
compressed at once and its raw copy removed, while the other workers go on. The
spool holds only the files being written (about the largest `jobs` tables).

A restore decompresses the directory into a temp directory, `jobs` files at a
time, and runs ``pg_restore -j``: pg_restore 15 refuses named pipes ("is not a
regular file"), so unlike the dump this needs the raw size in temp space.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erp_backup.manifest import FileEntry
from erp_backup.runner import stderr_lines
from erp_backup.services.postgres.commands import PgEndpoint, dump_dir_for, pg_dump_directory_command
from erp_backup.stream import decompress_to, stream_to_file

log = logging.getLogger(__name__)

LAYOUT_DIRECTORY = "directory"
LAYOUT_CUSTOM = "custom"
DEFAULT_MIN_MB = 1024
_FINISHED = re.compile(r"^pg_dump: finished item (\d+) (.*)$")
_READ = 1 << 20


@dataclass(frozen=True)
class DumpFiles:
    """What a database dump wrote into the set."""

    entries: list[FileEntry]
    file: str  # the .dump.zst file, or the .dir directory
    layout: str
    raw_bytes: int
    seconds: float
    jobs: int = 1


def layout_for(size_bytes: int, options: Mapping[str, Any]) -> tuple[str, int]:
    """(layout, jobs) of a database of `size_bytes` under the plan's options (exec_mode network only)."""
    jobs = int(options.get("dump_jobs") or os.cpu_count() or 1)
    threshold = float(options.get("parallel_dump_min_mb", DEFAULT_MIN_MB)) * 1024 * 1024
    if options.get("exec_mode", "network") != "network" or jobs < 1 or size_bytes < threshold:
        return LAYOUT_CUSTOM, 1
    return LAYOUT_DIRECTORY, jobs


class _Compressor:
    """Compresses finished spool files into the set, one at a time, in a thread, removing each raw file."""

    def __init__(self, spool: Path, set_dir: Path, relative_dir: str, level: int, label: str):
        self.spool, self.set_dir, self.relative_dir, self.level, self.label = spool, set_dir, relative_dir, level, label
        self.entries: list[FileEntry] = []
        self.raw_bytes = 0
        self._queued: set[str] = set()
        self._todo: queue.Queue[str | None] = queue.Queue()
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-dir-compress", daemon=True)
        self._thread.start()

    def add(self, name: str) -> None:
        if name not in self._queued and (self.spool / name).is_file():
            self._queued.add(name)
            self._todo.put(name)

    def finished_item(self, dump_id: int, what: str) -> None:
        if what.startswith("BLOBS "):
            for path in sorted(self.spool.glob("blob_*.dat")):
                self.add(path.name)
            self.add("blobs.toc")
        else:
            self.add(f"{dump_id}.dat")

    def _chunks(self, path: Path) -> Iterator[bytes]:
        with open(path, "rb") as handle:
            while chunk := handle.read(_READ):
                yield chunk

    def _run(self) -> None:
        while (name := self._todo.get()) is not None:
            if self._error is not None or self._cancelled.is_set():
                continue
            try:
                raw = self.spool / name
                result = stream_to_file(self._chunks(raw), self.set_dir, f"{self.relative_dir}/{name}.zst",
                                        compress=True, level=self.level, label=f"{self.label} {name}")
                raw.unlink()
                self.entries.append(result.entry)
                self.raw_bytes += result.raw_bytes
            except BaseException as exc:  # reported by finish(), in the dumping thread
                self._error = exc

    def finish(self) -> None:
        """After pg_dump succeeded: the remaining files (toc.dat last), then wait; re-raise a compression error."""
        for path in sorted(self.spool.iterdir(), key=lambda p: (p.name == "toc.dat", p.name)):
            self.add(path.name)
        self.stop()
        if self._error is not None:
            raise self._error

    def stop(self, cancel: bool = False) -> None:
        if cancel:
            self._cancelled.set()
        self._todo.put(None)
        self._thread.join()


def dump_directory(endpoint: PgEndpoint, dbname: str, snapshot: str, set_dir: Path, *, jobs: int, level: int,
                   bindir: str | None, label: str) -> DumpFiles:
    """pg_dump -Fd -j `jobs` from `snapshot`; each file compressed into the set as soon as it is finished."""
    relative_dir = dump_dir_for(dbname)
    spool_root = set_dir / f".spool-{uuid.uuid4().hex[:8]}"
    spool_root.mkdir(mode=0o700)
    spool = spool_root / "dump"
    started = time.monotonic()
    command = pg_dump_directory_command(endpoint, dbname, snapshot, spool, jobs=jobs, bindir=bindir)
    compressor = _Compressor(spool, set_dir, relative_dir, level, label)
    try:
        for line in stderr_lines(command):
            match = _FINISHED.match(line)
            if match:
                compressor.finished_item(int(match.group(1)), match.group(2))
        compressor.finish()
    except BaseException:
        compressor.stop(cancel=True)
        shutil.rmtree(set_dir / relative_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(spool_root, ignore_errors=True)
    entries = sorted(compressor.entries, key=lambda e: e.path)
    return DumpFiles(entries, relative_dir, LAYOUT_DIRECTORY, compressor.raw_bytes, time.monotonic() - started, jobs)


# ---------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------


@contextmanager
def restorable_directory(set_dir: Path, files: list[str], work: Path, jobs: int) -> Iterator[tuple[Path, int]]:
    """The dump directory decompressed under `work`, `jobs` files at a time: (directory, raw bytes).

    pg_restore 15 reads only regular files ("... is not a regular file" for a pipe),
    so the directory is decompressed in full; it is removed when the block ends.
    """
    directory = work / "dump"
    directory.mkdir(mode=0o700)
    try:
        with ThreadPoolExecutor(max_workers=max(jobs, 1), thread_name_prefix="pg-restore-unzstd") as pool:
            sizes = pool.map(lambda f: decompress_to(set_dir / f, directory / Path(f).name.removesuffix(".zst")),
                             files)
            total = sum(sizes)
        yield directory, total
    finally:
        shutil.rmtree(directory, ignore_errors=True)
