"""The drill's run parameters: the trigger form (Airflow Params) and their validation.

`drill_params(plan)` builds the form at parse time from the plan alone.
`parse_request` validates a run's params in the first task; every error lists
what is valid, so the operator can fix the trigger form.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from erp_backup.drill.pick import derive_seed
from erp_backup.plan import Plan
from erp_backup.services import get_service

ALL = "all"
RANDOM = "random"
SOURCES = ("offsite", "local")
BACKENDS = ("local", "docker")

_BACKUP_ID = re.compile(r"^(?:(?P<type>[a-z]+)/)?(?P<id>\d{8}T\d{6}Z)$")


class DrillParamError(ValueError):
    """A run parameter is invalid. The message says what is valid."""


@dataclass(frozen=True)
class DrillRequest:
    service: str  # ALL, RANDOM or a service name
    backup_id: str | None
    backup_type: str | None  # when backup_id was given as "<type>/<id>"
    source: Literal["offsite", "local"]
    target_time: datetime | None
    keep_scratch: bool
    seed: int
    seed_from: str  # "param" or "run id"
    backend: Literal["local", "docker"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "backup_id": self.backup_id,
            "backup_type": self.backup_type,
            "source": self.source,
            "target_time": self.target_time.isoformat() if self.target_time else None,
            "keep_scratch": self.keep_scratch,
            "seed": self.seed,
            "seed_from": self.seed_from,
            "backend": self.backend,
        }


def drillable_services(plan: Plan) -> list[str]:
    """Enabled services with at least one enabled job of a type a drill restores."""
    return sorted({job.service for job in plan.enabled_jobs if plan.services_enabled.get(job.service)
                   and job.backup_type in get_service(job.service).DRILL_TYPES})


def drill_types(plan: Plan, service: str) -> list[str]:
    """The enabled, drillable backup types of a service."""
    return sorted(job.backup_type for job in plan.enabled_jobs
                  if job.service == service and job.backup_type in get_service(service).DRILL_TYPES)


def pitr_services(plan: Plan) -> list[str]:
    """Enabled services that can restore to a point in time, with every PITR type enabled."""
    found = []
    for service in sorted({job.service for job in plan.enabled_jobs if plan.services_enabled.get(job.service)}):
        wanted = get_service(service).PITR_TYPES
        enabled = {job.backup_type for job in plan.enabled_jobs if job.service == service}
        if wanted and wanted <= enabled:
            found.append(service)
    return found


def drill_params(plan: Plan) -> dict[str, Any]:
    """The trigger form. Defaults are what the weekly run does.

    Optional fields are nullable (`type=["null", ...]`, default None): Airflow's form marks a field whose
    type excludes null as required, which would keep the Trigger button disabled with the defaults.
    """
    from airflow.sdk import Param

    services = drillable_services(plan)
    pitr = ", ".join(pitr_services(plan)) or "none enabled"
    return {
        "service": Param(
            ALL, type="string", enum=[ALL, RANDOM, *services],
            description=f"'{ALL}': one set of every enabled service (the weekly run); '{RANDOM}': one service, "
            "weighted towards the least recently drilled; or one service by name.",
        ),
        "backup_id": Param(
            None, type=["null", "string"],
            description="A backup id (e.g. 20261126T020000Z, or full/20261126T020000Z when a service has several "
            "types) to drill that set; empty: a weighted random complete set within retention. Needs a service.",
        ),
        "source": Param(
            "offsite", type="string", enum=list(SOURCES),
            description="Where the set comes from: 'offsite' (the plan's offsite store, checksums verified on "
            "download) or 'local' (staging under BACKUP_ROOT, checksums verified in place).",
        ),
        "target_time": Param(
            None, type=["null", "string"],
            description="Point-in-time restore: an ISO 8601 time with offset (e.g. 2026-11-26T10:15:00+09:00); "
            f"needs a service that can restore to a point in time ({pitr}). Empty: no PITR.",
        ),
        "keep_scratch": Param(
            False, type="boolean",
            description="Leave the scratch target running after the drill for inspection (fetched files are "
            "still removed). The next drill removes it.",
        ),
        "seed": Param(
            None, type=["null", "integer"],
            description="Random seed for the pick; empty: derived from the run id, so a rerun picks the same sets.",
        ),
        "backend": Param(
            plan.drill.backend, type="string", enum=list(BACKENDS),
            description="Scratch targets: 'local' (scratch processes on 127.0.0.1) or 'docker' (containers on an "
            "internal network). Default from the plan (drill.backend).",
        ),
    }


def _text(params: Mapping[str, Any], key: str) -> str:
    value = params.get(key)
    return "" if value is None else str(value).strip()


def parse_target_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise DrillParamError(
            f"target_time {text!r} is not an ISO 8601 time; use e.g. 2026-11-26T10:15:00+09:00"
        ) from None
    if moment.tzinfo is None:
        raise DrillParamError(f"target_time {text!r} has no UTC offset; add one, e.g. {text}+09:00 for Asia/Seoul")
    return moment


def _backup_id(params: Mapping[str, Any], service: str, services: list[str]) -> tuple[str | None, str | None]:
    """(backup id, backup type) from `backup_id` (`<id>` or `<type>/<id>`); (None, None) when empty."""
    raw_id = _text(params, "backup_id")
    if not raw_id:
        return None, None
    match = _BACKUP_ID.match(raw_id)
    if not match:
        raise DrillParamError(
            f"backup_id {raw_id!r} is not a backup id; use <YYYYMMDDTHHMMSSZ> (e.g. 20261126T020000Z) "
            "or <type>/<id> (e.g. full/20261126T020000Z), or leave it empty for a random set"
        )
    if service in (ALL, RANDOM):
        raise DrillParamError(f"backup_id {raw_id!r} needs a service: set service to one of {', '.join(services)}")
    return match.group("id"), match.group("type")


def _seed(params: Mapping[str, Any], run_id: str) -> tuple[int, str]:
    raw_seed = params.get("seed")
    if raw_seed in (None, ""):
        return derive_seed(run_id), "run id"
    try:
        return int(raw_seed), "param"
    except (TypeError, ValueError):
        raise DrillParamError(f"seed {raw_seed!r} is not an integer; give an integer or leave it empty") from None


def parse_request(params: Mapping[str, Any], plan: Plan, run_id: str) -> DrillRequest:
    """Validate a run's params against the plan. Raises DrillParamError listing the valid values."""
    services = drillable_services(plan)
    service = _text(params, "service") or ALL
    if service not in (ALL, RANDOM, *services):
        raise DrillParamError(
            f"service {service!r} is not an enabled, drillable service of the plan {plan.path}; "
            f"valid: {', '.join([ALL, RANDOM, *services])}"
        )
    source = _text(params, "source") or "offsite"
    if source not in SOURCES:
        raise DrillParamError(f"source {source!r} is not valid; valid: {', '.join(SOURCES)}")
    backend = _text(params, "backend") or plan.drill.backend
    if backend not in BACKENDS:
        raise DrillParamError(f"backend {backend!r} is not valid; valid: {', '.join(BACKENDS)}")

    backup_id, backup_type = _backup_id(params, service, services)
    target_time = None
    raw_time = _text(params, "target_time")
    if raw_time:
        if service not in pitr_services(plan):
            raise DrillParamError(
                f"target_time is for a point-in-time restore: set service to one of "
                f"{', '.join(pitr_services(plan)) or '(none: no service has its PITR backups enabled)'} "
                f"(got service={service!r}) or clear target_time"
            )
        if backup_id is not None:
            raise DrillParamError(
                "target_time and backup_id exclude each other: PITR chooses the newest base backup "
                "before the target time itself; clear one of them"
            )
        target_time = parse_target_time(raw_time)

    seed, seed_from = _seed(params, run_id)
    keep = params.get("keep_scratch", False)
    if not isinstance(keep, bool):
        raise DrillParamError(f"keep_scratch must be true or false, got {keep!r}")
    return DrillRequest(
        service=service, backup_id=backup_id, backup_type=backup_type, source=source,  # type: ignore[arg-type]
        target_time=target_time, keep_scratch=keep, seed=seed, seed_from=seed_from,
        backend=backend,  # type: ignore[arg-type]
    )
