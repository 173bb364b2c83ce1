"""The job lock and writer markers, with real processes: who may write and clean a job's staging."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from erp_backup import locks, retention
from erp_backup.plan import load_plan
from erp_backup.sets import BackupSet, SetState, remove_incomplete

ROOT = Path(__file__).resolve().parents[2]
HOLD_SCRIPT = """
import sys, time
from pathlib import Path
from erp_backup import locks
root, ready, set_dir = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with locks.job_lock(root, "postgres", "full", "scheduled__holder"):
    if set_dir:
        Path(set_dir).mkdir(parents=True)
        locks.write_marker(Path(set_dir), "scheduled__holder")
    ready.write_text("ready")
    time.sleep(120)
"""
MARK_SCRIPT = """
import sys, time
from pathlib import Path
from erp_backup import locks
locks.write_marker(Path(sys.argv[1]), "scheduled__writer")
Path(sys.argv[2]).write_text("ready")
time.sleep(120)
"""


def start_child(script: str, *args: str, ready: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    child = subprocess.Popen([sys.executable, "-c", script, *args], env=env)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert child.poll() is None, "the child died before it was ready"
        assert time.monotonic() < deadline, "the child was not ready in 30 s"
        time.sleep(0.02)
    return child


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(10)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """Another process holding postgres/full's lock on tmp_path/root (no set)."""
    child = start_child(HOLD_SCRIPT, str(tmp_path / "root"), str(tmp_path / "ready"), "", ready=tmp_path / "ready")
    yield child
    if child.poll() is None:
        kill(child)


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path: Path, holder: subprocess.Popen):
    started = time.monotonic()
    with pytest.raises(locks.LockBusy) as caught:
        with locks.job_lock(tmp_path / "root", "postgres", "full", "scheduled__second"):
            pytest.fail("got a lock another process holds")
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert f"is locked by {holder.pid}@{socket.gethostname()} since " in message
    assert "(run scheduled__holder)" in message and f"backup postgres/full under {tmp_path / 'root'}" in message
    assert not locks.lock_free_or_mine(tmp_path / "root", "postgres", "full")


def test_a_killed_holder_frees_the_lock(tmp_path: Path, holder: subprocess.Popen):
    kill(holder)
    assert locks.lock_free_or_mine(tmp_path / "root", "postgres", "full")
    with locks.job_lock(tmp_path / "root", "postgres", "full", "scheduled__next") as path:
        assert locks.held_here(path)
    assert not locks.held_here(path)
    assert (tmp_path / "root" / ".locks" / "postgres.full.lock").read_text() == ""  # cleared on release


def test_a_second_thread_of_the_holder_is_refused_and_the_lock_survives(tmp_path: Path):
    root = tmp_path / "root"
    errors: list[BaseException] = []
    with locks.job_lock(root, "postgres", "full", "scheduled__first"):
        def second() -> None:
            try:
                with locks.job_lock(root, "postgres", "full", "scheduled__thread"):
                    pass
            except BaseException as exc:  # noqa: BLE001 (collected for the assertion)
                errors.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        assert len(errors) == 1 and isinstance(errors[0], locks.LockBusy)
        assert f"locked by {os.getpid()}@" in str(errors[0]) and "(run scheduled__first)" in str(errors[0])
        # The refusal closed no descriptor of ours: another process still cannot take the lock.
        assert not lock_free_elsewhere(root)
    assert locks.lock_free_or_mine(root, "postgres", "full")


def test_writer_alive_needs_this_host_this_boot_and_the_same_process(tmp_path: Path):
    me = locks.current_writer("r")
    assert locks.writer_alive(me)
    assert not locks.writer_alive(replace(me, host="other-host"))
    assert not locks.writer_alive(replace(me, boot_id="0000-other-boot"))
    assert not locks.writer_alive(replace(me, started=(me.started or 0) + 1))  # the pid was reused
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not locks.writer_alive(replace(me, pid=int(done.stdout)))


def incomplete_set(root: Path, backup_id: str) -> BackupSet:
    backup_set = BackupSet(root, "postgres", "full", backup_id)
    backup_set.create_dir()
    (backup_set.path / "globals.sql.zst").write_bytes(b"half")
    assert backup_set.state is SetState.INCOMPLETE
    return backup_set


def test_remove_incomplete_keeps_a_set_whose_writer_runs_and_removes_the_dead_ones(tmp_path: Path):
    root = tmp_path / "root"
    live = incomplete_set(root, "20260301T170000Z")
    writer = start_child(MARK_SCRIPT, str(live.path), str(tmp_path / "ready"), ready=tmp_path / "ready")
    killed = incomplete_set(root, "20260302T170000Z")
    victim = start_child(MARK_SCRIPT, str(killed.path), str(tmp_path / "ready2"), ready=tmp_path / "ready2")
    kill(victim)
    unmarked = incomplete_set(root, "20260303T170000Z")
    try:
        assert remove_incomplete(root, "postgres", "full") == [killed.backup_id, unmarked.backup_id]
        assert live.path.exists() and not killed.path.exists() and not unmarked.path.exists()
    finally:
        kill(writer)
    assert remove_incomplete(root, "postgres", "full") == [live.backup_id]


def test_remove_incomplete_removes_nothing_while_another_process_holds_the_lock(tmp_path: Path):
    root = tmp_path / "root"
    stranger = incomplete_set(root, "20260301T170000Z")  # no marker: only the lock says whether it is written
    child = start_child(HOLD_SCRIPT, str(root), str(tmp_path / "ready"), "", ready=tmp_path / "ready")
    try:
        assert remove_incomplete(root, "postgres", "full") == []
        assert stranger.path.exists()
    finally:
        kill(child)
    assert remove_incomplete(root, "postgres", "full") == [stranger.backup_id]


def test_retention_never_prunes_a_set_being_written(tmp_path: Path, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(root))
    job = load_plan().job("postgres", "full")
    old = "20250101T170000Z"  # far past retention by its id: an old window being backfilled
    set_dir = root / "postgres" / "full" / old
    child = start_child(HOLD_SCRIPT, str(root), str(tmp_path / "ready"), str(set_dir), ready=tmp_path / "ready")
    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    try:
        report = retention.prune(job, root, None, now, dry_run=False)
        (decision,) = report.staging
        assert not decision.delete and "locked by" in decision.reason and "scheduled__holder" in decision.reason
        assert set_dir.exists()
    finally:
        kill(child)
    report = retention.prune(job, root, None, now + timedelta(seconds=1), dry_run=False)
    assert report.staging_deleted == [old] and not set_dir.exists()


def test_a_full_disk_leaves_the_lock_working_without_the_holder_name(tmp_path: Path):
    from tests.fixtures.disk import fill, mount_tmpfs, unmount

    disk = tmp_path / "disk"
    why = mount_tmpfs(disk, "1m")
    if why:
        pytest.skip(f"cannot mount a tmpfs here: {why}")
    try:
        (disk / ".locks").mkdir()
        fill(disk)
        with locks.job_lock(disk, "postgres", "full", "scheduled__full") as path:
            assert locks.held_here(path)
            assert not lock_free_elsewhere(disk)  # held, though the disk had no room for our name
        assert locks.lock_free_or_mine(disk, "postgres", "full")
    finally:
        unmount(disk)


def lock_free_elsewhere(root: Path) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from erp_backup import locks;"
         "sys.exit(0 if locks.lock_free_or_mine(Path(sys.argv[1]), 'postgres', 'full') else 3)", str(root)],
        env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")},
    )
    return probe.returncode == 0
