"""Who may write a job's staging: the per-(service, type) lock and the writer marker of each set.

The lock is `$BACKUP_ROOT/.locks/<service>.<type>.lock` (beside, not in, the type directory,
which holds only sets), taken with `fcntl.lockf`: a POSIX record lock on the whole file.
`lockf` rather than `flock`: POSIX record locks go
through the NFS lock protocol (NLM for NFSv3, the lock state of NFSv4), so two
deployments whose workers mount the same root over NFS exclude each other; `flock`
is local to one client on many NFS clients. The kernel (or, over NFS, the server when
the client's lease ends) drops the lock when its process dies, so a killed run never
leaves a stale lock. The holder writes who it is into the file
(`pid@host since <time> (run <run_id>)`), so a run that cannot get the lock says who has it.

POSIX locks belong to a process, and closing ANY descriptor of the file drops them.
So this module keeps the one descriptor of every lock this process holds, and never
opens a held lock file again (`held_here` answers from that registry); two threads of
one process are refused as if they were two processes.

Each set being written carries a writer marker (`.writer.json`: pid, process start
time, host, boot id, run id). `writer_alive` tells whether that writer still runs:
only when it is on this host, this boot, and the pid is the same process (its start
time matches, so a reused pid does not count).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

LOCK_DIR = ".locks"
WRITER_NAME = ".writer.json"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
T = TypeVar("T")

_held: dict[Path, tuple[int, Writer]] = {}  # lock path -> (the one descriptor holding it, who holds it)
_registry = threading.Lock()
_FLOCK = "hhqqi4x"  # struct flock on Linux (64-bit off_t): type, whence, start, len, pid


class LockBusy(RuntimeError):
    """Another run holds the job's lock. The message names the holder (pid@host, since, run)."""


class LockUnavailable(RuntimeError):
    """The lock file cannot be opened or locked at all (a missing root, no lock support)."""


@dataclass(frozen=True)
class Writer:
    """The identity of a process writing staging: written to the lock file and to each set's marker."""

    pid: int
    started: int | None  # the process start time in clock ticks since boot (/proc/<pid>/stat field 22)
    host: str
    boot_id: str
    run_id: str
    since: str

    def describe(self) -> str:
        return f"{self.pid}@{self.host} since {self.since} (run {self.run_id})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Writer | None:
        try:
            data = json.loads(text)
            return cls(
                pid=int(data["pid"]), started=data.get("started"), host=str(data["host"]),
                boot_id=str(data["boot_id"]), run_id=str(data["run_id"]), since=str(data["since"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


def boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return "unknown"


def process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def current_writer(run_id: str) -> Writer:
    pid = os.getpid()
    return Writer(
        pid=pid, started=process_start(pid), host=socket.gethostname(), boot_id=boot_id(), run_id=run_id,
        since=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def writer_alive(writer: Writer) -> bool:
    """True only if `writer` is provably still running: this host, this boot, same process."""
    if writer.host != socket.gethostname() or writer.boot_id != boot_id():
        return False
    started = process_start(writer.pid)
    return started is not None and (writer.started is None or started == writer.started)


def lock_path(root: Path, service: str, backup_type: str) -> Path:
    return root / LOCK_DIR / f"{service}.{backup_type}.lock"


def held_here(path: Path) -> bool:
    with _registry:
        return path in _held


def read_holder(path: Path) -> Writer | None:
    """Who the lock file says holds it (empty once released). Never call it on a lock this process holds."""
    try:
        return Writer.from_json(path.read_text())
    except OSError:
        return None


def _busy(path: Path, what: str) -> LockBusy:
    """The error for a lock held elsewhere. Called under `_registry`; reads the file only if not held here."""
    holder = _held[path][1] if path in _held else None
    for _ in range(5):  # the holder writes its name just after locking
        holder = holder or read_holder(path)
        if holder is not None:
            break
        time.sleep(0.05)
    by = holder.describe() if holder else "another process (it has not written its name yet)"
    return LockBusy(
        f"{what} is locked by {by} ({path}): another run is writing this job's staging; "
        "this run stops rather than interleave with it (retry when that run has finished)"
    )


def try_acquire(path: Path, run_id: str, what: str) -> int:
    """Take the lock without waiting; return its descriptor. Raises LockBusy naming the holder."""
    with _registry:
        if path in _held:
            raise _busy(path, what)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise LockUnavailable(
                f"{what}: cannot open the lock file {path}: {exc.strerror} (check BACKUP_ROOT / ERP_BACKUP_ROOT)"
            ) from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise _busy(path, what) from None
            raise LockUnavailable(f"{what}: cannot lock {path}: {exc.strerror} (does this mount support locks?)") from exc
        writer = current_writer(run_id)
        _held[path] = (fd, writer)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, writer.to_json().encode(), 0)
        os.fsync(fd)
    except OSError as exc:  # e.g. a full disk: the lock holds all the same, and the run fails on its own checks
        log.warning("holding %s, but could not write our name into it: %s", path, exc)
    return fd


def release(path: Path) -> None:
    with _registry:
        held = _held.pop(path, None)
        if held is None:
            return
        fd = held[0]
        try:
            os.ftruncate(fd, 0)
        except OSError as exc:
            log.warning("could not clear the holder of %s: %s", path, exc)
        finally:
            os.close(fd)  # drops the lock


@contextmanager
def job_lock(root: Path, service: str, backup_type: str, run_id: str) -> Iterator[Path]:
    """Hold the (service, type) lock for the block; fail at once with LockBusy if another run has it."""
    path = lock_path(root, service, backup_type)
    try_acquire(path, run_id, f"backup {service}/{backup_type} under {root}")
    try:
        yield path
    finally:
        release(path)


def lock_free_or_mine(root: Path, service: str, backup_type: str) -> bool:
    """Whether no other process holds the job's lock (this process holding it counts as free).

    Asks with F_GETLK, so the probe never takes the lock and cannot make a starting run fail.
    """
    path = lock_path(root, service, backup_type)
    with _registry:
        if path in _held:
            return True
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        finally:
            os.close(fd)  # safe: this process holds no lock on this file (checked above, under the registry lock)
    return struct.unpack(_FLOCK, answer)[0] == fcntl.F_UNLCK


def write_marker(set_dir: Path, run_id: str) -> None:
    """Record this process as the writer of `set_dir` (hidden: checksum and offsite ignore dotfiles)."""
    from erp_backup.diskio import io_context
    from erp_backup.manifest import write_atomic

    path = set_dir / WRITER_NAME
    with io_context(path, set_dir=set_dir):
        write_atomic(path, current_writer(run_id).to_json().encode())


def read_marker(set_dir: Path) -> Writer | None:
    try:
        return Writer.from_json((set_dir / WRITER_NAME).read_text())
    except OSError:
        return None


def clear_marker(set_dir: Path) -> None:
    try:
        (set_dir / WRITER_NAME).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove the writer marker of %s: %s", set_dir, exc)


def holding_job_lock(backup: Callable[..., T]) -> Callable[..., T]:
    """Run a `backup(plan, job, run, ...)` step under its job's lock (LockBusy at once if taken)."""

    @functools.wraps(backup)
    def locked(plan: Any, job: Any, run: Any, *args: Any, **kwargs: Any) -> T:
        with job_lock(plan.backup_root, job.service, job.backup_type, run.run_id):
            return backup(plan, job, run, *args, **kwargs)

    return locked
