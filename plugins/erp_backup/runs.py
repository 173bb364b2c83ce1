"""The Airflow run a task belongs to, and the one clock. Backup ids and windows derive from the run, never from now()."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any


def utcnow() -> datetime:
    """The current time, timezone-aware UTC. The one clock every module reads (tests patch it here)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class RunInfo:
    """The Airflow run a backup or drill belongs to."""

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

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> RunInfo:
        """From an Airflow task context. A manual run has no logical date: run_after stands in."""
        dag_run = context["dag_run"]
        return cls(
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
            run_after=dag_run.run_after,
            logical_date=context.get("logical_date") or getattr(dag_run, "logical_date", None),
            data_interval_start=context.get("data_interval_start"),
            data_interval_end=context.get("data_interval_end"),
        )
