"""Point-in-time recovery in the weekly drill: when a service with PITR is picked, also drill snapshot + WAL.

In the style of AWS Backup restore testing: a random point (seeded) inside the window the
newest base and its unbroken WAL cover. The extra pick runs under its own slot
(`<service>-pitr`), so its step records and work dir do not collide with the service's
other pick. The report gives the achieved RPO (`rpo`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from erp_backup.plan import Plan
from erp_backup.runs import RunInfo
from erp_backup.services import get_service

log = logging.getLogger(__name__)

SLOT_SUFFIX = "-pitr"


def slot(pick: Mapping[str, Any]) -> str:
    """The name a pick's step records and work dir go under: its service, or its own slot."""
    return str(pick.get("slot") or pick["service"])


def _enabled_pitr_types(plan: Plan, service: str) -> list[str]:
    wanted = get_service(service).PITR_TYPES
    types = sorted(job.backup_type for job in plan.enabled_jobs if job.service == service and job.backup_type in wanted)
    return types if wanted and set(types) == set(wanted) else []


def pitr_picks(plan: Plan, request: Any, run: RunInfo, store: Any, picks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One extra point-in-time pick per picked service that has PITR (and a covered window)."""
    from erp_backup.drill import pick as picking
    from erp_backup.drill.choose import _candidate, _pick_record, list_sets_for

    extra = []
    for item in picks:
        service = item["service"]
        types = _enabled_pitr_types(plan, service)
        if not types:
            continue
        module = get_service(service)
        listing = list_sets_for(plan, service, types, request.source, store)
        manifests = [m for _, m in listing.complete]
        span = module.point_in_time_range(manifests)
        if span is None:
            log.warning("drill %s: %s has no base with WAL at %s; no point-in-time drill", run.run_id, service, listing.where)
            continue
        rng = random.Random(f"{request.seed}:pitr:{service}")
        at: datetime = span[0] + (span[1] - span[0]) * rng.random()
        chain = module.plan_point_in_time(manifests, at)
        base = _candidate(chain.base)
        record = _pick_record(plan, request, run, picking.Choice(base, 1.0, 1.0, 1, None, base), chain.base, listing.where,
                              pitr={**chain.details, "target_time": at.isoformat(), "random_in": [span[0].isoformat(),
                                    span[1].isoformat()], "sets": [list(s) for s in chain.sets[1:]],
                                    "replay_bytes": chain.replay_bytes})
        record["set_bytes"] += chain.replay_bytes
        record["slot"] = f"{service}{SLOT_SUFFIX}"
        record["rpo_target_s"] = plan.job(service, chain.base.backup_type).rpo.total_seconds()
        extra.append(record)
    return extra


def rpo_of(pick: Mapping[str, Any], restored: Mapping[str, Any], drilled: str | None) -> dict[str, Any] | None:
    """The achieved RPO of a point-in-time pick: T minus the last replayed commit, and the newest WAL's age at `drilled`."""
    pitr = pick.get("pitr")
    if not pitr or not pick.get("slot"):
        return None
    drilled_at = datetime.fromisoformat(drilled) if drilled else datetime.now(UTC)
    target = datetime.fromisoformat(pitr["target_time"])
    last = restored.get("last_replayed_commit")
    newest = pitr.get("newest_archived_at")
    lag = (target - datetime.fromisoformat(last)).total_seconds() if last else None
    age = (drilled_at - datetime.fromisoformat(newest)).total_seconds() if newest else None
    rpo_target = pick.get("rpo_target_s")
    return {"target_time": pitr["target_time"], "last_replayed_commit": last, "lag_s": lag,
            "newest_archived_at": newest, "newest_segment_age_s": age, "target_s": rpo_target,
            "within_target": (age is not None and rpo_target is not None and age <= rpo_target and lag is not None
                              and lag <= rpo_target)}


def rpo_lines(rpo: Mapping[str, Any] | None) -> list[str]:
    """The report's RPO line of a point-in-time pick."""
    from erp_backup.drill.report import _duration

    if not rpo:
        return []
    verdict = {True: "within", False: "OVER"}[bool(rpo["within_target"])]
    return [f"- RPO achieved: T − last replayed commit {_duration(rpo['lag_s'])} (last commit {rpo['last_replayed_commit']}); "
            f"newest archived WAL {rpo['newest_archived_at']} was {_duration(rpo['newest_segment_age_s'])} old at the drill; "
            f"{verdict} the target {_duration(rpo['target_s'])}"]
