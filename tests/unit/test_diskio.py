"""Every I/O error on staging names the set, the file and the free space; ENOSPC reads "disk full: ...".

The disk-full cases run on a real 1 MiB tmpfs filled with ballast (skipped where nothing can be
mounted); the same errors raised at `os.fsync` (where NFS reports a full disk) run everywhere.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pyrage import x25519

from erp_backup import crypto, locks
from erp_backup.checksum import verify_and_seal
from erp_backup.diskio import StagingIOError
from erp_backup.manifest import write_manifest
from erp_backup.sets import BackupSet, SetState
from erp_backup.stream import stream_to_file
from tests.fixtures.disk import fill, mount_tmpfs, unmount
from tests.fixtures.factories import make_manifest

BACKUP_ID = "20260301T170000Z"
KEY = f"postgres/full/{BACKUP_ID}"


def make_set(root: Path, *, manifest: bool = True) -> BackupSet:
    backup_set = BackupSet(root, "postgres", "full", BACKUP_ID)
    backup_set.create_dir()
    entry = stream_to_file([b"payload " * 64], backup_set.path, "db/erp.dump.zst").entry
    if manifest:
        moment = datetime(2026, 3, 1, 17, tzinfo=timezone.utc)
        write_manifest(backup_set.path, make_manifest(backup_id=BACKUP_ID, captured_started_at=moment, files=[entry]))
    return backup_set


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    why = mount_tmpfs(mount, "1m")
    if why:
        pytest.skip(f"cannot mount a tmpfs here: {why}")
    yield mount
    unmount(mount)


def assert_disk_full(error: StagingIOError, file: str, root: Path) -> None:
    text = str(error)
    assert text.startswith(f"disk full: writing {file} of set {KEY} under {root}: "), text
    assert " bytes free ([Errno 28] No space left on device)" in text
    assert error.errno == errno.ENOSPC and isinstance(error, OSError) and error.set_key == KEY


def test_real_full_disk_in_checksum_receipt_manifest_and_data_files(tiny_disk: Path):
    backup_set = make_set(tiny_disk)
    ballast = fill(tiny_disk)

    with pytest.raises(StagingIOError) as caught:
        verify_and_seal(backup_set)
    assert_disk_full(caught.value, "SHA256SUMS", tiny_disk)
    assert backup_set.state is SetState.UNVERIFIED  # nothing half-written counts

    with pytest.raises(StagingIOError) as caught:
        backup_set.write_offsite_receipt({"verified": True})
    assert_disk_full(caught.value, "offsite.json", tiny_disk)

    with pytest.raises(StagingIOError) as caught:
        write_manifest(backup_set.path, backup_set.manifest())
    assert_disk_full(caught.value, "manifest.json", tiny_disk)

    with pytest.raises(StagingIOError) as caught:
        stream_to_file([os.urandom(1 << 16)], backup_set.path, "db/more.dump.zst", compress=False)
    assert_disk_full(caught.value, "db/more.dump.zst", tiny_disk)
    assert not (backup_set.path / "db" / "more.dump.zst").exists()

    ballast.unlink()
    verify_and_seal(backup_set)
    assert backup_set.state is SetState.VERIFIED


def test_enospc_at_fsync_names_set_file_and_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    backup_set = make_set(tmp_path)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for write, name in (
        (lambda: verify_and_seal(backup_set), "SHA256SUMS"),
        (lambda: backup_set.mark_corrupt(["x"]), "CHECKSUM_FAILED"),
        (lambda: backup_set.write_offsite_receipt({}), "offsite.json"),
        (lambda: locks.write_marker(backup_set.path, "r"), ".writer.json"),
    ):
        with pytest.raises(StagingIOError) as caught:
            write()
        assert_disk_full(caught.value, name, tmp_path)
        assert caught.value.free is not None and f": {caught.value.free} bytes free" in str(caught.value)


def test_a_read_error_in_checksum_names_the_file_and_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    backup_set = make_set(tmp_path)

    def broken(path: Path) -> tuple[int, str]:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr("erp_backup.checksum.sha256_file", broken)
    with pytest.raises(StagingIOError) as caught:
        verify_and_seal(backup_set)
    text = str(caught.value)
    assert text.startswith(f"I/O error reading db/erp.dump.zst of set {KEY} under {tmp_path}: [Errno 5] Input/output error (")
    assert text.endswith(" bytes free)") and caught.value.errno == errno.EIO


def test_a_backup_on_a_full_disk_names_the_set_and_free_space_before_touching_the_source(
    tiny_disk: Path, monkeypatch: pytest.MonkeyPatch
):
    from erp_backup import steps
    from erp_backup.plan import load_plan
    from erp_backup.services.base import RunInfo

    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tiny_disk))
    plan = load_plan()
    job = plan.job("postgres", "full")
    for folder in (".locks", "postgres/full"):  # as after a first run
        (tiny_disk / folder).mkdir(parents=True)
    fill(tiny_disk)
    moment = datetime(2026, 3, 1, 17, tzinfo=timezone.utc)
    run = RunInfo(job.dag_id, f"scheduled__{moment.isoformat()}", moment, logical_date=moment)

    with pytest.raises(steps.BackupFailed) as caught:
        steps.backup(plan, job, run, get_connection=lambda conn_id: pytest.fail("the source must not be reached"))
    message = str(caught.value)
    where = "(creating the set directory|writing .writer.json)"  # tmpfs makes the directory, then has no room
    assert re.search(rf"cannot create {tiny_disk}/{KEY}: disk full: {where} of set {KEY} under {tiny_disk}: "
                     r"\d+ bytes free \(\[Errno 28\] No space left on device\)", message), message
    assert not (tiny_disk / KEY).exists()


def test_a_real_full_disk_under_the_age_stage_names_the_file_and_leaves_nothing(tiny_disk: Path):
    """An encrypted set's stream is pulled by age in the task's thread; the disk's error still comes out as itself."""
    backup_set = make_set(tiny_disk, manifest=False)
    crypto.prepare_set(backup_set.path, [str(x25519.Identity.generate().to_public())])
    ballast = fill(tiny_disk)
    with pytest.raises(StagingIOError) as caught:
        stream_to_file([os.urandom(1 << 16) for _ in range(8)], backup_set.path, "db/more.dump.zst")
    assert_disk_full(caught.value, "db/more.dump.zst", tiny_disk)
    assert not (backup_set.path / "db" / "more.dump.zst").exists()
    ballast.unlink()
