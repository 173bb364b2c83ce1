"""The backup plan: load `include/backup_plan.yaml`, validate it, and expose typed jobs.

The plan is the single source of truth for schedules, retention, RPO/RTO and
connection ids. Every error names the file, the service and the field.

`load_plan` isolates service blocks: a broken block leaves that service out of
`Plan.jobs` and records why in `Plan.service_errors`, so the other services' DAGs,
the watchdog and the drill still load and can alert (dags/backup_plan_check.py fails
to import with the errors, for the UI). Anything outside `services` fails the whole
plan. `parse_plan` alone stays strict. Cron schedules have exactly 5 fields, and a
duplicate YAML key is an error naming its line (erp_backup.plan_yaml).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from croniter import croniter

from erp_backup import plan_yaml
from erp_backup.estate.config import EstatePlan, read_estate

PLAN_ENV = "ERP_BACKUP_PLAN"
BACKUP_ROOT_ENV = "ERP_BACKUP_ROOT"
OFFSITE_PATH_ENV = "ERP_OFFSITE_PATH"
OFFSITE_KIND_ENV = "ERP_OFFSITE_KIND"
DISABLE_ENV = "ERP_BACKUP_DISABLE"  # comma-separated services this deployment cannot reach
DEFAULT_PLAN_PATH = Path(__file__).resolve().parents[2] / "include" / "backup_plan.yaml"


def known_services() -> dict[str, frozenset[str]]:
    """Every service in the registry and the backup types its module implements. Anything else is a typo."""
    from erp_backup.services import all_services

    return {name: module.SUPPORTED_TYPES for name, module in all_services().items()}


_DURATION = re.compile(r"^(\d+)\s*([mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


class PlanError(ValueError):
    """The plan file is malformed. The message names the file, service and field."""


LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")


@dataclass(frozen=True)
class ObjectLockPlan:
    """S3 Object Lock on uploads: each object is retained until capture + the job's retention + `margin`."""

    mode: Literal["GOVERNANCE", "COMPLIANCE"]
    margin: timedelta


@dataclass(frozen=True)
class OffsitePlan:
    kind: Literal["s3", "filesystem"]
    conn_id: str  # uploads, listings, fetches: needs no DeleteObject
    bucket: str
    prefix: str
    path: str
    prune_conn_id: str = "backup_offsite_prune"  # retention_prune alone deletes, with this connection
    object_lock: ObjectLockPlan | None = None  # s3 only; off when the plan has no offsite.object_lock


@dataclass(frozen=True)
class EncryptionPlan:
    """Where the age keys come from: recipients for workers, the identity for restores and the drill."""

    recipients_conn_id: str = "backup_age_recipients"
    identity_conn_id: str = "backup_age_identity"


PULL_POLICIES = ("if-missing", "always", "never")
PROXY_KIND = "proxy"  # drill.docker.images key of the port forwarder (socat as its entrypoint)


@dataclass(frozen=True)
class DrillDockerPlan:
    """The Docker backend's images: `images` maps a scratch kind to an image reference in which
    `{image}` is the image the service asks for (`postgres:15`) and `{tag}` its tag (`15`)."""

    pull: Literal["if-missing", "always", "never"] = "if-missing"
    images: dict[str, str] = field(default_factory=dict)

    def image_for(self, kind: str, default: str) -> str:
        template = self.images.get(kind)
        if not template:
            return default
        _, _, tag = default.rpartition(":")
        return template.format(image=default, tag=tag if "/" not in tag else "latest")


@dataclass(frozen=True)
class DrillPlan:
    schedule: str
    timezone: str
    backend: Literal["local", "docker"]
    docker: DrillDockerPlan = field(default_factory=DrillDockerPlan)


@dataclass(frozen=True)
class BackupJob:
    """One (service, backup type): everything a DAG and its tasks need."""

    service: str
    backup_type: str
    schedule: str
    timezone: str
    retention: timedelta
    method: str
    rpo: timedelta
    rto: timedelta
    connections: dict[str, str]
    enabled: bool
    interval: timedelta | None = None
    options: dict[str, Any] = field(default_factory=dict)
    encrypt: bool = True  # age-encrypt the set (erp_backup.crypto); the plan's `encrypt`, per service

    @property
    def dag_id(self) -> str:
        return f"backup_{self.service}_{self.backup_type}"

    @property
    def source_conn_id(self) -> str:
        return self.connections["source"]


@dataclass(frozen=True)
class Plan:
    path: Path
    backup_root: Path
    timezone: str
    slack_conn_id: str
    offsite: OffsitePlan
    drill: DrillPlan
    jobs: tuple[BackupJob, ...]
    services_enabled: dict[str, bool]
    service_errors: dict[str, str] = field(default_factory=dict)  # service -> why its block was left out
    estate: EstatePlan | None = None  # whole-estate recovery (erp_backup.estate)
    encryption: EncryptionPlan = field(default_factory=EncryptionPlan)

    def job(self, service: str, backup_type: str) -> BackupJob:
        for job in self.jobs:
            if job.service == service and job.backup_type == backup_type:
                return job
        if service in self.service_errors:
            raise PlanError(self.service_errors[service])
        raise KeyError(f"{self.path}: no backup job {service}/{backup_type} in the plan")

    def raise_for_errors(self) -> None:
        """PlanError listing every broken service block; nothing when the plan is whole."""
        if self.service_errors:
            raise PlanError(
                f"{len(self.service_errors)} service block(s) of the backup plan are broken; their DAGs are not "
                "loaded:\n" + "\n".join(self.service_errors[name] for name in sorted(self.service_errors))
            )

    @property
    def enabled_jobs(self) -> tuple[BackupJob, ...]:
        return tuple(job for job in self.jobs if job.enabled)


class _Reader:
    """Reads one mapping of the plan, failing with the file and a dotted field path."""

    def __init__(self, path: Path, where: str, data: Any):
        self.path, self.where = path, where
        if not isinstance(data, dict):
            self.fail(f"must be a mapping, got {type(data).__name__}")
        self.data: dict[str, Any] = data

    def fail(self, message: str, key: str | None = None) -> PlanError:
        location = f"{self.where}.{key}" if key else self.where
        raise PlanError(f"{self.path}: {location}: {message}")

    def only(self, *allowed: str) -> None:
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            self.fail(f"unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})", unknown[0])

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                self.fail("missing required field", key)
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(f"must be {names}, got {value!r}", key)
        return value

    def sub(self, key: str, default: Any = ...) -> _Reader:
        return _Reader(self.path, f"{self.where}.{key}", self.get(key, dict, default))

    def cron(self, key: str) -> str:
        value = self.get(key, str)
        if not croniter.is_valid(value):
            self.fail(f"invalid cron expression {value!r}", key)
        fields = len(value.split())
        if fields != 5:
            why = ("; croniter reads a 6th field as seconds, so the job would fire every second of one minute"
                   if fields == 6 else "")
            self.fail(f"cron expression {value!r} has {fields} field(s): use exactly 5 "
                      f"(minute hour day-of-month month day-of-week){why}", key)
        return value

    def duration(self, key: str, default: Any = ...) -> timedelta:
        value = self.get(key, str, default)
        if isinstance(value, timedelta):
            return value
        match = _DURATION.match(value.strip())
        if not match or int(match.group(1)) <= 0:
            self.fail(f"invalid duration {value!r} (use e.g. 30m, 6h, 7d)", key)
        assert match is not None  # fail() raised otherwise
        return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})

    def timezone(self, key: str, default: str) -> str:
        import pendulum

        value = self.get(key, str, default)
        try:
            pendulum.timezone(value)
        except Exception:
            self.fail(f"unknown timezone {value!r}", key)
        return value


def _read_drill_docker(docker: _Reader) -> DrillDockerPlan:
    """`drill.docker`: the pull policy and an image per scratch kind (`erp_backup.scratch.local.KINDS`),
    and `proxy`, the port forwarder's image (socat as its entrypoint)."""
    from erp_backup.scratch.local import KINDS

    known = {*KINDS, PROXY_KIND}
    docker.only("pull", "images")
    pull = docker.get("pull", str, "if-missing")
    if pull not in PULL_POLICIES:
        docker.fail(f"must be one of {', '.join(PULL_POLICIES)}, got {pull!r}", "pull")
    images = docker.sub("images", {})
    for kind in images.data:
        if kind not in known:
            images.fail(f"unknown scratch kind {kind!r} (known: {', '.join(sorted(known))})", kind)
        template = images.get(kind, str)
        try:
            template.format(image="postgres:15", tag="15")
        except (KeyError, IndexError, ValueError) as exc:
            images.fail(f"image {template!r} may use only {{image}} and {{tag}} ({exc!r})", kind)
    return DrillDockerPlan(pull=cast(Literal["if-missing", "always", "never"], pull), images=dict(images.data))


def _disabled_by_env() -> set[str]:
    return {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}


def _read_job(plan: _Reader, name: str, svc: _Reader, type_name: str, tz: str) -> BackupJob:
    job = svc.sub("backups").sub(type_name)
    job.only("schedule", "retention_days", "method", "enabled", "interval", "timezone", "options")
    known = known_services()[name]
    if type_name not in known:
        job.fail(f"unknown backup type (known for {name}: {', '.join(sorted(known))})")
    retention_days = job.get("retention_days", int)
    if retention_days < 1:
        job.fail(f"must be a positive number of days, got {retention_days}", "retention_days")
    connections = svc.get("connections", dict)
    if "source" not in connections or not all(isinstance(v, str) and v for v in connections.values()):
        svc.fail("must map 'source' (and any other role) to a connection id", "connections")
    return BackupJob(
        service=name,
        backup_type=type_name,
        schedule=job.cron("schedule"),
        timezone=job.timezone("timezone", tz),
        retention=timedelta(days=retention_days),
        method=job.get("method", str),
        rpo=svc.duration("rpo"),
        rto=svc.duration("rto"),
        connections=dict(connections),
        enabled=svc.get("enabled", bool) and job.get("enabled", bool) and name not in _disabled_by_env(),
        interval=job.duration("interval", None) if "interval" in job.data else None,
        options={**svc.get("options", dict, {}), **job.get("options", dict, {})},
        encrypt=svc.get("encrypt", bool, True),
    )


def _read_service(top: _Reader, services: _Reader, name: str, tz: str) -> tuple[list[BackupJob], bool]:
    """One service block: its jobs, and whether the service is enabled."""
    known = known_services()
    if name not in known:
        services.fail(f"unknown service (known: {', '.join(sorted(known))})", name)
    svc = services.sub(name)
    svc.only("enabled", "rpo", "rto", "connections", "options", "backups", "encrypt")
    enabled = svc.get("enabled", bool) and name not in _disabled_by_env()
    return [_read_job(top, name, svc, type_name, tz) for type_name in svc.sub("backups").data], enabled


def _read_offsite(offsite: _Reader) -> OffsitePlan:
    offsite.only("kind", "conn_id", "prune_conn_id", "bucket", "prefix", "path", "object_lock")
    kind = os.environ.get(OFFSITE_KIND_ENV) or offsite.get("kind", str)
    if kind not in ("s3", "filesystem"):
        offsite.fail(f"must be 's3' or 'filesystem', got {kind!r}", "kind")
    for needed in ("conn_id", "bucket") if kind == "s3" else ("path",):
        if not offsite.get(needed, str, "") and not (needed == "path" and os.environ.get(OFFSITE_PATH_ENV)):
            offsite.fail(f"required when kind is {kind!r}", needed)
    return OffsitePlan(
        kind=cast(Literal["s3", "filesystem"], kind),
        conn_id=offsite.get("conn_id", str, ""),
        bucket=offsite.get("bucket", str, ""),
        prefix=offsite.get("prefix", str, "").strip("/"),
        path=os.environ.get(OFFSITE_PATH_ENV) or offsite.get("path", str, ""),
        prune_conn_id=offsite.get("prune_conn_id", str, "backup_offsite_prune"),
        object_lock=_read_object_lock(offsite, kind),
    )


def _read_object_lock(offsite: _Reader, kind: str) -> ObjectLockPlan | None:
    """`offsite.object_lock`: {mode: GOVERNANCE|COMPLIANCE, margin: 1d}; None when absent."""
    if "object_lock" not in offsite.data:
        return None
    if kind != "s3":
        offsite.fail(f"S3 Object Lock needs kind 's3', not {kind!r}", "object_lock")
    lock = offsite.sub("object_lock")
    lock.only("mode", "margin")
    mode = lock.get("mode", str)
    if mode not in LOCK_MODES:
        lock.fail(f"must be one of {', '.join(LOCK_MODES)}, got {mode!r}", "mode")
    return ObjectLockPlan(mode=cast(Literal["GOVERNANCE", "COMPLIANCE"], mode), margin=lock.duration("margin"))


def _read_services(top: _Reader, tz: str, isolate_services: bool,
                   broken: dict[str, str]) -> tuple[list[BackupJob], dict[str, bool], dict[str, str]]:
    """(jobs, enabled per service, errors per broken service block); strict unless `isolate_services`."""
    services = top.sub("services")
    jobs: list[BackupJob] = []
    enabled: dict[str, bool] = {}
    service_errors: dict[str, str] = {}
    for name in services.data:
        try:
            if name in broken:
                raise PlanError(broken[name])
            service_jobs, enabled[name] = _read_service(top, services, name, tz)
            jobs.extend(service_jobs)
        except PlanError as exc:
            if not isolate_services:
                raise
            service_errors[str(name)] = str(exc)
    return jobs, enabled, service_errors


def parse_plan(path: Path, data: Any, *, isolate_services: bool = False,
               broken: dict[str, str] | None = None) -> Plan:
    """Validate the plan's data. Strict by default: the first error raises PlanError.

    With `isolate_services`, an error inside one service block (or one given in `broken`,
    service -> message) leaves that service out and is recorded in `Plan.service_errors`.
    """
    top = _Reader(path, "plan", data)
    top.only("version", "backup_root", "timezone", "alerts", "offsite", "drill", "services", "staging", "estate", "encryption")
    if top.get("version", int) != 1:
        top.fail("only version 1 is supported", "version")
    tz = top.timezone("timezone", "Asia/Seoul")

    alerts = top.sub("alerts")
    alerts.only("slack_conn_id")

    offsite_plan = _read_offsite(top.sub("offsite"))

    drill = top.sub("drill")
    drill.only("schedule", "timezone", "backend", "docker")
    backend = drill.get("backend", str, "local")
    if backend not in ("local", "docker"):
        drill.fail(f"must be 'local' or 'docker', got {backend!r}", "backend")
    drill_docker = _read_drill_docker(drill.sub("docker", {}))

    jobs, enabled, service_errors = _read_services(top, tz, isolate_services, broken or {})

    keys = top.sub("encryption", {})
    keys.only("recipients_conn_id", "identity_conn_id")
    encryption = EncryptionPlan(**{name: keys.get(name, str) for name in keys.data})

    root = os.environ.get(BACKUP_ROOT_ENV) or top.get("backup_root", str)
    return Plan(
        path=path,
        backup_root=Path(root),
        timezone=tz,
        slack_conn_id=alerts.get("slack_conn_id", str),
        offsite=offsite_plan,
        drill=DrillPlan(schedule=drill.cron("schedule"), timezone=drill.timezone("timezone", tz), backend=backend,
                        docker=drill_docker),
        jobs=tuple(jobs),
        services_enabled=enabled,
        service_errors=service_errors,
        estate=read_estate(top, tz, set(known_services())),
        encryption=encryption,
    )


def load_plan(path: str | os.PathLike[str] | None = None) -> Plan:
    """Load and validate the plan (default: $ERP_BACKUP_PLAN or include/backup_plan.yaml).

    A broken service block is left out and listed in `Plan.service_errors`; any other error raises PlanError.
    """
    resolved = Path(path or os.environ.get(PLAN_ENV) or DEFAULT_PLAN_PATH)
    env = tuple(os.environ.get(name) for name in (BACKUP_ROOT_ENV, OFFSITE_PATH_ENV, OFFSITE_KIND_ENV, DISABLE_ENV))
    return _load_cached(resolved, env)


@lru_cache(maxsize=8)
def _load_cached(path: Path, _env: tuple[str | None, ...]) -> Plan:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"{path}: cannot read the backup plan: {exc.strerror}") from exc
    try:
        data, duplicates = plan_yaml.load(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML: {exc}") from exc
    outside = [d.message(path) for d in duplicates if d.service is None]
    if outside:
        raise PlanError("\n".join(outside))
    broken: dict[str, str] = {}
    for duplicate in duplicates:
        broken.setdefault(str(duplicate.service), duplicate.message(path))
    return parse_plan(path, data, isolate_services=True, broken=broken)
