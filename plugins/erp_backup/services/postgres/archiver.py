"""The server side of WAL archiving: `pg_stat_archiver` and the files waiting to be archived.

Owns reading the archiver's status over psycopg and judging it (pure): archiving
off or failing, a stale archive, a grown failed_count. The `wal` backup
(``wal.py``) records the status in its manifest and fails on the problems.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from erp_backup.services.base import SourceUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchiverStatus:
    checked_at: datetime
    server_version: str
    archive_mode: str
    archive_timeout_s: int
    archived_count: int
    last_archived_wal: str | None
    last_archived_time: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None
    stats_reset: datetime | None
    ready_count: int | None  # .ready files waiting in pg_wal/archive_status (None: not readable)
    oldest_ready: str | None
    oldest_ready_since: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            key: (value.isoformat() if isinstance(value, datetime) else value)
            for key, value in self.__dict__.items()
        }


def archiver_findings(
    status: ArchiverStatus,
    previous: Mapping[str, Any] | None,
    archive_timeout: timedelta,
    margin: timedelta,
) -> tuple[list[str], list[str]]:
    """(problems that fail the task, warnings recorded in the manifest). Pure.

    `previous` is the archiver record of the most recently captured WAL set.
    """
    problems: list[str] = []
    warnings: list[str] = []
    if status.archive_mode not in ("on", "always"):
        problems.append(f"archive_mode is {status.archive_mode!r} on the server: WAL is not archived (set archive_mode=on and restart)")
    if status.archive_timeout_s == 0:
        warnings.append("archive_timeout is 0 on the server: a quiet database can leave commits unarchived for hours")
    elif status.archive_timeout_s > archive_timeout.total_seconds():
        warnings.append(
            f"archive_timeout on the server is {status.archive_timeout_s}s, longer than the plan's "
            f"{int(archive_timeout.total_seconds())}s"
        )

    failing_now = status.last_failed_time is not None and (
        status.last_archived_time is None or status.last_failed_time >= status.last_archived_time
    )
    if failing_now and status.last_failed_time is not None:
        problems.append(
            f"WAL archiving is failing: last failure on {status.last_failed_wal} at "
            f"{status.last_failed_time.isoformat()} (failed_count {status.failed_count}), nothing archived since; "
            f"see 'archive command failed' in the PostgreSQL server log"
        )

    grew_by = failed_count_growth(status, previous)
    if grew_by and not failing_now:
        warnings.append(
            f"failed_count grew by {grew_by} since the previous WAL backup (last failure {status.last_failed_wal} "
            f"at {status.last_failed_time.isoformat() if status.last_failed_time else '?'}), "
            f"but archiving has succeeded since; the continuity check decides whether anything was lost"
        )

    limit = archive_timeout + margin
    if status.oldest_ready_since is not None and status.checked_at - status.oldest_ready_since > limit:
        problems.append(
            f"{status.oldest_ready} has been waiting to be archived since {status.oldest_ready_since.isoformat()} "
            f"({status.ready_count} file(s) waiting), longer than archive_timeout + margin ({_span(limit)})"
        )
    elif status.ready_count is None and status.last_archived_time is not None and status.checked_at - status.last_archived_time > limit:
        problems.append(
            f"last WAL archived at {status.last_archived_time.isoformat()}, more than archive_timeout + margin "
            f"({_span(limit)}) ago (grant pg_monitor to the backup role so waiting files can be checked instead)"
        )
    return problems, warnings


def failed_count_growth(status: ArchiverStatus, previous: Mapping[str, Any] | None) -> int:
    if not previous or "failed_count" not in previous:
        return 0
    before = previous.get("stats_reset")
    same_epoch = (datetime.fromisoformat(before) if before else None) == status.stats_reset
    baseline = int(previous["failed_count"]) if same_epoch else 0
    return max(0, status.failed_count - baseline)


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds // 60} min" if seconds % 60 == 0 and seconds >= 60 else f"{seconds}s"


def connect_kwargs(conn: Any) -> dict[str, Any]:
    """psycopg keyword arguments from an Airflow connection (password stays out of any argv)."""
    kwargs: dict[str, Any] = {
        "host": conn.host or "127.0.0.1",
        "port": int(conn.port or 5432),
        "user": conn.login or "postgres",
        "dbname": conn.schema or "postgres",
        "connect_timeout": 10,
        "application_name": "erp_backup",
    }
    if conn.password:
        kwargs["password"] = conn.password
    return kwargs


def read_archiver_status(conn: Any, conn_id: str) -> ArchiverStatus:
    """Query pg_stat_archiver and the waiting .ready files over psycopg."""
    import psycopg

    kwargs = connect_kwargs(conn)
    try:
        with psycopg.connect(**kwargs, autocommit=True) as db:
            row = db.execute(
                "SELECT archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal,"
                " last_failed_time, stats_reset, now(), current_setting('server_version'),"
                " current_setting('archive_mode'),"
                " (SELECT setting::int FROM pg_settings WHERE name = 'archive_timeout')"
                " FROM pg_stat_archiver"
            ).fetchone()
            assert row is not None
            ready_count = oldest_ready = oldest_since = None
            try:
                ready = db.execute(
                    "SELECT count(*) OVER (), name, modification FROM pg_ls_archive_statusdir()"
                    " WHERE name LIKE '%.ready' ORDER BY modification, name LIMIT 1"
                ).fetchone()
                ready_count = ready[0] if ready else 0
                if ready:
                    oldest_ready, oldest_since = ready[1].removesuffix(".ready"), ready[2]
            except psycopg.errors.InsufficientPrivilege:
                log.warning("%s: cannot list pg_wal/archive_status (needs pg_monitor); using last_archived_time", conn_id)
    except psycopg.OperationalError as exc:
        raise SourceUnavailable(
            f"cannot connect to PostgreSQL connection {conn_id!r} at {kwargs['host']}:{kwargs['port']} "
            f"to check pg_stat_archiver: {str(exc).strip()}"
        ) from exc
    return ArchiverStatus(
        checked_at=row[7],
        server_version=row[8],
        archive_mode=row[9],
        archive_timeout_s=int(row[10]),
        archived_count=row[0],
        last_archived_wal=row[1],
        last_archived_time=row[2],
        failed_count=row[3],
        last_failed_wal=row[4],
        last_failed_time=row[5],
        stats_reset=row[6],
        ready_count=ready_count,
        oldest_ready=oldest_ready,
        oldest_ready_since=oldest_since,
    )

