"""The soak's source and disk: the ERP PostgreSQL estate, and a staging disk that can fill up.

The source is a scratch cluster holding include/estate/erp_sample.sql, archiving WAL
through include/scripts/archive_wal.sh into a local archive, with 1 MB segments so a week
of hourly switches stays small. archive.log takes the soak's clock: lines the archiver
appended since the last look are restamped to the simulated time they happened at.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from erp_backup.scratch.postgres import ScratchPostgres, as_cluster_user, chown_to_cluster_user
from tests.fixtures.disk import fill, mount_tmpfs, unmount
from tests.fixtures.pitr import ARCHIVE_SUBDIR, ArchivingCluster, archiving_settings, make_backup_root

SAMPLE_SQL = Path(__file__).resolve().parents[3] / "include" / "estate" / "erp_sample.sql"
DB = "erp"
CONN_ID = "erp_postgres"


class Source:
    """A service the soak backs up: its connections, its plan options, and an hour of its activity."""

    service = ""

    def connections(self) -> dict[str, Any]:
        return {}

    def options(self) -> dict[str, Any]:
        """Service-level plan options (they replace the committed plan's)."""
        return {}

    def work(self, moment: datetime) -> None:
        pass

    def after_backup(self, backup_type: str) -> None:
        pass

    def close(self) -> None:
        pass


class PostgresSource(Source):
    service = "postgres"

    def __init__(self) -> None:
        self.root = make_backup_root()
        self.cluster = ScratchPostgres.new("soak-src", owner="pytest")
        self.archiving = ArchivingCluster(self.cluster, self.root)
        self._stamped = 0
        self._last_stamp = datetime.min.replace(tzinfo=timezone.utc)
        self.cluster.data_dir.mkdir(mode=0o700)
        chown_to_cluster_user(self.cluster.base_dir)
        subprocess.run(as_cluster_user([
            str(self.cluster.bindir / "initdb"), "-D", str(self.cluster.data_dir), "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--locale=C.UTF-8", "--wal-segsize=1",
        ]), check=True, capture_output=True, timeout=180)
        self.cluster.configure({**archiving_settings(self.archive_dir, "0"), "max_wal_size": "'64MB'"})
        self.cluster.start()
        self.archiving.sql(f"CREATE DATABASE {DB}")
        psql = str(self.cluster.bindir / "psql")
        subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", "app_role=erp_app", "-d",
                        self.cluster.conninfo(DB), "-f", str(SAMPLE_SQL)], check=True, capture_output=True, timeout=300)
        self.sql("CREATE TABLE soak_ticks (at timestamptz PRIMARY KEY)")

    @property
    def archive_dir(self) -> Path:
        return self.root / ARCHIVE_SUBDIR

    @property
    def up(self) -> bool:
        return self.cluster.is_running()

    def connection_fields(self) -> dict[str, Any]:
        return {"conn_id": CONN_ID, "conn_type": "postgres", "host": "127.0.0.1", "port": self.cluster.port,
                "login": "postgres", "schema": "postgres"}

    def connection(self) -> Any:
        from airflow.sdk import Connection

        return Connection(**self.connection_fields())

    def connections(self) -> dict[str, Any]:
        return {CONN_ID: self.connection()}

    def options(self) -> dict[str, Any]:
        return {"databases": [DB], "exec_mode": "network", "jobs": 2, "compress_level": 1}

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        import psycopg

        with psycopg.connect(self.cluster.conninfo(DB), autocommit=True) as db:
            db.execute(statement, params)

    def stop(self) -> None:
        self.cluster.stop()

    def start(self) -> None:
        self.cluster.start()

    def work(self, moment: datetime) -> None:
        """An hour of ERP activity: one row, so dumps and WAL differ from the last ones."""
        if self.up:
            self.sql("INSERT INTO soak_ticks VALUES (%s)", (moment,))

    def switch_wal(self, moment: datetime) -> None:
        """Close the current WAL segment (after a write, so there is one) and wait until it is archived."""
        if not self.up:
            return
        self.work(moment.replace(microsecond=1))
        self.archiving.switch_wal()
        self.settle()

    def settle(self, timeout: float = 60) -> None:
        """Wait until nothing is waiting to be archived (pg_basebackup's files are archived after it returns)."""
        if not self.up:
            return
        deadline = time.monotonic() + timeout
        while self.archiving.sql("SELECT count(*) FROM pg_ls_archive_statusdir() WHERE right(name, 6) = '.ready'")[0][0]:
            assert time.monotonic() < deadline, "WAL files still waiting to be archived"
            time.sleep(0.05)

    def restamp(self, moment: datetime) -> int:
        """Give archive.log lines appended since the last call the soak's time. Returns how many."""
        self.settle()
        log_path = self.archive_dir / "archive.log"
        if not log_path.exists():
            return 0
        lines = log_path.read_text().splitlines()
        moment = max(moment, self._last_stamp)  # archive times never go back: WAL names and times stay in order
        stamp = moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        fresh = [f"{stamp} {line.split(' ', 1)[1]}" for line in lines[self._stamped:]]
        if not fresh:
            return 0
        self._last_stamp = moment
        temp = log_path.with_name(".archive.log.soak")
        temp.write_text("\n".join(lines[: self._stamped] + fresh) + "\n")
        shutil.copymode(log_path, temp)
        stat = log_path.stat()
        os.chown(temp, stat.st_uid, stat.st_gid)
        os.replace(temp, log_path)
        self._stamped = len(lines)
        return len(fresh)

    def close(self) -> None:
        try:
            self.cluster.destroy()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class StagingDisk:
    """The backup root: a real 128 MB tmpfs when this machine can mount one, else a plain directory.

    `fill()` makes it full: ballast on the tmpfs; without one (or with SOAK_TMPFS=0), ENOSPC at
    `os.fsync` for files under the root (where NFS reports a full server), while the free space
    looks as it is.
    """

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch, size: str = "128m") -> None:
        self.path, self._monkeypatch = path, monkeypatch
        self.real = os.environ.get("SOAK_TMPFS", "1") != "0" and mount_tmpfs(path, size) is None
        self._ballast: Path | None = None
        self._real_fsync = os.fsync

    @property
    def kind(self) -> str:
        return "tmpfs (real ENOSPC)" if self.real else "directory (ENOSPC at fsync)"

    def fill(self) -> None:
        if self.real:
            self._ballast = fill(self.path)
            return
        root = str(self.path)

        def fsync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(root) and not os.path.isdir(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._real_fsync(fd)

        self._monkeypatch.setattr(os, "fsync", fsync)

    def clear(self) -> None:
        if self._ballast is not None:
            self._ballast.unlink()
            self._ballast = None
        self._monkeypatch.setattr(os, "fsync", self._real_fsync)

    def unmount(self) -> None:
        if self.real:
            unmount(self.path)
