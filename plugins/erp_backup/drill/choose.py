"""Choosing what a drill restores: list the complete sets, validate an explicit choice, pick at random.

Writes `pick.json` for the run; raises DrillParamError listing the valid values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from erp_backup.drill import pick as picking
from erp_backup.drill.model import DrillFailed, Listing, size_measure
from erp_backup.drill.params import (
    ALL,
    RANDOM,
    DrillParamError,
    DrillRequest,
    drill_types,
    drillable_services,
    parse_request,
)
from erp_backup.drill.records import ledger_entries_for_pick, read_ledger, run_dir, write_json
from erp_backup.manifest import Manifest
from erp_backup.notify import one_line
from erp_backup.offsite_trust import check_offsite_sets
from erp_backup.plan import Plan
from erp_backup.runs import RunInfo
from erp_backup.services import get_service
from erp_backup.services.base import PointInTimeUnavailable
from erp_backup.sets import SetState, list_sets

log = logging.getLogger(__name__)


def offsite_store(plan: Plan, offsite: Any = None) -> Any:
    from erp_backup.offsite import offsite_from_plan

    return offsite or offsite_from_plan(plan)


def list_sets_for(plan: Plan, service: str, types: list[str], source: str, store: Any) -> Listing:
    """Complete and incomplete sets of a service, offsite or on staging (any age)."""
    complete: list[tuple[picking.Candidate, Manifest]] = []
    incomplete: list[str] = []
    suspect: dict[str, str] = {}
    for backup_type in types:
        if source == "offsite":
            for check in check_offsite_sets(store, service, backup_type, plan.backup_root):
                name = f"{backup_type}/{check.backup_id}"
                if check.state is SetState.OFFSITE and check.manifest is not None:
                    complete.append((_candidate(check.manifest), check.manifest))
                elif check.state is SetState.SUSPECT:
                    suspect[name] = check.why
                else:
                    incomplete.append(name)
        else:
            for backup_set in list_sets(plan.backup_root, service, backup_type):
                state = backup_set.state
                if state in (SetState.INCOMPLETE, SetState.CORRUPT):
                    incomplete.append(f"{backup_type}/{backup_set.backup_id} ({state.value})")
                    continue
                manifest = backup_set.manifest()
                complete.append((_candidate(manifest), manifest))
    where = store.description if source == "offsite" else f"staging {plan.backup_root}"
    return Listing(complete, incomplete, where, suspect)


def _candidate(manifest: Manifest) -> picking.Candidate:
    captured = manifest.captured_finished_at
    if captured.tzinfo is None:
        captured = captured.replace(tzinfo=UTC)
    return picking.Candidate(
        service=manifest.service, backup_type=manifest.backup_type, backup_id=manifest.backup_id,
        captured_at=captured, set_bytes=manifest.total_size, production_bytes=size_measure(manifest)[0],
    )


def _within_retention(plan: Plan, listing: Listing, now: datetime) -> list[tuple[picking.Candidate, Manifest]]:
    kept = []
    for candidate, manifest in listing.complete:
        job = plan.job(candidate.service, candidate.backup_type)
        if now - job.retention <= candidate.captured_at <= now:
            kept.append((candidate, manifest))
    return kept


def _service_module_problem(service: str) -> str | None:
    try:
        get_service(service)
    except (ImportError, LookupError, TypeError) as exc:
        return f"its service module cannot be used: {one_line(exc)}"
    return None


def _pick_record(plan: Plan, request: DrillRequest, run: RunInfo, choice: picking.Choice, manifest: Manifest,
                 where: str, pitr: dict[str, Any] | None = None) -> dict[str, Any]:
    candidate = choice.candidate
    job = plan.job(candidate.service, candidate.backup_type)
    measure, measure_from = size_measure(manifest)
    return {
        "run_id": run.run_id,
        "service": candidate.service,
        "backup_type": candidate.backup_type,
        "backup_id": candidate.backup_id,
        "captured_at": candidate.captured_at.isoformat(),
        "source": request.source,
        "source_description": where,
        "backend": request.backend,
        "keep_scratch": request.keep_scratch,
        "seed": request.seed,
        "seed_from": request.seed_from,
        "set_bytes": candidate.set_bytes,
        "files": len(manifest.files),
        "size_measure": {"bytes": measure, "from": measure_from},
        "production": {"backup_id": choice.newest.backup_id, "bytes": choice.newest.production_bytes},
        "versions": get_service(candidate.service).versions(manifest),
        "rto_target_s": job.rto.total_seconds(),
        "choice": choice.as_dict(),
        "pitr": pitr,
    }


def _valid_list(listing: Listing, limit: int = 12) -> str:
    names = [f"{c.backup_type}/{c.backup_id}" for c, _ in sorted(listing.complete, key=lambda x: x[0].captured_at, reverse=True)]
    shown = ", ".join(names[:limit]) + (f" (+{len(names) - limit} older)" if len(names) > limit else "")
    return shown or "none"


def _explicit(plan: Plan, request: DrillRequest, run: RunInfo, store: Any, ledger: list[picking.LedgerEntry]) -> dict[str, Any]:
    types = [request.backup_type] if request.backup_type else drill_types(plan, request.service)
    if request.backup_type and request.backup_type not in drill_types(plan, request.service):
        raise DrillParamError(
            f"backup_id {request.backup_type}/{request.backup_id}: {request.service} has no enabled drillable "
            f"type {request.backup_type!r}; valid types: {', '.join(drill_types(plan, request.service))}"
        )
    listing = list_sets_for(plan, request.service, types, request.source, store)
    matches = [(c, m) for c, m in listing.complete if c.backup_id == request.backup_id]
    if len(matches) > 1:
        raise DrillParamError(
            f"backup_id {request.backup_id} exists for several {request.service} types; give one of: "
            + ", ".join(f"{c.backup_type}/{c.backup_id}" for c, _ in matches)
        )
    if not matches:
        suspect = [(name, why) for name, why in listing.suspect.items() if name.split("/", 1)[1] == request.backup_id]
        if suspect:
            raise DrillParamError(
                f"backup {request.service}/{suspect[0][0]} at {listing.where} is suspect and cannot be drilled: its "
                f"offsite manifest, not a data file, is at fault: {suspect[0][1]}; complete sets: {_valid_list(listing)}"
            )
        incomplete = [name for name in listing.incomplete if name.split("/", 1)[1].split(" ")[0] == request.backup_id]
        if incomplete:
            raise DrillParamError(
                f"backup {request.service}/{incomplete[0]} at {listing.where} is incomplete (no manifest, or its "
                f"checksum failed) and cannot be drilled; complete sets: {_valid_list(listing)}"
            )
        raise DrillParamError(
            f"no backup {request.service}/{'/'.join(filter(None, [request.backup_type, request.backup_id]))} "
            f"at {listing.where}; complete sets: {_valid_list(listing)}"
        )
    candidate, manifest = matches[0]
    same_type = [c for c, _ in listing.complete if c.backup_type == candidate.backup_type]
    choice = picking.explicit_choice(candidate, same_type, ledger)
    return _pick_record(plan, request, run, choice, manifest, listing.where)


def _pitr_pick(plan: Plan, request: DrillRequest, run: RunInfo, store: Any) -> dict[str, Any]:
    """The base set and the sets replayed on it to reach request.target_time, from the service's own planner."""
    assert request.target_time is not None
    module = get_service(request.service)
    listing = list_sets_for(plan, request.service, sorted(module.PITR_TYPES), request.source, store)
    try:
        chain = module.plan_point_in_time([m for _, m in listing.complete], request.target_time)
    except PointInTimeUnavailable as exc:
        raise DrillParamError(f"target_time {request.target_time.isoformat()}: {exc}") from None
    base = _candidate(chain.base)
    choice = picking.Choice(base, 1.0, 1.0, 1, None, base)
    replayed = [list(item) for item in chain.sets[1:]]
    record = _pick_record(plan, request, run, choice, chain.base, listing.where, pitr={
        **chain.details, "target_time": request.target_time.isoformat(), "sets": replayed,
        "replay_bytes": chain.replay_bytes,
    })
    record["set_bytes"] += chain.replay_bytes
    return record


def pick(plan: Plan, params: Mapping[str, Any], run: RunInfo, *, offsite: Any = None) -> list[dict[str, Any]]:
    """Validate the params and choose the sets to drill. Writes `pick.json`; raises DrillParamError listing valid values."""
    record_path = run_dir(plan, run.run_id) / "pick.json"
    record: dict[str, Any] = {"run_id": run.run_id, "params": dict(params), "moment": run.moment.isoformat()}
    try:
        request = parse_request(params, plan, run.run_id)
        record["request"] = request.as_dict()
        store = offsite_store(plan, offsite) if request.source == "offsite" else None
        ledger = ledger_entries_for_pick(read_ledger(plan, store))
        picks, problems = _choose(plan, request, run, store, ledger)
    except Exception as exc:
        write_json(record_path, {**record, "status": "failed", "error": one_line(exc)})
        raise
    write_json(record_path, {**record, "status": "ok", "picks": picks, "problems": problems})
    for item in picks:
        log.info("drill %s: %s/%s/%s from %s (seed %d, %s)", run.run_id, item["service"], item["backup_type"],
                 item["backup_id"], item["source_description"], item["seed"],
                 f"p={item['choice']['probability']} of {item['choice']['candidates']} sets")
    for problem in problems:
        log.error("drill %s: %s cannot be drilled: %s", run.run_id, problem["service"], problem["error"])
    return picks


def _choose(plan: Plan, request: DrillRequest, run: RunInfo, store: Any,
            ledger: list[picking.LedgerEntry]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if request.service not in (ALL, RANDOM):
        problem = _service_module_problem(request.service)
        if problem:
            raise DrillParamError(f"service {request.service!r}: {problem}")
    if request.target_time is not None:
        return [_pitr_pick(plan, request, run, store)], []
    if request.backup_id is not None:
        return [_explicit(plan, request, run, store, ledger)], []

    services = drillable_services(plan) if request.service in (ALL, RANDOM) else [request.service]
    problems: list[dict[str, Any]] = []
    candidates: dict[str, list[picking.Candidate]] = {}
    manifests: dict[str, Manifest] = {}
    wheres: dict[str, str] = {}
    for service in services:
        problem = _service_module_problem(service)
        if problem:
            problems.append({"service": service, "error": problem})
            continue
        types = drill_types(plan, service)
        listing = list_sets_for(plan, service, types, request.source, store)
        wheres[service] = listing.where
        usable = _within_retention(plan, listing, run.moment)
        if not (listing.complete or listing.incomplete or listing.suspect):
            problems.append({"service": service, "never_backed_up": True, "error": (
                f"no {service} backup ({'/'.join(types)}) exists yet at {listing.where}; the watchdog alerts "
                "if its first backup is late")})
            continue
        if not usable:
            retention = ", ".join(f"{t} {plan.job(service, t).retention.days} d" for t in types)
            problems.append({"service": service, "error": (
                f"no complete {service} set ({'/'.join(types)}) within retention ({retention}) at {listing.where}; "
                f"incomplete: {', '.join(listing.incomplete) or 'none'}; older complete: {_valid_list(listing)}"
            )})
            continue
        candidates[service] = [c for c, _ in usable]
        manifests.update({c.key: m for c, m in usable})
    if request.service not in (ALL,) and not candidates:
        raise DrillFailed("nothing to drill: " + "; ".join(f"{p['service']}: {p['error']}" for p in problems))
    result = picking.pick_sets(candidates, ledger, run.moment, request.seed, one_random_service=request.service == RANDOM)
    picks = [
        _pick_record(plan, request, run, choice, manifests[choice.candidate.key], wheres[choice.candidate.service])
        for choice in result.choices
    ]
    if request.service == RANDOM:
        problems = []  # services not chosen are not failures
        for item in picks:
            item["service_weights"] = result.service_weights
    from erp_backup.drill.pitr_pick import pitr_picks

    return picks + pitr_picks(plan, request, run, store, picks), problems
