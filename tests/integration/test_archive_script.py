"""include/scripts/archive_wal.sh: durable copy, never overwrite, archive.log, and a real archiver using it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pyrage import x25519

from erp_backup.scratch.base import scratch_root
from erp_backup.scratch.postgres import as_cluster_user, chown_to_cluster_user
from erp_backup.services.postgres.wal import parse_archive_log
from tests.fixtures.pitr import ARCHIVE_SCRIPT

pytestmark = pytest.mark.integration

SEGMENT = "00000001000000000000002A"


def run_script(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the script as the server's OS user, as archive_command does."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ERP_")}
    return subprocess.run(
        as_cluster_user(["env", *(f"{k}={v}" for k, v in (env or {}).items()), str(ARCHIVE_SCRIPT), *args]),
        capture_output=True, text=True, env=base, cwd=cwd,
    )


@pytest.fixture
def work() -> Iterator[Path]:
    """A scratch dir the server's OS user can reach (pytest's tmp dirs are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="erp-archive-test-", dir=scratch_root()))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dirs(work: Path) -> tuple[Path, Path]:
    """(pg_wal-like source dir, archive dir), both owned by the server's OS user."""
    source, archive = work / "pg_wal", work / "archive"
    source.mkdir()
    archive.mkdir()
    (source / SEGMENT).write_bytes(os.urandom(1 << 20))
    chown_to_cluster_user(work)
    return source, archive


def test_new_segment_is_copied_logged_and_private(dirs: tuple[Path, Path]) -> None:
    source, archive = dirs
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    done = run_script(str(source / SEGMENT), SEGMENT, str(archive))
    assert done.returncode == 0, done.stderr
    data = (source / SEGMENT).read_bytes()
    assert (archive / SEGMENT).read_bytes() == data
    assert (archive / SEGMENT).stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in archive.iterdir()) == [SEGMENT, "archive.log"]  # no temp file left
    [entry] = parse_archive_log((archive / "archive.log").read_text())
    assert entry.name == SEGMENT and entry.size == len(data)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert before <= entry.archived_at <= datetime.now(timezone.utc)


def test_a_0600_segment_as_postgresql_writes_it_is_archived_group_readable(dirs: tuple[Path, Path]) -> None:
    """Found on a real engine (issue 9): cp kept PostgreSQL's 0600, so the worker (gid 0) could not read it."""
    source, archive = dirs
    (source / SEGMENT).chmod(0o600)
    done = run_script(str(source / SEGMENT), SEGMENT, str(archive))
    assert done.returncode == 0, done.stderr
    assert (archive / SEGMENT).stat().st_mode & 0o777 == 0o640
    assert (archive / "archive.log").stat().st_mode & 0o777 == 0o640


def test_identical_segment_exits_0_and_is_logged_once(dirs: tuple[Path, Path]) -> None:
    source, archive = dirs
    assert run_script(str(source / SEGMENT), SEGMENT, str(archive)).returncode == 0
    again = run_script(str(source / SEGMENT), SEGMENT, str(archive))
    assert again.returncode == 0 and "identical content" in again.stderr
    assert len((archive / "archive.log").read_text().splitlines()) == 1


def test_different_content_fails_and_keeps_the_archived_copy(dirs: tuple[Path, Path]) -> None:
    source, archive = dirs
    assert run_script(str(source / SEGMENT), SEGMENT, str(archive)).returncode == 0
    archived = (archive / SEGMENT).read_bytes()
    (source / SEGMENT).write_bytes(os.urandom(1 << 20))
    clash = run_script(str(source / SEGMENT), SEGMENT, str(archive))
    assert clash.returncode != 0
    assert f"{SEGMENT} is already archived" in clash.stderr and "DIFFERENT content" in clash.stderr
    assert (archive / SEGMENT).read_bytes() == archived
    assert sorted(p.name for p in archive.iterdir()) == [SEGMENT, "archive.log"]


def test_archived_but_unlogged_file_gets_its_log_line(dirs: tuple[Path, Path]) -> None:
    """A crash between the durable copy and the log line: the retry records it."""
    source, archive = dirs
    shutil.copyfile(source / SEGMENT, archive / SEGMENT)
    chown_to_cluster_user(archive)
    assert run_script(str(source / SEGMENT), SEGMENT, str(archive)).returncode == 0
    assert [e.name for e in parse_archive_log((archive / "archive.log").read_text())] == [SEGMENT]


def test_archive_dir_from_the_environment(dirs: tuple[Path, Path], work: Path) -> None:
    source, archive = dirs
    assert run_script(str(source / SEGMENT), SEGMENT, env={"ERP_WAL_ARCHIVE_DIR": str(archive)}).returncode == 0
    assert (archive / SEGMENT).exists()
    root_archive = work / "root" / "postgres" / "wal_archive"
    root_archive.mkdir(parents=True)
    chown_to_cluster_user(work / "root")
    assert run_script(str(source / SEGMENT), SEGMENT, env={"ERP_BACKUP_ROOT": str(work / "root")}).returncode == 0
    assert (root_archive / SEGMENT).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "usage"),
        (("pg_wal/missing", SEGMENT, "{archive}"), "does not exist"),
        (("{source}", SEGMENT, "{archive}/nowhere"), "archive directory"),
        (("{source}", "../escape", "{archive}"), "refusing file name"),
        (("{source}", SEGMENT), "no archive directory"),
    ],
)
def test_bad_calls_fail_with_a_message(dirs: tuple[Path, Path], args: tuple[str, ...], message: str) -> None:
    source, archive = dirs
    filled = [a.format(source=source / SEGMENT, archive=archive) for a in args]
    done = run_script(*filled)
    assert done.returncode != 0 and message in done.stderr and "archive_wal.sh: ERROR" in done.stderr
    assert not (archive / "archive.log").exists()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_copy_is_fsynced_before_it_appears_and_the_directory_after(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    source, archive = dirs
    trace = tmp_path / "trace"
    done = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=openat,fsync,fdatasync,link,linkat",
         str(ARCHIVE_SCRIPT), str(source / SEGMENT), SEGMENT, str(archive)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    calls = [line.split(None, 1)[1] for line in trace.read_text().splitlines() if " " in line]
    link = next(i for i, c in enumerate(calls) if c.startswith(("link(", "linkat(")) and SEGMENT in c)

    def fsynced(path_part: str) -> list[int]:
        """Indexes of fsync calls on a file descriptor opened for a path containing path_part."""
        found = []
        for i, call in enumerate(calls):
            if call.startswith("fsync("):
                fd = call.split("(")[1].split(")")[0]
                opened = [c for c in calls[:i] if c.startswith("openat(") and c.rstrip().endswith(f"= {fd}")]
                if opened and path_part in opened[-1]:
                    found.append(i)
        return found

    assert any(i < link for i in fsynced(f".{SEGMENT}.tmp")), "the temp copy must be fsynced before it is linked"
    assert any(i > link for i in fsynced(f'"{archive}"')), "the directory must be fsynced after the link"
    assert any(i > link for i in fsynced("archive.log")), "archive.log must be fsynced"


def test_a_real_archiver_uses_the_script(archiving_pg_factory) -> None:  # noqa: F811
    pg = archiving_pg_factory(name="archscript")
    name = pg.switch_wal()
    entries = parse_archive_log((pg.archive_dir / "archive.log").read_text())
    assert name in [e.name for e in entries]
    assert pg.sql("SELECT failed_count FROM pg_stat_archiver")[0][0] == 0
    with open(pg.archive_dir / name, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == next(e.sha256 for e in entries if e.name == name)


# --- the sealed archive (ERP_WAL_RECIPIENTS_FILE) ----------------------------------------------------


@pytest.fixture
def sealing(work: Path) -> tuple[dict[str, str], Path]:
    """(the environment that makes the script seal, an identity file that opens what it seals)."""
    identity = x25519.Identity.generate()
    recipients = work / "wal-recipients"
    recipients.write_text(f"# the plan's recipients\n{identity.to_public()}\n")
    recipients.chmod(0o644)
    identity_file = work / "identity"
    identity_file.write_text(f"{identity}\n")
    identity_file.chmod(0o600)
    return {"ERP_WAL_RECIPIENTS_FILE": str(recipients)}, identity_file


def unseal(path: Path, identity_file: Path) -> bytes:
    """What the runbook does by hand: age -d -i KEY | zstd -d."""
    decrypted = subprocess.run(["age", "-d", "-i", str(identity_file), str(path)], capture_output=True, check=True)
    return subprocess.run(["zstd", "-d", "-q", "-c"], input=decrypted.stdout, capture_output=True, check=True).stdout


def test_a_sealed_segment_is_compressed_encrypted_and_logged_with_both_hashes(dirs, sealing) -> None:
    source, archive = dirs
    env, identity_file = sealing
    data = b"WAL of tenant_acme.customers " * 20000 + os.urandom(1 << 16)
    (source / SEGMENT).write_bytes(data)
    done = run_script(str(source / SEGMENT), SEGMENT, str(archive), env=env)
    assert done.returncode == 0, done.stderr
    stored = archive / f"{SEGMENT}.zst.age"
    assert sorted(p.name for p in archive.iterdir()) == [stored.name, "archive.log"]  # no clear copy, no temp file
    assert stored.stat().st_mode & 0o777 == 0o640
    sealed_bytes = stored.read_bytes()
    assert sealed_bytes.startswith(b"age-encryption.org/v1\n") and b"tenant_acme" not in sealed_bytes
    assert len(sealed_bytes) < (1 << 16) + 4096  # compressed before it was encrypted: about the random tail
    assert unseal(stored, identity_file) == data
    [entry] = parse_archive_log((archive / "archive.log").read_text())
    assert (entry.name, entry.sealed, entry.stored_name) == (SEGMENT, True, stored.name)
    assert (entry.sha256, entry.size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert (entry.stored_sha256, entry.stored_size) == (hashlib.sha256(sealed_bytes).hexdigest(), len(sealed_bytes))


def test_a_sealed_segment_archived_again_is_judged_by_its_logged_hash(dirs, sealing) -> None:
    source, archive = dirs
    env, _ = sealing
    assert run_script(str(source / SEGMENT), SEGMENT, str(archive), env=env).returncode == 0
    stored = (archive / f"{SEGMENT}.zst.age").read_bytes()
    again = run_script(str(source / SEGMENT), SEGMENT, str(archive), env=env)
    assert again.returncode == 0 and "identical content" in again.stderr
    (source / SEGMENT).write_bytes(os.urandom(1 << 20))
    clash = run_script(str(source / SEGMENT), SEGMENT, str(archive), env=env)
    assert clash.returncode != 0 and "DIFFERENT content" in clash.stderr
    assert (archive / f"{SEGMENT}.zst.age").read_bytes() == stored
    assert len((archive / "archive.log").read_text().splitlines()) == 1


def test_a_sealed_file_without_its_log_line_is_sealed_again(dirs, sealing) -> None:
    """A crash between the sealed file and its log line: the retry replaces the unlogged attempt and logs it."""
    source, archive = dirs
    env, identity_file = sealing
    (archive / f"{SEGMENT}.zst.age").write_bytes(b"half-written age file")
    chown_to_cluster_user(archive)
    done = run_script(str(source / SEGMENT), SEGMENT, str(archive), env=env)
    assert done.returncode == 0 and "unfinished earlier attempt" in done.stderr
    assert unseal(archive / f"{SEGMENT}.zst.age", identity_file) == (source / SEGMENT).read_bytes()
    assert [e.sealed for e in parse_archive_log((archive / "archive.log").read_text())] == [True]


def test_turning_sealing_on_keeps_what_was_archived_in_clear(dirs, sealing) -> None:
    source, archive = dirs
    env, _ = sealing
    assert run_script(str(source / SEGMENT), SEGMENT, str(archive)).returncode == 0
    again = run_script(str(source / SEGMENT), SEGMENT, str(archive), env=env)
    assert again.returncode == 0 and "identical content" in again.stderr
    assert sorted(p.name for p in archive.iterdir()) == [SEGMENT, "archive.log"]


def test_history_files_stay_clear_in_a_sealed_archive(dirs, sealing) -> None:
    """Timeline switches (LSNs, no table data) are read by the WAL job, which holds no key."""
    source, archive = dirs
    env, _ = sealing
    history = "00000002.history"
    (source / history).write_text("1\t0/3000000\tno recovery target specified\n")
    assert run_script(str(source / history), history, str(archive), env=env).returncode == 0
    assert (archive / history).read_text().startswith("1\t0/3000000")
    assert [e.sealed for e in parse_archive_log((archive / "archive.log").read_text())] == [False]


@pytest.mark.parametrize(("recipients", "message"), [
    ("missing", "is not a readable file"),
    ("AGE-SECRET-KEY-1 not a recipient\n", "holds no age recipient"),
])
def test_a_bad_recipients_file_fails_and_archives_nothing(dirs, work: Path, recipients: str, message: str) -> None:
    source, archive = dirs
    path = work / "recipients"
    if recipients != "missing":
        path.write_text(recipients)
        path.chmod(0o644)
    done = run_script(str(source / SEGMENT), SEGMENT, str(archive), env={"ERP_WAL_RECIPIENTS_FILE": str(path)})
    assert done.returncode != 0 and message in done.stderr and "archive_wal.sh: ERROR" in done.stderr
    assert list(archive.iterdir()) == []


def test_a_real_archiver_seals_with_the_script(archiving_pg_factory) -> None:
    pg = archiving_pg_factory(name="archseal", sealed=True)
    name = pg.switch_wal()
    entry = next(e for e in parse_archive_log((pg.archive_dir / "archive.log").read_text()) if e.name == name)
    assert entry.sealed and not (pg.archive_dir / name).exists()
    assert hashlib.sha256((pg.archive_dir / entry.stored_name).read_bytes()).hexdigest() == entry.stored_sha256
    assert pg.sql("SELECT failed_count FROM pg_stat_archiver")[0][0] == 0


def test_neighbouring_segment_names_are_not_confused(dirs: tuple[Path, Path]) -> None:
    """awk compares numeric-looking fields as numbers: ...03 and ...04 round to the same double."""
    source, archive = dirs
    first, second = "000000010000000000000003", "000000010000000000000004"
    for name in (first, second):
        (source / name).write_bytes(os.urandom(1 << 16))
        done = run_script(str(source / name), name, str(archive))
        assert done.returncode == 0, done.stderr
    assert [e.name for e in parse_archive_log((archive / "archive.log").read_text())] == [first, second]
