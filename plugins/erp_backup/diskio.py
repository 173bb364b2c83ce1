"""I/O errors with context: every OSError on staging names the set, the file and the free space.

`io_context` wraps a block that reads or writes a set's files. An OSError escaping it
becomes a `StagingIOError`: still an OSError with the same errno (callers that test
`errno.ENOSPC` keep working), but its message reads

    disk full: writing SHA256SUMS of set postgres/full/20260301T170000Z under /backup: 0 bytes free ...

for ENOSPC (and EDQUOT), and `I/O error reading <file> of set <key> ...` otherwise.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class StagingIOError(OSError):
    """An OSError on staging, with the set, the file and the free space in its message."""

    def __init__(self, cause: OSError, message: str, *, set_key: str, path: Path, free: int | None) -> None:
        super().__init__(cause.errno, message)
        self.filename = str(path)
        self.set_key, self.path, self.free = set_key, path, free

    def __str__(self) -> str:
        return self.strerror or ""

    @property
    def disk_full(self) -> bool:
        return self.errno in _FULL


def set_key_of(set_dir: Path) -> str:
    """`service/type/backup_id` of a set directory."""
    return "/".join(set_dir.parts[-3:])


def free_bytes(path: Path) -> int | None:
    """Free bytes (for this user) on the filesystem holding `path` or its nearest existing parent."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def describe(cause: OSError, path: Path, *, set_dir: Path, action: str, free: int | None = None) -> str:
    """The message; `free` is the free space read once by the caller (else read here)."""
    try:
        relative = path.relative_to(set_dir).as_posix()
    except ValueError:
        relative = str(path)
    relative = "the set directory" if relative == "." else relative
    root = set_dir.parents[2] if len(set_dir.parts) > 3 else set_dir
    free = free_bytes(set_dir) if free is None else free
    free_text = f"{free} bytes free" if free is not None else "free space unknown"
    reason = os.strerror(cause.errno) if cause.errno else str(cause)
    where = f"{action} {relative} of set {set_key_of(set_dir)} under {root}"
    if cause.errno in _FULL:
        return f"disk full: {where}: {free_text} ([Errno {cause.errno}] {reason})"
    return f"I/O error {where}: [Errno {cause.errno}] {reason} ({free_text})"


@contextmanager
def io_context(path: Path, *, set_dir: Path, action: str = "writing") -> Iterator[None]:
    """Re-raise an OSError of the block as a StagingIOError naming `path`, its set and the free space."""
    try:
        yield
    except StagingIOError:
        raise
    except OSError as exc:
        failed = Path(exc.filename) if isinstance(exc.filename, str) and exc.filename else path
        free = free_bytes(set_dir)  # once: the message and the attribute agree on a disk others write to
        message = describe(exc, failed, set_dir=set_dir, action=action, free=free)
        raise StagingIOError(exc, message, set_key=set_key_of(set_dir), path=failed, free=free) from exc
