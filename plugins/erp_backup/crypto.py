"""age encryption (X25519, via pyrage): keys, the stream stage, and decrypting files.

Who holds which key:

- the recipients (public keys) come from an Airflow connection; workers hold only them;
- the identity (private key) comes from another connection, or a file given to the
  restore CLI, and is needed only to restore and by the drill;
- each set is also sealed for a *staging* recipient whose identity lives in the set
  directory until its checksum task has verified the set through it
  (erp_backup.sealing), and is then deleted: after checksum, nothing on the worker
  can read the set.

A set directory that holds `.recipients` is encrypted: every file the stream chain
(erp_backup.stream) writes into it passes through `EncryptStage`. Recipient
fingerprints (`fingerprint`) name keys in errors and manifests; they are the first 16
hex digits of the SHA-256 of the recipient string.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyrage
from pyrage import x25519

from erp_backup.manifest import FILE_MODE, HASH_CHUNK

RECIPIENTS_FILE = ".recipients"  # public keys this set is sealed for, one a line
STAGING_IDENTITY_FILE = ".staging-identity"  # deleted once the checksum task verified the set
QUEUE_CHUNKS = 4
PUT_WAIT_S = 0.5


class EncryptionError(RuntimeError):
    """Keys are missing or malformed, or a set cannot be decrypted with the identity given."""


def fingerprint(recipient: str) -> str:
    return hashlib.sha256(recipient.strip().encode("ascii")).hexdigest()[:16]


def _split_keys(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part and not part.startswith("#")]


def parse_recipients(text: str | Iterable[str], where: str) -> list[str]:
    """age X25519 recipients (`age1...`), checked; EncryptionError naming `where` otherwise."""
    keys = _split_keys(text) if isinstance(text, str) else [key.strip() for key in text if key.strip()]
    if not keys:
        raise EncryptionError(f"{where}: no age recipients (age1...) given")
    for key in keys:
        try:
            x25519.Recipient.from_str(key)
        except pyrage.RecipientError as exc:
            raise EncryptionError(f"{where}: not an age X25519 recipient: {key[:12]}... ({exc})") from exc
    return keys


def parse_identities(text: str, where: str) -> list[x25519.Identity]:
    """age X25519 identities (`AGE-SECRET-KEY-1...`, as `age-keygen` writes them; comments allowed)."""
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise EncryptionError(f"{where}: no age identity (AGE-SECRET-KEY-1...) in it")
    identities = []
    for key in keys:
        try:
            identities.append(x25519.Identity.from_str(key))
        except pyrage.IdentityError as exc:
            raise EncryptionError(f"{where}: a line is not an age X25519 identity ({exc})") from exc
    return identities


def identity_fingerprints(identities: Sequence[x25519.Identity]) -> list[str]:
    return [fingerprint(str(identity.to_public())) for identity in identities]


def recipients_from_connection(conn_id: str, get_connection: Callable[[str], Any]) -> list[str]:
    """The recipients in connection `conn_id`: `extra.recipients` (a list or a string), else its password."""
    from erp_backup.services.base import connection_for

    conn = connection_for(conn_id, get_connection)
    extra = conn.extra_dejson if hasattr(conn, "extra_dejson") else {}
    value = extra.get("recipients") or conn.password or ""
    return parse_recipients(value, f"connection {conn_id!r}")


def identities_from_connection(conn_id: str, get_connection: Callable[[str], Any]) -> list[x25519.Identity]:
    """The identities in connection `conn_id`'s password (one a line: the current key, then older ones)."""
    from erp_backup.services.base import connection_for

    conn = connection_for(conn_id, get_connection)
    return parse_identities(conn.password or "", f"connection {conn_id!r} (password)")


def identities_from_file(path: Path) -> list[x25519.Identity]:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise EncryptionError(f"identity file {path}: cannot read it: {exc}") from exc
    return parse_identities(text, f"identity file {path}")


# ───────────────────────── a set's keys on staging ─────────────────────────


def prepare_set(set_dir: Path, recipients: Sequence[str]) -> None:
    """Make `set_dir` an encrypted set: its recipients plus a fresh staging identity (0600)."""
    staging = x25519.Identity.generate()
    _write_private(set_dir / STAGING_IDENTITY_FILE, f"{staging}\n")
    _write_private(set_dir / RECIPIENTS_FILE, "".join(f"{key}\n" for key in [*recipients, str(staging.to_public())]))


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def set_recipients(set_dir: Path) -> list[x25519.Recipient]:
    """The recipients the chain encrypts for in `set_dir`; empty when the set is not encrypted."""
    path = set_dir / RECIPIENTS_FILE
    if not path.is_file():
        return []
    return [x25519.Recipient.from_str(key) for key in _split_keys(path.read_text(encoding="ascii"))]


def staging_identity(set_dir: Path) -> x25519.Identity | None:
    path = set_dir / STAGING_IDENTITY_FILE
    if not path.is_file():
        return None
    return parse_identities(path.read_text(encoding="ascii"), str(path))[0]


@contextmanager
def clear_view(set_dir: Path, path: Path) -> Iterator[Path]:
    """`path` as clear bytes while a backup still runs: itself in a clear set, else a hidden decrypted copy.

    For a service that checks what it just wrote (pg_verifybackup on the base tar); the
    copy is removed on exit, and after checksum no staging identity is left to make one.
    """
    identity = staging_identity(set_dir)
    if identity is None:
        yield path
        return
    copy = set_dir / f".clear-{path.name}"
    try:
        decrypt_file(path, copy, [identity])
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def forget_staging_keys(set_dir: Path) -> None:
    for name in (STAGING_IDENTITY_FILE, RECIPIENTS_FILE):
        (set_dir / name).unlink(missing_ok=True)


# ───────────────────────── the stream stage ─────────────────────────


class _Pipe(io.RawIOBase):
    """What pyrage reads from: the chunks `EncryptStage.write` queues, without copying them twice."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._view = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while not self._view and not self._eof:
            chunk = self.chunks.get()
            if chunk is None:
                self._eof = True
            else:
                self._view = memoryview(chunk)
        size = len(self._view) if size is None or size < 0 else size
        piece, self._view = self._view[:size], self._view[size:]
        return bytes(piece)


class _Outlet(io.RawIOBase):
    """Where pyrage writes: the next stage of the chain."""

    def __init__(self, downstream: Any) -> None:
        super().__init__()
        self.downstream = downstream
        self.error: BaseException | None = None  # pyrage re-raises it as EncryptError; keep the original

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            self.downstream.write(bytes(data))
        except BaseException as exc:
            self.error = exc
            raise
        return len(data)


def encrypt_stream(reader: Any, downstream: Any, recipients: Sequence[x25519.Identity | x25519.Recipient]) -> None:
    """age-encrypt all that `reader` gives into `downstream.write`, in this thread: pyrage pulls from `reader`.

    An error of the reader (its `error` attribute, if it keeps one) or of the downstream
    comes out as itself, not as pyrage's wrapper around it.
    """
    outlet = _Outlet(downstream)
    try:
        pyrage.encrypt_io(reader, outlet, list(recipients))
    except BaseException as exc:
        original = getattr(reader, "error", None) or outlet.error
        if original is not None and original is not exc:
            raise original from exc
        raise


class EncryptStage:
    """age-encrypts the bytes written through it for `recipients`, into the next stage.

    For writers that push (`Chain.write`). pyrage's streaming encryptor pulls from a
    reader, so here it runs in a thread fed through a queue of at most QUEUE_CHUNKS
    chunks: memory stays bounded, and an error in the thread (the disk, say) comes back
    out of the next `write` or `close`. A source that can be pulled (`stream_to_file`)
    needs no thread: see `encrypt_stream`.
    """

    def __init__(self, downstream: Any, recipients: Sequence[x25519.Recipient]):
        self.downstream = downstream
        self._pipe = _Pipe()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(list(recipients),), name="age-encrypt", daemon=True)
        self._thread.start()

    def _run(self, recipients: list[x25519.Recipient]) -> None:
        outlet = _Outlet(self.downstream)
        try:
            pyrage.encrypt_io(self._pipe, outlet, recipients)
        except BaseException as exc:  # handed to the writing thread: the disk's own error if it was one
            self._error = outlet.error or exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _put(self, item: bytes | None) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._pipe.chunks.put(item, timeout=PUT_WAIT_S)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise_if_failed()
                    raise EncryptionError("the age encryption thread stopped") from None

    def write(self, data: bytes) -> None:
        if data:
            self._put(bytes(data))

    def close(self) -> None:
        if self._thread.is_alive():
            self._put(None)
            self._thread.join()
        self._raise_if_failed()
        self.downstream.close()

    def cancel(self) -> None:
        """Stop the thread without finishing the file (the chain is being aborted)."""
        while self._thread.is_alive():
            try:
                self._pipe.chunks.get_nowait()
            except queue.Empty:
                pass
            try:
                self._pipe.chunks.put_nowait(None)
            except queue.Full:
                continue
            self._thread.join(timeout=5)
            break


# ───────────────────────── decrypting ─────────────────────────


class _HashingFile(io.RawIOBase):
    def __init__(self, handle: Any) -> None:
        super().__init__()
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.digest.update(data)
        self.handle.write(data)
        self.size += len(data)
        return len(data)


def decrypt_file(source: Path, target: Path, identities: Sequence[x25519.Identity]) -> tuple[int, str]:
    """Decrypt `source` into a new 0600 `target`; returns the plaintext's (size, SHA-256).

    Raises pyrage.DecryptError when no identity opens it; `target` is then removed.
    """
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with open(source, "rb", buffering=HASH_CHUNK) as src, os.fdopen(fd, "wb", buffering=HASH_CHUNK) as dst:
            sink = _HashingFile(dst)
            pyrage.decrypt_io(src, sink, list(identities))
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return sink.size, sink.digest.hexdigest()


def encrypt_bytes(data: bytes, recipients: Sequence[str]) -> bytes:
    return bytes(pyrage.encrypt(data, [x25519.Recipient.from_str(key) for key in recipients]))


def decrypt_bytes(data: bytes, identities: Sequence[x25519.Identity]) -> bytes:
    return bytes(pyrage.decrypt(data, list(identities)))
