"""Sealed sets: an encrypted set's two manifests, and turning a set sealed or clear.

An encrypted set (erp_backup.crypto) is written as ciphertext by the stream chain.
Its checksum task, once every stored byte matches, seals it (`seal_set`):

1. decrypts each file with the set's staging identity into a hidden work directory
   and runs the service's own checks there (the deep verify);
2. writes `sealed/manifest.age`: the whole manifest (with the SHA-256 of each clear
   file, and which stored object holds it), encrypted for the plan's recipients only;
3. renames every data file to an opaque `data/NNNNNN.age`, so no database, bucket or
   object name shows in a path;
4. replaces `manifest.json` by the clear part: service, type, backup id, capture
   times, the run, the stored objects' sizes and SHA-256s, the recipients'
   fingerprints, and only the details the service lists in `CLEAR_DETAILS`;
5. deletes the staging identity and the work directory.

Offsite verification, retention and the watchdog read only the clear part. Anything
that restores unseals (`unseal_set`) with an identity: the drill and the restore CLI
fetch through `UnsealingOffsite`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyrage
from pyrage import x25519

from erp_backup import crypto
from erp_backup.crypto import EncryptionError
from erp_backup.manifest import DIR_MODE, MANIFEST_NAME, FileEntry, Manifest, sha256_file, write_atomic, write_manifest
from erp_backup.sets import SUMS_NAME, BackupSet

log = logging.getLogger(__name__)

SEALED_NAME = "sealed/manifest.age"
DATA_DIR = "data"
WORK_DIR = ".clear"  # hidden: never listed, never uploaded; removed when sealing ends
FORMAT = "age-x25519"


def is_sealed(manifest: Manifest) -> bool:
    return bool(manifest.encryption)


def awaits_seal(set_dir: Path) -> bool:
    """Written encrypted, not sealed yet: its staging identity is still there."""
    return (set_dir / crypto.STAGING_IDENTITY_FILE).is_file()


def stored_name(index: int) -> str:
    return f"{DATA_DIR}/{index:06d}.age"


def sealed_for(manifest: Manifest) -> str:
    fingerprints = manifest.encryption.get("fingerprints") or []
    return ", ".join(fingerprints) or "unknown recipients"


# ───────────────────────── sealing (checksum task) ─────────────────────────


def seal_set(
    backup_set: BackupSet,
    manifest: Manifest,
    clear_details: frozenset[str],
    deep_verify: Callable[[BackupSet, Manifest], list[str]] | None,
) -> tuple[list[str], Manifest]:
    """Deep-verify an encrypted set through its staging identity, then seal it (see the module doc).

    Returns (problems, the manifest now in force): with problems nothing is renamed or sealed.
    """
    staging = crypto.staging_identity(backup_set.path)
    if staging is None:
        raise EncryptionError(f"backup {backup_set.key}: its staging identity is gone, so it cannot be verified")
    staging_public = str(staging.to_public())
    recipients = [str(r) for r in _recipient_lines(backup_set.path) if r != staging_public]
    work = backup_set.path / WORK_DIR
    try:
        clear = BackupSet(work, backup_set.service, backup_set.backup_type, backup_set.backup_id)
        inner = _decrypt_all(backup_set.path, clear.path, manifest, [staging])
        full = replace(manifest, files=inner)
        write_manifest(clear.path, full)
        problems = list(deep_verify(clear, full)) if deep_verify is not None else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if problems:
        return problems, manifest
    sealed = _seal(backup_set.path, manifest, full, recipients, clear_details)
    crypto.forget_staging_keys(backup_set.path)
    log.info("sealed %s for %s: %d files, clear manifest holds sizes and hashes only",
             backup_set.key, sealed_for(sealed), len(manifest.files))
    return [], sealed


def _recipient_lines(set_dir: Path) -> list[str]:
    return (set_dir / crypto.RECIPIENTS_FILE).read_text(encoding="ascii").split()


def _decrypt_all(source: Path, dest: Path, manifest: Manifest, identities: Sequence[x25519.Identity],
                 stored: dict[str, str] | None = None) -> list[FileEntry]:
    """Decrypt each file of `manifest` from `source` into `dest`; the clear files' entries."""
    entries = []
    for entry in manifest.files:
        target = dest / entry.path
        target.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        size, digest = crypto.decrypt_file(source / (stored[entry.path] if stored else entry.path), target, identities)
        entries.append(FileEntry(entry.path, size, digest))
    return entries


def _seal(set_dir: Path, manifest: Manifest, full: Manifest, recipients: list[str],
          clear_details: frozenset[str]) -> Manifest:
    names = {entry.path: stored_name(index) for index, entry in enumerate(manifest.files, start=1)}
    encryption = {"format": FORMAT, "recipients": recipients,
                  "fingerprints": [crypto.fingerprint(key) for key in recipients], "sealed_manifest": SEALED_NAME}
    payload = {"manifest": json.loads(full.to_json()), "stored": names}
    sealed_path = set_dir / SEALED_NAME
    sealed_path.parent.mkdir(exist_ok=True, mode=DIR_MODE)
    write_atomic(sealed_path, crypto.encrypt_bytes(json.dumps(payload, sort_keys=True).encode(), recipients))
    (set_dir / DATA_DIR).mkdir(exist_ok=True, mode=DIR_MODE)
    for relative, name in names.items():
        os.replace(set_dir / relative, set_dir / name)
    _remove_empty_dirs(set_dir)
    size, digest = sha256_file(sealed_path)
    clear = Manifest(
        service=manifest.service, backup_type=manifest.backup_type, backup_id=manifest.backup_id,
        captured_started_at=manifest.captured_started_at, captured_finished_at=manifest.captured_finished_at,
        run=manifest.run, source={}, tools={},
        files=[*(FileEntry(names[e.path], e.size, e.sha256) for e in manifest.files), FileEntry(SEALED_NAME, size, digest)],
        details={key: value for key, value in manifest.details.items() if key in clear_details},
        format=manifest.format, encryption=encryption,
    )
    write_manifest(set_dir, clear)
    return clear


def _remove_empty_dirs(set_dir: Path) -> None:
    for directory in sorted((p for p in set_dir.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()


# ───────────────────────── unsealing (drill, CLI) ─────────────────────────


def unseal_set(source: Path, dest: Path, identities: Sequence[x25519.Identity]) -> Manifest:
    """Decrypt the sealed set in `source` (stored bytes already verified) into `dest` as a clear set.

    `dest` gets the clear files, the whole manifest and its SHA256SUMS, so it reads
    like an unencrypted set. EncryptionError names the set and the recipients when
    no identity opens it; ChecksumMismatch when a clear file differs from the manifest.
    """
    from erp_backup.checksum import ChecksumMismatch, sha256sums_text

    clear = Manifest.read(source / MANIFEST_NAME)
    key = f"{clear.service}/{clear.backup_type}/{clear.backup_id}"
    given = ", ".join(crypto.identity_fingerprints(identities)) or "none"
    if not identities:
        raise EncryptionError(f"backup {key} is encrypted for recipient(s) {sealed_for(clear)} and no identity was "
                              "given (restore CLI: --identity FILE; drill: the plan's encryption.identity_conn_id)")
    try:
        payload = json.loads(crypto.decrypt_bytes((source / SEALED_NAME).read_bytes(), identities))
    except pyrage.DecryptError as exc:
        raise EncryptionError(f"backup {key} is encrypted for recipient(s) {sealed_for(clear)}; the identity given "
                              f"(recipient {given}) is not one of them, so it cannot be decrypted") from exc
    full = Manifest.from_json(json.dumps(payload["manifest"]), origin=f"backup {key}: {SEALED_NAME}")
    dest.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    for entry, decrypted in zip(full.files, _decrypt_all(source, dest, full, identities, payload["stored"]), strict=True):
        if decrypted != entry:
            raise ChecksumMismatch(f"backup {key}: {entry.path} decrypted to {decrypted.size} bytes with sha256 "
                                   f"{decrypted.sha256}, the sealed manifest says {entry.size} bytes, {entry.sha256}")
    write_atomic(dest / SUMS_NAME, sha256sums_text(full).encode())
    write_manifest(dest, full)
    return full


class UnsealingOffsite:
    """An offsite store whose `fetch_set` hands back clear sets; everything else is the store's own.

    `identities` is called only when a sealed set is fetched, so unencrypted sets need no key.
    """

    def __init__(self, store: Any, identities: Callable[[], Sequence[x25519.Identity]]):
        self.store, self.identities = store, identities

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def fetch_set(self, service: str, backup_type: str, backup_id: str, dest: Path) -> Manifest:
        return self.fetch_both(service, backup_type, backup_id, dest)[1]

    def fetch_both(self, service: str, backup_type: str, backup_id: str, dest: Path) -> tuple[Manifest, Manifest]:
        """Fetch a set into `dest` as clear files: (the manifest as stored offsite, the clear set's manifest)."""
        stored = dest.parent / f".{dest.name}.sealed"
        shutil.rmtree(stored, ignore_errors=True)
        manifest = self.store.fetch_set(service, backup_type, backup_id, stored)
        try:
            if not is_sealed(manifest):
                if dest.exists():
                    dest.rmdir()  # fetch_set's contract: absent or empty
                stored.rename(dest)
                return manifest, manifest
            try:
                return manifest, unseal_set(stored, dest, self.identities())
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
        finally:
            shutil.rmtree(stored, ignore_errors=True)


def plan_identities() -> list[x25519.Identity]:
    """The identities in the plan's identity connection (the drill's keys), read when a sealed set is opened."""
    from erp_backup.plan import load_plan
    from erp_backup.services.base import airflow_connection

    return crypto.identities_from_connection(load_plan().encryption.identity_conn_id, airflow_connection)


def unsealed_copy(set_dir: Path, manifest: Manifest, dest: Path,
                  identities: Callable[[], Sequence[x25519.Identity]]) -> tuple[Path, Manifest]:
    """A local set to restore from: itself when clear, else decrypted into `dest`."""
    if not is_sealed(manifest):
        return set_dir, manifest
    shutil.rmtree(dest, ignore_errors=True)
    return dest, unseal_set(set_dir, dest, identities())
