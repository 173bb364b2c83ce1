"""The contract every service module follows: the same verbs for every service.

A service module exposes:

- ``SUPPORTED_TYPES``: the backup types it implements (e.g. ``{"full"}``).
- ``backup(ctx: BackupContext) -> BackupOutcome``: write data files into
  ``ctx.set_dir`` (through ``erp_backup.stream`` so the SHA-256 is computed
  while streaming) and describe them. The caller writes the manifest.
- ``verify(backup_set, manifest) -> list[str]``: service-specific checks beyond
  the SHA-256s (archive parses, counts present...). Returns problems, empty if fine.
- ``restore(set_dir, manifest, target, **options) -> dict``: restore a verified
  set into ``target`` and return a report (durations, counts, what was checked).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from erp_backup.manifest import FileEntry
from erp_backup.plan import BackupJob
from erp_backup.sets import BackupSet

log = logging.getLogger(__name__)


class SourceUnavailable(RuntimeError):
    """The service to back up cannot be reached. The message names the connection and host."""


class ConnectionMissing(LookupError):
    """An Airflow connection the plan names is not defined."""


@dataclass(frozen=True)
class RunInfo:
    """The Airflow run a backup belongs to. Backup ids and windows derive from it, never from now()."""

    dag_id: str
    run_id: str
    run_after: datetime
    logical_date: datetime | None = None
    data_interval_start: datetime | None = None
    data_interval_end: datetime | None = None

    @property
    def moment(self) -> datetime:
        """The run's identity instant: logical_date, or run_after for manual runs."""
        return self.logical_date or self.run_after

    def window(self, interval: timedelta | None) -> tuple[datetime, datetime]:
        """The data window [start, end): the data interval, else (moment - interval, moment)."""
        if self.data_interval_start and self.data_interval_end and self.data_interval_start < self.data_interval_end:
            return self.data_interval_start, self.data_interval_end
        end = self.moment
        return end - (interval or timedelta(0)), end

    def as_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "dag_id": self.dag_id,
            "run_id": self.run_id,
            "run_after": iso(self.run_after),
            "logical_date": iso(self.logical_date),
            "data_interval_start": iso(self.data_interval_start),
            "data_interval_end": iso(self.data_interval_end),
        }


@dataclass
class BackupContext:
    job: BackupJob
    backup_set: BackupSet
    run: RunInfo
    get_connection: Callable[[str], Any]

    @property
    def set_dir(self) -> Path:
        return self.backup_set.path

    @property
    def options(self) -> dict[str, Any]:
        return self.job.options

    def conn_id(self, role: str = "source") -> str:
        try:
            return self.job.connections[role]
        except KeyError as exc:
            raise ConnectionMissing(
                f"the plan gives {self.job.service} no '{role}' connection (services.{self.job.service}.connections)"
            ) from exc

    def connection(self, role: str = "source") -> Any:
        """The Airflow connection for a role, with an error that says how to define it."""
        conn_id = self.conn_id(role)
        try:
            return self.get_connection(conn_id)
        except Exception as exc:
            raise ConnectionMissing(
                f"connection {conn_id!r} ({self.job.service} {role}) is not defined or unreadable: {exc}. "
                f"Define it in Admin → Connections or as AIRFLOW_CONN_{conn_id.upper()}"
            ) from exc


@dataclass
class BackupOutcome:
    files: list[FileEntry]
    source: dict[str, Any]
    tools: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    # Things an operator must hear about that do not fail the backup; posted to Slack once.
    warnings: list[str] = field(default_factory=list)


def airflow_connection(conn_id: str) -> Any:
    """Look a connection up through the Task SDK (only called inside tasks)."""
    from airflow.sdk import BaseHook

    return BaseHook.get_connection(conn_id)
