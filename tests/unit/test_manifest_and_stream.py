"""Manifests, the streaming chain and the checksum step on real files."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import subprocess
from datetime import datetime, timezone

import pytest
import zstandard

from erp_backup.checksum import ChecksumMismatch, sha256sums_text, verify_and_seal
from erp_backup.manifest import Manifest, ManifestError, write_atomic, write_manifest
from erp_backup.sets import BackupSet, SetState, backup_id_for, list_sets, remove_incomplete
from erp_backup.stream import ProgressStage, decompress_to, stream_to_file
from tests.fixtures.factories import make_manifest


def make_set(root, files: dict[str, bytes], backup_id="20260101T020000Z") -> BackupSet:
    backup_set = BackupSet(root, "postgres", "full", backup_id)
    backup_set.create_dir()
    entries = [stream_to_file([data], backup_set.path, name, compress=False).entry for name, data in files.items()]
    moment = datetime(2026, 1, 1, 2, tzinfo=timezone.utc)
    write_manifest(backup_set.path, make_manifest(backup_id=backup_id, captured_started_at=moment, files=entries))
    return backup_set


def test_backup_id_comes_from_the_run_date_in_utc():
    from zoneinfo import ZoneInfo

    seoul = datetime(2026, 3, 1, 2, 0, tzinfo=ZoneInfo("Asia/Seoul"))
    assert backup_id_for(seoul) == "20260228T170000Z"
    with pytest.raises(ValueError):
        backup_id_for(datetime(2026, 3, 1))


def test_chain_hashes_the_compressed_bytes_written_and_sets_0600(tmp_path):
    payload = os.urandom(1 << 16) * 40  # compressible, 2.6 MB
    result = stream_to_file(iter([payload[i:i + 100_000] for i in range(0, len(payload), 100_000)]), tmp_path, "d/x.zst")
    written = (tmp_path / "d/x.zst").read_bytes()
    assert result.entry.sha256 == hashlib.sha256(written).hexdigest()
    assert result.entry.size == len(written) < len(payload)
    assert result.raw_bytes == len(payload)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(written) == payload
    assert stat.S_IMODE((tmp_path / "d/x.zst").stat().st_mode) == 0o600
    restored = tmp_path / "plain"
    assert decompress_to(tmp_path / "d/x.zst", restored) == len(payload)
    assert restored.read_bytes() == payload


def test_chain_removes_partial_file_when_the_source_fails(tmp_path):
    def failing_source():
        yield b"x" * 1000
        raise RuntimeError("pg_dump died")

    with pytest.raises(RuntimeError, match="pg_dump died"):
        stream_to_file(failing_source(), tmp_path, "partial.zst")
    assert not (tmp_path / "partial.zst").exists()


def test_progress_logs_bytes_and_rate_at_the_interval(caplog):
    ticks = iter([0.0, 10.0, 31.0, 40.0, 62.0])
    sink_data = []

    class Sink:
        def write(self, data):
            sink_data.append(data)

        def close(self):
            pass

    stage = ProgressStage(Sink(), label="db erp", every_s=30, clock=lambda: next(ticks))
    with caplog.at_level(logging.INFO, logger="erp_backup.stream"):
        for _ in range(4):
            stage.write(b"a" * 1_000_000)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("db erp: 2000000 bytes read")
    assert "MB/s" in lines[0]


def test_manifest_written_atomically_and_round_trips(tmp_path):
    backup_set = make_set(tmp_path, {"a.bin": b"hello", "sub/b.bin": b"world"})
    manifest = backup_set.manifest()
    assert [f.path for f in manifest.files] == ["a.bin", "sub/b.bin"]
    assert manifest.file("a.bin").sha256 == hashlib.sha256(b"hello").hexdigest()
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert not list(backup_set.path.glob(".*.tmp"))
    assert stat.S_IMODE(backup_set.manifest_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(backup_set.path.stat().st_mode) == 0o700


def test_failed_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    write_atomic(target, b"old")

    def boom(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert not (tmp_path / ".manifest.json.tmp").exists()


def test_invalid_manifest_is_a_clear_error(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('{"service": "postgres"}')
    with pytest.raises(ManifestError, match=f"{path}: not a valid manifest"):
        Manifest.read(path)


def test_set_states_and_incomplete_cleanup(tmp_path):
    good = make_set(tmp_path, {"a": b"1"}, "20260101T020000Z")
    assert good.state is SetState.UNVERIFIED
    partial = BackupSet(tmp_path, "postgres", "full", "20260102T020000Z")
    partial.create_dir()
    (partial.path / "half.dump.zst").write_bytes(b"x")
    assert partial.state is SetState.INCOMPLETE
    assert [s.backup_id for s in list_sets(tmp_path, "postgres", "full")] == ["20260101T020000Z", "20260102T020000Z"]
    assert remove_incomplete(tmp_path, "postgres", "full") == ["20260102T020000Z"]
    assert not partial.path.exists() and good.path.exists()


def test_checksum_seals_a_good_set_with_sha256sum_compatible_file(tmp_path):
    backup_set = make_set(tmp_path, {"a.bin": b"alpha", "dir/b.bin": b"beta"})
    report = verify_and_seal(backup_set)
    assert (report.files, report.bytes) == (2, 9)
    assert backup_set.state is SetState.VERIFIED
    sums = (backup_set.path / "SHA256SUMS").read_text()
    assert sums == sha256sums_text(backup_set.manifest())
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=backup_set.path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: p.joinpath("a.bin").write_bytes(b"alphA"), "a.bin: sha256"),
        (lambda p: p.joinpath("a.bin").write_bytes(b"alpha!"), "a.bin: size 6 != manifest 5"),
        (lambda p: p.joinpath("a.bin").unlink(), "a.bin: missing"),
        (lambda p: p.joinpath("extra.bin").write_bytes(b"?"), "extra.bin: not in the manifest"),
    ],
)
def test_checksum_mismatch_fails_loudly_and_marks_corrupt(tmp_path, damage, expected):
    backup_set = make_set(tmp_path, {"a.bin": b"alpha"})
    damage(backup_set.path)
    with pytest.raises(ChecksumMismatch, match=expected):
        verify_and_seal(backup_set)
    assert backup_set.state is SetState.CORRUPT
    assert not (backup_set.path / "SHA256SUMS").exists()
    assert expected.split(":")[0] in (backup_set.path / "CHECKSUM_FAILED").read_text()


def test_service_checks_run_only_when_bytes_match(tmp_path):
    backup_set = make_set(tmp_path, {"a.bin": b"alpha"})
    with pytest.raises(ChecksumMismatch, match="archive unreadable"):
        verify_and_seal(backup_set, deep_verify=lambda s, m: ["a.bin: archive unreadable"])
    assert backup_set.state is SetState.CORRUPT
