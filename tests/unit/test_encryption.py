"""age encryption in the stream chain, sealing at checksum, unsealing and key rotation, on real files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest
import zstandard
from pyrage import x25519

from erp_backup import crypto, sealing
from erp_backup.checksum import ChecksumMismatch, verify_and_seal
from erp_backup.crypto import EncryptionError, EncryptStage, fingerprint
from erp_backup.manifest import Manifest, write_manifest
from erp_backup.sets import SUMS_NAME, BackupSet, SetState
from erp_backup.stream import stream_to_file
from tests.fixtures.factories import make_manifest

SECRET_NAMES = ("tenant_acme", "customers", "invoice-2026.pdf")
DETAILS = {
    "databases": {"erp": {"tables": [{"schema": "tenant_acme", "name": "customers", "rows": 7}]}},
    "objects": [{"bucket": "erp-documents", "key": "invoice-2026.pdf"}],
    "raw_bytes": 12345,
}
CLEAR_DETAILS = frozenset({"raw_bytes"})


def keypair() -> tuple[x25519.Identity, str]:
    identity = x25519.Identity.generate()
    return identity, str(identity.to_public())


def sealed_payloads() -> dict[str, bytes]:
    return {
        "databases/tenant_acme.dump.zst": b"COPY tenant_acme.customers FROM stdin;\n" * 5000,
        "objects/erp-documents/invoice-2026.pdf": b"".join(hashlib.sha256(bytes([i % 256, i // 256])).digest() for i in range(2200)),
    }


def encrypted_set(root: Path, recipients: list[str], backup_id: str = "20260101T020000Z") -> BackupSet:
    """A set as the backup step leaves it with encryption on: ciphertext files, the whole manifest, staging keys."""
    backup_set = BackupSet(root, "postgres", "full", backup_id)
    backup_set.create_dir()
    crypto.prepare_set(backup_set.path, recipients)
    entries = [stream_to_file([data], backup_set.path, name).entry for name, data in sealed_payloads().items()]
    write_manifest(backup_set.path, make_manifest(backup_id=backup_id, files=entries, details=DETAILS,
                                                  source={"host": "db.internal"}, tools={"pg_dump": "15"}))
    return backup_set


def clear_bytes(path: Path) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())


def every_byte_under(path: Path) -> bytes:
    return b"".join(p.relative_to(path).as_posix().encode() + p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())


def test_chain_encrypts_for_the_sets_recipients_and_hashes_the_stored_bytes(tmp_path):
    identity, recipient = keypair()
    crypto.prepare_set(tmp_path, [recipient])
    payload = b"tenant_acme.customers row\n" * 100_000
    result = stream_to_file(iter([payload[i:i + 65536] for i in range(0, len(payload), 65536)]), tmp_path, "d/x.zst")
    stored = (tmp_path / "d/x.zst").read_bytes()
    assert stored.startswith(b"age-encryption.org/v1\n")
    assert b"tenant_acme" not in stored
    assert result.entry.sha256 == hashlib.sha256(stored).hexdigest() and result.entry.size == len(stored)
    assert result.raw_bytes == len(payload)
    crypto.decrypt_file(tmp_path / "d/x.zst", tmp_path / "clear.zst", [identity])
    assert clear_bytes(tmp_path / "clear.zst") == payload
    assert stat.S_IMODE((tmp_path / crypto.STAGING_IDENTITY_FILE).stat().st_mode) == 0o600


def test_an_encrypted_stream_is_pulled_in_the_callers_thread_with_no_encryption_thread(tmp_path):
    """No thread, no queue: age reads from zstd, which reads from the source, as the source is drained."""
    identity, recipient = keypair()
    crypto.prepare_set(tmp_path, [recipient])
    seen: list[set[str]] = []

    def source():
        for i in range(64):
            seen.append({thread.name for thread in threading.enumerate()})
            yield f"row {i} of tenant_acme\n".encode() * 4096

    result = stream_to_file(source(), tmp_path, "x.zst")
    assert len(seen) == 64 and not any("age-encrypt" in names for names in seen)
    assert {threading.current_thread().name} <= seen[0]
    crypto.decrypt_file(tmp_path / "x.zst", tmp_path / "clear.zst", [identity])
    assert result.clear_sha256 == hashlib.sha256((tmp_path / "clear.zst").read_bytes()).hexdigest()
    assert clear_bytes(tmp_path / "clear.zst") == b"".join(f"row {i} of tenant_acme\n".encode() * 4096 for i in range(64))


def test_a_failing_source_comes_out_as_itself_and_leaves_no_partial_file(tmp_path):
    _, recipient = keypair()
    crypto.prepare_set(tmp_path, [recipient])
    closed = []

    class DumpFailed(RuntimeError):
        pass

    def source():
        try:
            yield os.urandom(1 << 20)
            raise DumpFailed("pg_dump: error: connection to server lost")
        finally:
            closed.append(True)

    with pytest.raises(DumpFailed, match="connection to server lost"):
        stream_to_file(source(), tmp_path, "db/erp.dump.zst")
    assert not (tmp_path / "db" / "erp.dump.zst").exists() and closed == [True]


def test_a_set_without_recipients_is_written_in_clear(tmp_path):
    stream_to_file([b"plain"], tmp_path, "x", compress=False)
    assert (tmp_path / "x").read_bytes() == b"plain"


def test_an_error_downstream_of_the_encrypt_stage_comes_out_of_the_writer():
    class FullDisk:
        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            raise AssertionError("never closed after a failure")

    stage = EncryptStage(FullDisk(), [x25519.Identity.generate().to_public()])
    with pytest.raises(OSError, match="No space left"):
        for _ in range(200):
            stage.write(os.urandom(65536))
        stage.close()


def test_checksum_deep_verifies_through_the_staging_key_then_seals_the_set(tmp_path):
    identity, recipient = keypair()
    backup_set = encrypted_set(tmp_path, [recipient])
    seen: dict[str, bytes] = {}

    def deep_verify(clear_set: BackupSet, manifest: Manifest) -> list[str]:
        seen.update({entry.path: clear_bytes(clear_set.path / entry.path) for entry in manifest.files})
        assert manifest.details == DETAILS
        return []

    verify_and_seal(backup_set, deep_verify=deep_verify, clear_details=CLEAR_DETAILS)
    assert seen == sealed_payloads()
    assert backup_set.state is SetState.VERIFIED
    clear = backup_set.manifest()
    assert clear.encryption["recipients"] == [recipient]
    assert clear.encryption["fingerprints"] == [fingerprint(recipient)]
    assert clear.details == {"raw_bytes": 12345} and clear.source == {} and clear.tools == {}
    assert [entry.path for entry in clear.files] == ["data/000001.age", "data/000002.age", sealing.SEALED_NAME]
    on_disk = every_byte_under(backup_set.path)
    for name in (*SECRET_NAMES, "db.internal", "pg_dump"):
        assert name.encode() not in on_disk, name
    assert not (backup_set.path / crypto.STAGING_IDENTITY_FILE).exists()
    assert not (backup_set.path / sealing.WORK_DIR).exists()
    assert (backup_set.path / SUMS_NAME).read_text().count("data/") == 2

    # The worker cannot read it any more, and a rerun of checksum re-checks the stored bytes only.
    verify_and_seal(backup_set, deep_verify=lambda *_: ["must not run on a sealed set"])


def test_a_deep_verify_problem_marks_the_set_corrupt_and_leaves_no_clear_copy(tmp_path):
    _, recipient = keypair()
    backup_set = encrypted_set(tmp_path, [recipient])
    with pytest.raises(ChecksumMismatch, match="pg_restore --list failed"):
        verify_and_seal(backup_set, deep_verify=lambda *_: ["pg_restore --list failed"])
    assert backup_set.state is SetState.CORRUPT
    assert not (backup_set.path / sealing.WORK_DIR).exists()
    assert not (backup_set.path / crypto.STAGING_IDENTITY_FILE).exists()  # nothing on the worker opens it any more
    assert not backup_set.manifest().encryption


def test_unseal_restores_the_clear_set_and_its_whole_manifest(tmp_path):
    identity, recipient = keypair()
    backup_set = encrypted_set(tmp_path / "staging", [recipient])
    verify_and_seal(backup_set, clear_details=CLEAR_DETAILS)
    full = sealing.unseal_set(backup_set.path, tmp_path / "clear", [identity])
    assert full.details == DETAILS and full.source == {"host": "db.internal"} and not full.encryption
    assert {entry.path: clear_bytes(tmp_path / "clear" / entry.path) for entry in full.files} == sealed_payloads()
    assert Manifest.read(tmp_path / "clear" / "manifest.json") == full
    assert "databases/tenant_acme.dump.zst" in (tmp_path / "clear" / SUMS_NAME).read_text()


def test_a_wrong_or_missing_identity_names_the_set_and_the_recipient(tmp_path):
    _, recipient = keypair()
    stranger, _ = keypair()
    backup_set = encrypted_set(tmp_path / "staging", [recipient])
    verify_and_seal(backup_set)
    with pytest.raises(EncryptionError) as wrong:
        sealing.unseal_set(backup_set.path, tmp_path / "a", [stranger])
    message = str(wrong.value)
    assert "postgres/full/20260101T020000Z" in message and fingerprint(recipient) in message
    assert fingerprint(str(stranger.to_public())) in message
    with pytest.raises(EncryptionError, match=f"postgres/full/20260101T020000Z.*{fingerprint(recipient)}.*no identity"):
        sealing.unseal_set(backup_set.path, tmp_path / "b", [])


def test_key_rotation_new_sets_use_the_new_key_and_old_sets_open_with_the_old_one(tmp_path):
    old_identity, old_recipient = keypair()
    new_identity, new_recipient = keypair()
    before = encrypted_set(tmp_path / "staging", [old_recipient], "20260101T020000Z")
    verify_and_seal(before)
    after = encrypted_set(tmp_path / "staging", [new_recipient], "20260102T020000Z")
    verify_and_seal(after)
    assert before.manifest().encryption["recipients"] == [old_recipient]
    assert after.manifest().encryption["recipients"] == [new_recipient]

    key_file = tmp_path / "keys.txt"  # the identity connection or file after rotation: newest first
    key_file.write_text(f"# rotated 2026-01-02\n{new_identity}\n{old_identity}\n")
    keys = crypto.identities_from_file(key_file)
    for backup_set in (before, after):
        full = sealing.unseal_set(backup_set.path, tmp_path / "clear" / backup_set.backup_id, keys)
        assert full.backup_id == backup_set.backup_id and full.details == DETAILS
    with pytest.raises(EncryptionError, match=fingerprint(old_recipient)):
        sealing.unseal_set(before.path, tmp_path / "only-new", [new_identity])


def test_keys_are_checked_with_errors_that_name_where_they_came_from(tmp_path):
    with pytest.raises(EncryptionError, match="connection 'backup_age_recipients'.*not an age X25519 recipient"):
        crypto.parse_recipients("ssh-ed25519 AAAA", "connection 'backup_age_recipients'")
    with pytest.raises(EncryptionError, match="no age recipients"):
        crypto.parse_recipients("", "connection 'backup_age_recipients'")
    (tmp_path / "k").write_text("not a key\n")
    with pytest.raises(EncryptionError, match=f"identity file {tmp_path / 'k'}"):
        crypto.identities_from_file(tmp_path / "k")


def test_the_sealed_manifest_is_encrypted_for_the_plan_recipients_only(tmp_path):
    identity, recipient = keypair()
    backup_set = encrypted_set(tmp_path, [recipient])
    staging = crypto.staging_identity(backup_set.path)
    verify_and_seal(backup_set)
    sealed = (backup_set.path / sealing.SEALED_NAME).read_bytes()
    assert json.loads(crypto.decrypt_bytes(sealed, [identity]))["manifest"]["details"] == DETAILS
    with pytest.raises(Exception, match="(?i)decrypt|no matching"):
        crypto.decrypt_bytes(sealed, [staging])
