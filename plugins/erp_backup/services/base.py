"""The contract every service module follows: one typed set of verbs, the same for every service.

A service is one module (or package) under ``erp_backup/services/``. The registry
(``erp_backup.services``) finds it by its file name and derives everything else from it:
the plan's known services and types, the drill's types and scratch targets, and the
CLI's restore targets. Nothing outside ``services/`` names a service.

Every verb is declared by every module, borgmatic-style, even where it does nothing:
modules that need no special behaviour re-export the defaults below, e.g.
``from erp_backup.services.base import no_protected_sets as protected_sets``.

Module attributes:

- ``SUPPORTED_TYPES``: the backup types it implements (``{"full"}``).
- ``RESTORE_TYPES``: the types ``restore`` takes alone (a subset of SUPPORTED_TYPES).
- ``DRILL_TYPES``: the types the weekly drill may pick (a subset of RESTORE_TYPES).
- ``PITR_TYPES``: the types that together restore to a point in time (empty for most).
- ``RESTORE_OPTIONS``: the option names ``restore`` accepts (the CLI refuses others).
- ``CLEAR_DETAILS``: the manifest details that stay readable in an encrypted set's clear
  manifest (erp_backup.sealing), for retention, the watchdog and the drill's choice:
  positions, sizes and versions, never names or contents.
- ``DEFAULT_PORTS``: the port each connection role listens on when its connection names
  none (``{"source": 5432}``), so the drill's production guard can compare addresses.

Verbs (see :class:`ServiceModule` for the signatures):

- ``backup(ctx)``: write data files into ``ctx.set_dir`` through ``erp_backup.stream``
  and describe them; the caller writes the manifest.
- ``verify(backup_set, manifest)``: checks beyond the SHA-256s; returns problems.
- ``restore(set_dir, manifest, target, *, dry_run, options)``: restore a verified set.
  Never raises for a content mismatch: mismatches are ``problems`` in the report.
  With ``dry_run`` it changes nothing and lists what it would do in ``actions``.
- ``check_restored(target, set_dir, manifest, report, ctx)``: the drill's checks of
  the restored data against the manifest.
- ``target_from_cli(backup_type, target, target_conn, get_connection)``: what
  ``restore`` takes, from the CLI's ``--target``/``--target-conn``.
- ``scratch_spec(backup_type, versions, *, pitr)``: the scratch server the drill starts.
- ``scratch_target(info)``: what ``restore`` takes, for a started scratch server.
- ``versions(manifest)``: server versions recorded in a manifest (for scratch images).
- ``source_size(manifest)``: the production size a manifest records, for RTO extrapolation.
- ``protected_sets(plan, job, *, now, offsite)`` and ``after_prune(plan, job, *, now, dry_run)``:
  retention hooks.
- ``plan_point_in_time(manifests, at)`` and ``restore_to_time(root, at, target, *, dry_run, owner, identities)``:
  point-in-time recovery, for services with PITR_TYPES (``identities`` opens what the
  service sealed itself, such as PostgreSQL's sealed WAL archive; None: the plan's).
- ``point_in_time_range(manifests)``: the span (earliest, latest) a point-in-time restore
  reaches from the newest base (None without PITR), for the drill's random target time.
- ``sets_at(manifests, at)``: the sets a whole-estate recovery to ``at`` restores, for a
  service without PITR: the newest set captured at or before ``at`` (``newest_set_at``), or
  the newest of each type when the types complement each other (``newest_set_of_each_type_at``).
- ``read_records(target, source)``: the records of a restored target that the estate's
  cross-service reference checks compare, as plain dicts; ``source`` is the plan's
  ``estate.references`` entry (table, bucket, collection, fields).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from erp_backup.manifest import FileEntry, Manifest
from erp_backup.plan import BackupJob, Plan
from erp_backup.runs import RunInfo
from erp_backup.sets import BackupSet

if TYPE_CHECKING:
    from erp_backup.scratch.base import TargetInfo

log = logging.getLogger(__name__)

__all__ = [
    "BackupContext",
    "BackupOutcome",
    "CheckContext",
    "Checks",
    "CliTarget",
    "ConnectionMissing",
    "ContainerSpec",
    "PointInTimeChain",
    "PointInTimeUnavailable",
    "RecordsUnavailable",
    "RestoreCheckFailed",
    "RestoreReport",
    "RunInfo",
    "ScratchSpec",
    "ServiceModule",
    "SourceUnavailable",
    "TargetUsageError",
    "airflow_connection",
    "newest_set_at",
    "newest_set_of_each_type_at",
    "no_after_prune",
    "no_point_in_time",
    "no_protected_sets",
    "no_records",
    "no_restore_to_time",
]


class SourceUnavailable(RuntimeError):
    """The service to back up cannot be reached. The message names the connection and host."""


class ConnectionMissing(LookupError):
    """An Airflow connection the plan names is not defined."""


class TargetUsageError(ValueError):
    """A restore target given on the command line is malformed. The message says what is expected."""


class PointInTimeUnavailable(ValueError):
    """No retained chain covers the requested time. The message gives the covered range."""


class RecordsUnavailable(ValueError):
    """A service keeps no records the reference checks can read, or the mapping names none."""


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


@dataclass
class RestoreReport:
    """What a restore did: the same shape for every service.

    ``problems`` are mismatches found by the restore's own checks; a restore with
    problems finished, but its data does not match the manifest. ``actions`` lists
    what a dry run would do (or what a real run did). ``details`` is service-specific
    (per-database results, durations, counts) and JSON-serialisable.
    """

    restored_bytes: int = 0
    prepared_only: bool = False  # placed for a by-hand runbook, not restored into a running service: no RTO
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    dry_run: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"restored_bytes": self.restored_bytes, "prepared_only": self.prepared_only, "checks": list(self.checks), "problems": list(self.problems),
                "actions": list(self.actions), "dry_run": self.dry_run, "details": dict(self.details)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RestoreReport:
        return cls(restored_bytes=int(data.get("restored_bytes") or 0), prepared_only=bool(data.get("prepared_only")),
                   checks=list(data.get("checks") or []),
                   problems=list(data.get("problems") or []), actions=list(data.get("actions") or []),
                   dry_run=bool(data.get("dry_run")), details=dict(data.get("details") or {}))

    def raise_for_problems(self, what: str) -> RestoreReport:
        """Raise RestoreCheckFailed naming `what` when the restore found mismatches."""
        if self.problems:
            raise RestoreCheckFailed(what, self)
        return self


class RestoreCheckFailed(RuntimeError):
    """A restore finished, but its data does not match the manifest. Carries the report."""

    def __init__(self, what: str, report: RestoreReport):
        shown = "; ".join(report.problems[:8]) + (f"; and {len(report.problems) - 8} more" if len(report.problems) > 8 else "")
        super().__init__(f"{what}: the restored data does not match the manifest: {shown}")
        self.report = report


@dataclass
class Checks:
    """What the drill's check of a restored target found: passed checks and problems, as sentences."""

    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class CheckContext:
    """What `check_restored` may need beyond the data: the production guard and the drill's choices."""

    guard: Callable[[str, int], None]  # raises if (host, port) is a production endpoint
    keep_scratch: bool = False
    at: datetime | None = None  # the point-in-time target, for PITR drills


@dataclass(frozen=True)
class ContainerSpec:
    """A scratch container: image, the port the server listens on inside it, and its settings.

    ``secret_env`` names the variables the backend sets to the target's one-off scratch
    password, so no secret ever passes through a service module or a spec.
    ``uri_scheme`` makes the target's address a URI (``http://host:port``) for clients that take one.
    """

    image: str
    port: int
    environment: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] | None = None
    secret_env: tuple[str, ...] = ()
    uri_scheme: str | None = None


@dataclass(frozen=True)
class ScratchSpec:
    """The scratch server a drill starts for one set.

    ``kind`` names a server in ``erp_backup.scratch`` (postgres, postgres_cluster,
    redis, rabbitmq, etcd, s3, milvus_lite, directory). ``container`` is the image
    the Docker backend runs instead; None means this target always runs locally.
    """

    kind: str
    container: ContainerSpec | None = None
    major: int | None = None  # the server major version local binaries must match (PostgreSQL)


@dataclass(frozen=True)
class CliTarget:
    """What `restore` takes, from the command line, and how to show it without secrets."""

    target: Any
    description: str


@dataclass(frozen=True)
class PointInTimeChain:
    """The sets a point-in-time restore needs: a base and what is replayed on it."""

    base: Manifest
    sets: tuple[tuple[str, str], ...]  # (backup_type, backup_id), base first
    replay_bytes: int
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class ServiceModule(Protocol):
    """The verbs every service module declares. A module satisfies it structurally."""

    SUPPORTED_TYPES: frozenset[str]
    RESTORE_TYPES: frozenset[str]
    DRILL_TYPES: frozenset[str]
    PITR_TYPES: frozenset[str]
    RESTORE_OPTIONS: frozenset[str]
    DEFAULT_PORTS: Mapping[str, int]
    CLEAR_DETAILS: frozenset[str]

    def backup(self, ctx: BackupContext) -> BackupOutcome: ...

    def verify(self, backup_set: BackupSet, manifest: Manifest) -> list[str]: ...

    def restore(self, set_dir: Path, manifest: Manifest, target: Any, *, dry_run: bool = False,
                options: Mapping[str, Any] | None = None) -> RestoreReport: ...

    def check_restored(self, target: Any, set_dir: Path, manifest: Manifest, report: RestoreReport,
                       ctx: CheckContext) -> Checks: ...

    def target_from_cli(self, backup_type: str, target: str | None, target_conn: str | None,
                        get_connection: Callable[[str], Any]) -> CliTarget: ...

    def scratch_spec(self, backup_type: str, versions: Mapping[str, Any], *, pitr: bool = False) -> ScratchSpec: ...

    def scratch_target(self, info: TargetInfo) -> Any: ...

    def versions(self, manifest: Manifest) -> dict[str, Any]: ...

    def source_size(self, manifest: Manifest) -> int | None: ...

    def protected_sets(self, plan: Plan, job: BackupJob, *, now: datetime, offsite: Any = None) -> Mapping[str, str]: ...

    def after_prune(self, plan: Plan, job: BackupJob, *, now: datetime, dry_run: bool) -> dict[str, Any]: ...

    def plan_point_in_time(self, manifests: Sequence[Manifest], at: datetime) -> PointInTimeChain: ...

    def restore_to_time(self, root: Path, at: datetime, target: Any, *, dry_run: bool = False,
                        owner: str | None = None,
                        identities: Callable[[], Sequence[Any]] | None = None) -> RestoreReport: ...

    def point_in_time_range(self, manifests: Sequence[Manifest]) -> tuple[datetime, datetime] | None: ...

    def sets_at(self, manifests: Sequence[Manifest], at: datetime) -> list[Manifest]: ...

    def read_records(self, target: Any, source: Mapping[str, Any]) -> list[dict[str, Any]]: ...


# ───────────────────────── defaults a module re-exports ─────────────────────────


def no_protected_sets(plan: Plan, job: BackupJob, *, now: datetime, offsite: Any = None) -> Mapping[str, str]:
    """No set is kept beyond the generic retention policy."""
    return {}


def no_after_prune(plan: Plan, job: BackupJob, *, now: datetime, dry_run: bool) -> dict[str, Any]:
    """Nothing to tidy after a prune."""
    return {}


def no_point_in_time(manifests: Sequence[Manifest], at: datetime) -> PointInTimeChain:
    raise PointInTimeUnavailable("this service has no point-in-time recovery (PITR_TYPES is empty)")


def no_point_in_time_range(manifests: Sequence[Manifest]) -> tuple[datetime, datetime] | None:
    """No point-in-time recovery: no range."""
    return None


def no_restore_to_time(root: Path, at: datetime, target: Any, *, dry_run: bool = False,
                       owner: str | None = None, identities: Callable[[], Sequence[Any]] | None = None) -> RestoreReport:
    raise PointInTimeUnavailable("this service has no point-in-time recovery (PITR_TYPES is empty)")


def _captured(manifest: Manifest) -> datetime:
    return manifest.captured_finished_at


def newest_set_at(manifests: Sequence[Manifest], at: datetime) -> list[Manifest]:
    """The newest set (of any type) captured at or before `at`: types that each restore the whole service."""
    before = [m for m in manifests if _captured(m) <= at]
    return [max(before, key=lambda m: (_captured(m), m.backup_id))] if before else []


def newest_set_of_each_type_at(manifests: Sequence[Manifest], at: datetime) -> list[Manifest]:
    """The newest set of each type captured at or before `at`: types that restore different parts."""
    chosen = []
    for backup_type in sorted({m.backup_type for m in manifests}):
        chosen += newest_set_at([m for m in manifests if m.backup_type == backup_type], at)
    return chosen


def no_records(target: Any, source: Mapping[str, Any]) -> list[dict[str, Any]]:
    raise RecordsUnavailable("this service keeps no records the estate's reference checks can read")


def connection_for(conn_id: str, get_connection: Callable[[str], Any]) -> Any:
    """A connection by id, with an error that says how to define it."""
    try:
        return get_connection(conn_id)
    except Exception as exc:
        raise ConnectionMissing(
            f"connection {conn_id!r} is not defined or unreadable: {exc}. "
            f"Define it in Admin → Connections or as AIRFLOW_CONN_{conn_id.upper()}"
        ) from exc


def airflow_connection(conn_id: str) -> Any:
    """Look a connection up through the Task SDK (only called inside tasks and the CLI)."""
    from airflow.sdk import BaseHook

    return BaseHook.get_connection(conn_id)
