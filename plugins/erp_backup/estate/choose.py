"""Which sets recover every enabled service to one time T: pure decisions over the registry and the offsite listing.

A service with PITR types (and those jobs enabled) is recovered to T by its own planner
(`plan_point_in_time`); a T outside what its base and WAL cover is refused with the range.
Every other service restores what its `sets_at` picks among its complete offsite sets:
the newest captured at or before T. A service with none is named; the recovery goes on
without it only when partial recovery is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from erp_backup.drill.choose import list_sets_for
from erp_backup.drill.model import size_measure
from erp_backup.manifest import Manifest
from erp_backup.plan import Plan
from erp_backup.services import get_service
from erp_backup.services.base import PointInTimeUnavailable


class EstateRefused(ValueError):
    """The recovery cannot go ahead as asked. The message names the service and what is covered."""


@dataclass(frozen=True)
class ChosenSet:
    backup_type: str
    backup_id: str
    captured_at: datetime
    bytes: int
    size_measure: int  # the restored data size the service records (extrapolation)
    started_at: datetime | None = None  # a set is read while it is written: data written after this may be missing

    @property
    def name(self) -> str:
        return f"{self.backup_type}/{self.backup_id}"


@dataclass
class ServicePlan:
    """How one service is recovered: its sets (base first for PITR), and the sizes for extrapolating its RTO."""

    service: str
    sets: list[ChosenSet]
    pitr: dict[str, Any] | None = None  # the planner's details, with target_time
    production_bytes: int = 0  # the newest set's size measure
    where: str = ""

    @property
    def captured_at(self) -> datetime:
        """The moment the restored data stands for: T for PITR, else the oldest set's capture."""
        if self.pitr:
            return datetime.fromisoformat(self.pitr["target_time"])
        return min(s.captured_at for s in self.sets)

    @property
    def capture_started(self) -> datetime:
        """From when data may be missing from the restored sets: T for PITR, else the earliest capture start."""
        if self.pitr:
            return self.captured_at
        return min(s.started_at or s.captured_at for s in self.sets)

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "where": self.where, "pitr": self.pitr, "production_bytes": self.production_bytes,
                "captured_at": self.captured_at.isoformat(),
                "capture_started": self.capture_started.isoformat(),
                "sets": [{"backup_type": s.backup_type, "backup_id": s.backup_id, "captured_at": s.captured_at.isoformat(),
                          "started_at": s.started_at.isoformat() if s.started_at else None,
                          "bytes": s.bytes, "size_measure": s.size_measure} for s in self.sets]}


@dataclass
class EstatePlanOfSets:
    at: datetime
    services: list[ServicePlan]
    missing: dict[str, str] = field(default_factory=dict)  # service -> why it cannot be recovered to T
    partial: bool = False


def estate_services(plan: Plan) -> list[str]:
    """Enabled services with an enabled job that restores (alone or to a point in time)."""
    names = []
    for service, enabled in sorted(plan.services_enabled.items()):
        module = get_service(service)
        if enabled and _types(plan, service, module.PITR_TYPES | module.RESTORE_TYPES):
            names.append(service)
    return names


def _types(plan: Plan, service: str, wanted: frozenset[str]) -> list[str]:
    return sorted(job.backup_type for job in plan.enabled_jobs if job.service == service and job.backup_type in wanted)


def _chosen(manifest: Manifest) -> ChosenSet:
    return ChosenSet(manifest.backup_type, manifest.backup_id, manifest.captured_finished_at, manifest.total_size,
                     size_measure(manifest)[0], manifest.captured_started_at)


def _production(manifests: Sequence[Manifest], backup_type: str) -> int:
    same = [m for m in manifests if m.backup_type == backup_type]
    return size_measure(max(same, key=lambda m: m.captured_finished_at))[0] if same else 0


def plan_service(plan: Plan, service: str, at: datetime, store: Any) -> ServicePlan | str:
    """The sets that recover `service` to `at`, or why there are none. PITR outside its range raises EstateRefused."""
    module = get_service(service)
    pitr_types = _types(plan, service, module.PITR_TYPES)
    if pitr_types and set(pitr_types) == set(module.PITR_TYPES):
        listing = list_sets_for(plan, service, pitr_types, "offsite", store)
        manifests = [m for _, m in listing.complete]
        try:
            chain = module.plan_point_in_time(manifests, at)
        except PointInTimeUnavailable as exc:
            raise EstateRefused(f"--at {at.isoformat()}: {service} cannot be recovered to that time: {exc}") from None
        by_key = {(m.backup_type, m.backup_id): m for m in manifests}
        sets = [_chosen(by_key[key]) for key in chain.sets]
        return ServicePlan(service, sets, pitr={**chain.details, "target_time": at.isoformat()},
                           production_bytes=_production(manifests, chain.base.backup_type), where=listing.where)
    types = _types(plan, service, module.RESTORE_TYPES)
    listing = list_sets_for(plan, service, types, "offsite", store)
    manifests = [m for _, m in listing.complete]
    chosen = module.sets_at(manifests, at)
    if not chosen:
        oldest = min((m.captured_finished_at for m in manifests), default=None)
        return (f"no complete {service} set ({'/'.join(types)}) captured at or before {at.isoformat()} at {listing.where}"
                + (f"; the oldest is from {oldest.isoformat()}" if oldest else "; there are none"))
    return ServicePlan(service, [_chosen(m) for m in chosen],
                       production_bytes=sum(_production(manifests, m.backup_type) for m in chosen), where=listing.where)


def plan_estate(plan: Plan, at: datetime, store: Any, *, allow_partial: bool = False,
                services: Sequence[str] | None = None) -> EstatePlanOfSets:
    """Every enabled service's sets for `at`. A service without any stops the recovery unless `allow_partial`."""
    if at.tzinfo is None:
        raise EstateRefused(f"--at {at.isoformat()} has no timezone; give one, e.g. 2026-11-26T10:15:00+09:00")
    result = EstatePlanOfSets(at, [])
    for service in services or estate_services(plan):
        found = plan_service(plan, service, at, store)
        if isinstance(found, str):
            result.missing[service] = found
        else:
            result.services.append(found)
    if result.missing and not allow_partial:
        raise EstateRefused("cannot recover the whole estate to " + at.isoformat() + ": "
                            + "; ".join(f"{name}: {why}" for name, why in result.missing.items())
                            + ". Give --allow-partial to recover the other services and mark the report partial")
    result.partial = bool(result.missing)
    return result


def layers(services: Sequence[str], depends_on: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """The services in dependency order: each layer needs only earlier layers (dependencies not recovered are ignored)."""
    left = set(services)
    ordered: list[list[str]] = []
    while left:
        ready = sorted(s for s in left if not (set(depends_on.get(s, ())) & left))
        if not ready:
            raise EstateRefused(f"estate.depends_on has a cycle among {', '.join(sorted(left))}")
        ordered.append(ready)
        left -= set(ready)
    return ordered
