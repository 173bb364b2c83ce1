"""Streaming stages: source → compress → encrypt → hash → file, in one pass.

Each stage is a writer that passes bytes to the next one. A set directory
prepared for encryption (erp_backup.crypto: it holds `.recipients`) gets the age
stage in every chain that writes into it, whichever writer opens the chain.
The SHA-256 is of the bytes that land on disk, computed as they stream.

`stream_to_file` into an encrypted set pulls instead (`_seal_to_file`): age reads
from zstd, which reads from the source, all in the calling thread, so encryption
adds no thread and no queue.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol, cast

import zstandard
from pyrage import x25519

from erp_backup.crypto import EncryptStage, encrypt_stream, set_recipients
from erp_backup.diskio import io_context
from erp_backup.manifest import FILE_MODE, FileEntry

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """The last stage: writes to a new 0600 file and fsyncs it on close."""

    def __init__(self, path: Path):
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self._handle = os.fdopen(fd, "wb", buffering=1 << 20)
        self.size = 0

    def write(self, data: bytes) -> None:
        self._handle.write(data)
        self.size += len(data)

    def close(self) -> None:
        if self._handle.closed:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def discard(self) -> None:
        """Close without caring whether buffered bytes reach the disk: the file is being removed."""
        try:
            self._handle.close()  # closes the descriptor even when the final flush fails
        except OSError as exc:
            log.debug("%s: buffered bytes dropped on discard: %s", self.path, exc)


class HashStage:
    """Hashes the bytes passing through on their way to the next stage."""

    def __init__(self, downstream: Writer):
        self.downstream = downstream
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.downstream.write(data)

    def close(self) -> None:
        self.downstream.close()


class ZstdStage:
    """Compresses with zstd (multi-threaded frames) into the next stage."""

    def __init__(self, downstream: Writer, level: int = 3, threads: int = -1):
        self.downstream = downstream
        compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
        # zstandard only calls write() (and flush()) on the stream it is given
        self._writer = compressor.stream_writer(cast(IO[bytes], downstream), closefd=False, write_return_read=True)

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def close(self) -> None:
        self._writer.flush(zstandard.FLUSH_FRAME)
        self._writer.close()
        self.downstream.close()


class ProgressStage:
    """Counts input bytes and logs progress (bytes, MB/s) at a fixed interval."""

    def __init__(
        self,
        downstream: Writer,
        label: str,
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.downstream, self.label, self.every_s, self.clock = downstream, label, every_s, clock
        self.bytes_in = 0
        self.started = self._last = clock()

    def write(self, data: bytes) -> None:
        self.tally(len(data))
        self.downstream.write(data)

    def tally(self, size: int) -> None:
        self.bytes_in += size
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self.report(now)

    def report(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        log.info(
            "%s: %d bytes read, %.1f MB/s over %.0f s",
            self.label, self.bytes_in, self.bytes_in / elapsed / 1e6, elapsed,
        )

    def close(self) -> None:
        self.downstream.close()


@dataclass(frozen=True)
class StreamResult:
    entry: FileEntry  # the stored bytes
    raw_bytes: int
    seconds: float
    clear_sha256: str  # of the bytes before encryption (compressed, or the source's own): entry.sha256 in a clear set


class Chain:
    """A built chain. Feed it bytes, then `finish()` for the file entry."""

    def __init__(self, path: Path, relative: str, compress: bool, level: int, label: str):
        self.path, self.relative = path, relative
        self.set_dir = path.parents[len(PurePosixPath(relative).parts) - 1]
        with io_context(path, set_dir=self.set_dir, action="creating"):
            self.sink = FileSink(path)
        self.hasher = HashStage(self.sink)
        recipients = set_recipients(self.set_dir)
        self.encrypt = EncryptStage(self.hasher, recipients) if recipients else None
        self.clear_hasher = HashStage(self.encrypt) if self.encrypt else self.hasher
        sealed: Writer = self.clear_hasher
        body: Writer = ZstdStage(sealed, level=level) if compress else sealed
        self.progress = ProgressStage(body, label=label)
        self._started = time.monotonic()

    def write(self, data: bytes) -> None:
        with io_context(self.path, set_dir=self.set_dir):
            self.progress.write(data)

    def finish(self) -> StreamResult:
        with io_context(self.path, set_dir=self.set_dir):
            self.progress.close()
        seconds = time.monotonic() - self._started
        entry = FileEntry(path=self.relative, size=self.sink.size, sha256=self.hasher.digest.hexdigest())
        log.info(
            "%s: wrote %s (%d bytes from %d raw, %.1f s)",
            self.progress.label, self.relative, entry.size, self.progress.bytes_in, seconds,
        )
        return StreamResult(entry=entry, raw_bytes=self.progress.bytes_in, seconds=seconds,
                            clear_sha256=self.clear_hasher.digest.hexdigest())

    def abort(self) -> None:
        if self.encrypt is not None:
            self.encrypt.cancel()
        try:
            self.sink.discard()  # a flush error here would hide the error that made us abort
        finally:
            self.path.unlink(missing_ok=True)


def open_chain(
    set_dir: Path, relative: str, *, compress: bool = True, level: int = 3, label: str | None = None
) -> Chain:
    """Build dump → [zstd] → [age] → sha256 → file for `set_dir/relative`. `label` names it in progress logs."""
    path = set_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Chain(path, relative, compress=compress, level=level, label=label or relative)


def stream_to_file(chunks: Iterable[bytes], set_dir: Path, relative: str, **kwargs: Any) -> StreamResult:
    """Drain `chunks` through a new chain; on any error the partial file is removed.

    The source is closed either way, so a generator wrapping a process stops it.
    """
    try:
        recipients = set_recipients(set_dir)
        if recipients:
            return _seal_to_file(chunks, set_dir, relative, recipients, **kwargs)
        chain = open_chain(set_dir, relative, **kwargs)
        try:
            for chunk in chunks:
                chain.write(chunk)
            return chain.finish()
        except BaseException:
            chain.abort()
            raise
    finally:
        close = getattr(chunks, "close", None)
        if close:
            close()


class _SourceReader(io.RawIOBase):
    """`chunks` as a file to pull from (for zstd's stream_reader or age), counted as it is read.

    The source's own exception is kept in `error`, so it comes out as itself from
    under the readers that wrap it.
    """

    def __init__(self, chunks: Iterable[bytes], progress: ProgressStage):
        super().__init__()
        self._chunks, self.progress = iter(chunks), progress
        self._view = memoryview(b"")
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._view:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return 0
            except BaseException as exc:
                self.error = exc
                raise
            self.progress.tally(len(chunk))
            self._view = memoryview(chunk)
        size = min(len(buffer), len(self._view))
        buffer[:size] = self._view[:size]
        self._view = self._view[size:]
        return size


class _HashingReader(io.RawIOBase):
    """Hashes what is read through it; passes the source's kept error on."""

    def __init__(self, source: Any, origin: _SourceReader):
        super().__init__()
        self.source, self.origin, self.digest = source, origin, hashlib.sha256()

    @property
    def error(self) -> BaseException | None:
        return self.origin.error

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size if size is not None and size >= 0 else 1 << 20)
        self.digest.update(data)
        return bytes(data)


def _seal_to_file(chunks: Iterable[bytes], set_dir: Path, relative: str, recipients: Sequence[x25519.Recipient], *,
                  compress: bool = True, level: int = 3, label: str | None = None) -> StreamResult:
    """source → [zstd] → age → sha256 → file, pulled by age in this thread (no encryption thread)."""
    path = set_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with io_context(path, set_dir=set_dir, action="creating"):
        sink = FileSink(path)
    stored = HashStage(sink)
    progress = ProgressStage(sink, label=label or relative)  # only its tally: nothing is written through it
    source = _SourceReader(chunks, progress)
    body: Any = source
    if compress:
        compressor = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
        body = compressor.stream_reader(cast(IO[bytes], source), closefd=False)  # zstd's own input size (128 KiB)
    clear = _HashingReader(body, source)
    started = time.monotonic()
    try:
        with io_context(path, set_dir=set_dir):
            encrypt_stream(clear, stored, recipients)
            sink.close()
    except BaseException:
        try:
            sink.discard()  # a flush error here would hide the error that made us stop
        finally:
            path.unlink(missing_ok=True)
        raise
    seconds = time.monotonic() - started
    entry = FileEntry(path=relative, size=sink.size, sha256=stored.digest.hexdigest())
    log.info("%s: wrote %s (%d bytes from %d raw, %.1f s, sealed)", progress.label, relative, entry.size,
             progress.bytes_in, seconds)
    return StreamResult(entry=entry, raw_bytes=progress.bytes_in, seconds=seconds, clear_sha256=clear.digest.hexdigest())


def decompress_to(source: Path, target: Path) -> int:
    """Stream-decompress a .zst file into `target` (0600). Returns bytes written."""
    dctx = zstandard.ZstdDecompressor()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
        _, written = dctx.copy_stream(src, dst, read_size=1 << 20, write_size=1 << 20)
    return written
