"""The DR drill's steps as plain functions: pick, clean leftovers, start target, fetch, restore, verify, teardown.

The DAG's tasks are thin wrappers; tests call these directly. Steps of one
service run in different processes, so each writes its record (status, timing,
what it did, the error) to `$BACKUP_ROOT/drills/runs/<run>/<service>/<step>.json`
and reads what earlier steps wrote there. Fetched files go to
`$BACKUP_ROOT/drills/work/<run>/<service>/` and are always removed by teardown.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from erp_backup.drill import pick as picking
from erp_backup.drill.params import (
    ALL,
    PITR_TYPES,
    RANDOM,
    DrillParamError,
    DrillRequest,
    drill_types,
    drillable_services,
    parse_request,
)
from erp_backup.drill.targets import (
    DockerBackend,
    LocalBackend,
    ProductionGuard,
    TargetInfo,
    _release_lite,
    drill_scratch_root,
    owner_for,
    slug,
)
from erp_backup.checksum import entry_problem
from erp_backup.manifest import MANIFEST_NAME, Manifest, sha256_file, write_atomic
from erp_backup.notify import one_line
from erp_backup.offsite import ChecksumMismatch
from erp_backup.offsite_trust import check_offsite_sets
from erp_backup.plan import Plan
from erp_backup.services.base import airflow_connection
from erp_backup.sets import SetState, list_sets

log = logging.getLogger(__name__)

LEDGER_KEY = "drills/ledger.jsonl"
PASSED = frozenset({"passed", "prepared"})
SIZE_KEYS = ("source_bytes", "database_bytes", "raw_bytes", "rdb_bytes")


class DrillFailed(RuntimeError):
    """A drill step failed. The message names the service, backup and what is wrong."""


class DrillVerificationFailed(DrillFailed):
    """The restored data does not match the manifest. The message lists every mismatch."""


# ───────────────────────── where things live ─────────────────────────


def drills_root(plan: Plan) -> Path:
    return Path(plan.backup_root) / "drills"


def ledger_path(plan: Plan) -> Path:
    return drills_root(plan) / "ledger.jsonl"


def run_dir(plan: Plan, run_id: str) -> Path:
    return drills_root(plan) / "runs" / slug(run_id, 64)


def work_dir(plan: Plan, run_id: str, service: str | None = None) -> Path:
    base = drills_root(plan) / "work" / slug(run_id, 64)
    return base / service if service else base


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _write_json(path: Path, data: Any) -> None:
    _mkdirs(path.parent)
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    moment: datetime  # logical date, or run_after for a manual run


class ServiceState:
    """The records of one service's drill steps in one run."""

    def __init__(self, plan: Plan, run_id: str, service: str):
        self.plan, self.run_id, self.service = plan, run_id, service
        self.dir = run_dir(plan, run_id) / service

    def read(self, step: str) -> dict[str, Any] | None:
        return _read_json(self.dir / f"{step}.json")

    def write(self, step: str, record: Mapping[str, Any]) -> None:
        _write_json(self.dir / f"{step}.json", dict(record))

    def target(self) -> TargetInfo | None:
        data = _read_json(self.dir / "target.json")
        return TargetInfo.from_dict(data) if data else None

    def save_target(self, info: TargetInfo) -> None:
        _write_json(self.dir / "target.json", info.as_dict())  # 0600: may hold a scratch password

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Record a step: running, then ok (or the status the body sets) or failed with the error."""
        attempts = (self.read(name) or {}).get("attempts", 0) + 1
        record: dict[str, Any] = {"status": "running", "started_at": utcnow().isoformat(), "attempts": attempts}
        self.write(name, record)
        started = time.monotonic()
        try:
            yield record
        except BaseException as exc:
            record.update(status="failed", error=one_line(exc), error_type=type(exc).__name__,
                          seconds=round(time.monotonic() - started, 3), finished_at=utcnow().isoformat())
            self.write(name, record)
            raise
        record["status"] = record.get("status") if record.get("status") not in (None, "running") else "ok"
        record.update(seconds=round(time.monotonic() - started, 3), finished_at=utcnow().isoformat())
        self.write(name, record)


def _state(plan: Plan, pick: Mapping[str, Any]) -> ServiceState:
    return ServiceState(plan, pick["run_id"], pick["service"])


def _offsite(plan: Plan, offsite: Any = None) -> Any:
    from erp_backup.offsite import offsite_from_plan

    return offsite or offsite_from_plan(plan)


# ───────────────────────── ledger ─────────────────────────


def parse_ledger(text: str) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError:
            log.warning("drill ledger line %d is not JSON; skipped", number)
    return entries


def read_ledger(plan: Plan, offsite: Any = None) -> list[dict[str, Any]]:
    """The local ledger, merged with the offsite one when a store is given (deduplicated by run and set)."""
    entries = parse_ledger(ledger_path(plan).read_text()) if ledger_path(plan).is_file() else []
    if offsite is not None:
        remote = work_dir(plan, "ledger-read") / "ledger.jsonl"
        try:
            if offsite.get_file(LEDGER_KEY, remote):
                entries += parse_ledger(remote.read_text())
        except Exception as exc:  # the pick still works from the local ledger
            log.warning("could not read the offsite drill ledger (%s); using the local one", exc)
        finally:
            shutil.rmtree(remote.parent, ignore_errors=True)
    seen, merged = set(), []
    for entry in entries:
        key = (entry.get("run_id"), entry.get("service"), entry.get("backup_type"), entry.get("backup_id"))
        if key not in seen:
            seen.add(key)
            merged.append(entry)
    return merged


def ledger_entries_for_pick(entries: list[dict[str, Any]]) -> list[picking.LedgerEntry]:
    """Only drills that passed count as 'drilled': a failed set stays likely to be picked again."""
    found = []
    for entry in entries:
        if entry.get("status") in PASSED:
            try:
                found.append(picking.LedgerEntry.from_dict(entry))
            except (KeyError, ValueError):
                continue
    return found


# ───────────────────────── pick ─────────────────────────


def size_measure(manifest: Manifest) -> tuple[int, str]:
    """(bytes, what they are): the source size recorded in the manifest details, else the set size."""
    for key in SIZE_KEYS:
        value = manifest.details.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, f"details.{key}"
    return manifest.total_size, "set size"


def versions_of(manifest: Manifest) -> dict[str, Any]:
    """Server versions recorded in a manifest, for choosing scratch images and binaries."""
    details, tools = manifest.details, manifest.tools
    versions: dict[str, Any] = {}
    if isinstance(details.get("server_version_num"), int):
        versions["postgres_major"] = details["server_version_num"] // 10000
    for name, value in (("rabbitmq", tools.get("rabbitmqctl")), ("redis", details.get("redis_version") or tools.get("redis-cli")),
                        ("milvus", details.get("server_version")), ("etcd", tools.get("etcdctl"))):
        if value:
            versions[name] = value
    return versions


@dataclass
class Listing:
    complete: list[tuple[picking.Candidate, Manifest]]
    incomplete: list[str]  # "<type>/<id>" without a manifest (or corrupt)
    where: str
    suspect: dict[str, str] = field(default_factory=dict)  # "<type>/<id>" -> why its offsite manifest is not trusted


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
        captured = captured.replace(tzinfo=timezone.utc)
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
    from erp_backup.services import get_service

    try:
        module = get_service(service)
    except ImportError as exc:
        return f"no restore function: erp_backup.services.{service} cannot be imported ({exc})"
    if not callable(getattr(module, "restore", None)):
        return f"no restore function in erp_backup.services.{service}"
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
        "versions": versions_of(manifest),
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
    try:
        from erp_backup.services import postgres_pitr
    except ImportError as exc:
        raise DrillParamError(
            f"target_time: point-in-time restore is not available yet ({exc}); clear target_time"
        ) from None
    assert request.target_time is not None
    listing = list_sets_for(plan, "postgres", list(PITR_TYPES), request.source, store)
    bases = [m for c, m in listing.complete if c.backup_type == "snapshot"]
    wals = [m for c, m in listing.complete if c.backup_type == "wal"]
    inventory = postgres_pitr.build_inventory(bases, wals)
    try:
        recovery = postgres_pitr.plan_recovery(inventory, request.target_time)
    except postgres_pitr.RestoreError as exc:
        raise DrillParamError(f"target_time {request.target_time.isoformat()}: {exc}") from None
    base = picking.Candidate("postgres", "snapshot", recovery.base.backup_id, _candidate(recovery.base_manifest).captured_at,
                             recovery.base_manifest.total_size, size_measure(recovery.base_manifest)[0])
    wal_bytes = sum(inventory.wal_manifests[set_id].total_size for set_id in recovery.wal_sets)
    choice = picking.Choice(base, 1.0, 1.0, 1, None, base)
    record = _pick_record(plan, request, run, choice, recovery.base_manifest, listing.where, pitr={
        **recovery.as_dict(), "wal_bytes": wal_bytes,
    })
    record["set_bytes"] += wal_bytes
    return record


def pick(plan: Plan, params: Mapping[str, Any], run: RunInfo, *, offsite: Any = None) -> list[dict[str, Any]]:
    """Validate the params and choose the sets to drill. Writes `pick.json`; raises DrillParamError listing valid values."""
    record_path = run_dir(plan, run.run_id) / "pick.json"
    record: dict[str, Any] = {"run_id": run.run_id, "params": dict(params), "moment": run.moment.isoformat()}
    try:
        request = parse_request(params, plan, run.run_id)
        record["request"] = request.as_dict()
        store = _offsite(plan, offsite) if request.source == "offsite" else None
        ledger = ledger_entries_for_pick(read_ledger(plan, store))
        picks, problems = _choose(plan, request, run, store, ledger)
    except Exception as exc:
        _write_json(record_path, {**record, "status": "failed", "error": one_line(exc)})
        raise
    _write_json(record_path, {**record, "status": "ok", "picks": picks, "problems": problems})
    for item in picks:
        log.info("drill %s: %s/%s/%s from %s (seed %d, %s)", run.run_id, item["service"], item["backup_type"],
                 item["backup_id"], item["source_description"], item["seed"],
                 f"p={item['choice']['probability']} of {item['choice']['candidates']} sets")
    for problem in problems:
        log.error("drill %s: %s cannot be drilled: %s", run.run_id, problem["service"], problem["error"])
    return picks


def _choose(plan: Plan, request: DrillRequest, run: RunInfo, store: Any,
            ledger: list[picking.LedgerEntry]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    if request.service not in (ALL, RANDOM):
        problem = _service_module_problem(request.service)
        if problem:
            raise DrillParamError(f"service {request.service!r}: {problem}")
    if request.target_time is not None:
        return [_pitr_pick(plan, request, run, store)], []
    if request.backup_id is not None:
        return [_explicit(plan, request, run, store, ledger)], []

    services = drillable_services(plan) if request.service in (ALL, RANDOM) else [request.service]
    problems: list[dict[str, str]] = []
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
    return picks, problems


# ───────────────────────── targets ─────────────────────────


def make_backend(plan: Plan, name: str, get_connection: Callable[[str], Any] = airflow_connection,
                 docker_api: Any = None) -> LocalBackend | DockerBackend:
    guard = ProductionGuard.from_plan(plan, get_connection)
    local = LocalBackend(drill_scratch_root(plan), guard)
    if name == "docker":
        if docker_api is not None:
            return DockerBackend(docker_api, guard, local)
        return DockerBackend.from_env(guard, local)
    return local


def clean_leftovers(plan: Plan, run_id: str, backend_name: str, *, get_connection: Callable[[str], Any] = airflow_connection,
                    docker_api: Any = None) -> list[str]:
    """Stop and remove scratch targets and work dirs that earlier (crashed or kept) drills left behind."""
    backend = make_backend(plan, backend_name, get_connection, docker_api)
    owner = owner_for(run_id)
    local = backend.local if isinstance(backend, DockerBackend) else backend
    removed = local.cleanup_leftovers(keep_owner=owner)
    if isinstance(backend, DockerBackend):
        removed += backend.cleanup_leftovers(keep_run_id=run_id)
    work_root = drills_root(plan) / "work"
    if work_root.is_dir():
        for entry in work_root.iterdir():
            if entry.name != slug(run_id, 64):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(f"work dir {entry}")
    for item in removed:
        log.warning("drill %s: removed leftover %s", run_id, item)
    return removed


def start_target(plan: Plan, pick: Mapping[str, Any], *, get_connection: Callable[[str], Any] = airflow_connection,
                 docker_api: Any = None) -> dict[str, Any]:
    """Start the scratch target (the setup task). Refuses any production endpoint."""
    state = _state(plan, pick)
    with state.step("start_target") as record:
        info = _start(plan, pick, get_connection, docker_api)
        state.save_target(info)
        record.update(target=info.describe(), kind=info.kind, backend=info.backend, image=info.image)
    return {"service": pick["service"], "target": info.describe()}


def _start(plan: Plan, pick: Mapping[str, Any], get_connection: Callable[[str], Any], docker_api: Any) -> TargetInfo:
    backend = make_backend(plan, pick["backend"], get_connection, docker_api)
    owner = owner_for(pick["run_id"])
    pg_major = pick.get("versions", {}).get("postgres_major")
    pitr = bool(pick.get("pitr"))
    if isinstance(backend, DockerBackend):
        return backend.start(pick["service"], pick["backup_type"], owner, run_id=pick["run_id"],
                             versions=pick.get("versions", {}), pitr=pitr, pg_major=pg_major)
    return backend.start(pick["service"], pick["backup_type"], owner, pg_major=pg_major, pitr=pitr)


# ───────────────────────── fetch ─────────────────────────


def verify_in_place(set_dir: Path, manifest: Manifest) -> int:
    """Check every file of a staging set against its manifest; ChecksumMismatch names the first bad file."""
    for entry in manifest.files:
        problem = entry_problem(set_dir, entry)
        if problem:
            raise ChecksumMismatch(
                f"backup {manifest.backup_id}: file {entry.path} in {set_dir} does not match the manifest: {problem}"
            )
    return len(manifest.files)


def fetch(plan: Plan, pick: Mapping[str, Any], *, offsite: Any = None) -> dict[str, Any]:
    """Bring the set (and, for PITR, its WAL sets) to the worker, verifying every file's SHA-256."""
    state = _state(plan, pick)
    service, backup_type, backup_id = pick["service"], pick["backup_type"], pick["backup_id"]
    with state.step("fetch") as record:
        wanted = [(backup_type, backup_id)]
        if pick.get("pitr"):
            wanted += [("wal", set_id) for set_id in pick["pitr"]["wal_sets"]]
        root = work_dir(plan, pick["run_id"], service) / "root"
        fetched_bytes, files = 0, 0
        for kind, set_id in wanted:
            if pick["source"] == "offsite":
                dest = root / service / kind / set_id
                if dest.exists():
                    shutil.rmtree(dest)  # a retried fetch starts clean
                _mkdirs(dest.parent)
                manifest = _offsite(plan, offsite).fetch_set(service, kind, set_id, dest)
                set_dir = dest
            else:
                set_dir = Path(plan.backup_root) / service / kind / set_id
                manifest = Manifest.read(set_dir / MANIFEST_NAME)
                verify_in_place(set_dir, manifest)
            fetched_bytes += manifest.total_size
            files += len(manifest.files)
            if (kind, set_id) == (backup_type, backup_id):
                record["set_dir"] = str(set_dir)
        record.update(
            root=str(root) if pick["source"] == "offsite" else str(plan.backup_root),
            bytes=fetched_bytes, files=files, source=pick["source_description"],
        )
    record["mb_per_s"] = round(fetched_bytes / 1e6 / record["seconds"], 2) if record["seconds"] else None
    state.write("fetch", record)
    return {"service": service, "bytes": fetched_bytes, "files": files, "seconds": record["seconds"]}


# ───────────────────────── restore ─────────────────────────


def _fetched(state: ServiceState) -> tuple[Path, Manifest, dict[str, Any]]:
    record = state.read("fetch")
    if not record or record.get("status") != "ok":
        raise DrillFailed(f"{state.service}: nothing fetched (fetch step: {record.get('status') if record else 'did not run'})")
    set_dir = Path(record["set_dir"])
    return set_dir, Manifest.read(set_dir / MANIFEST_NAME), record


def _target(state: ServiceState) -> TargetInfo:
    info = state.target()
    if info is None:
        raise DrillFailed(f"{state.service}: no scratch target (the start_target step did not finish)")
    return info


def restore(plan: Plan, pick: Mapping[str, Any], *, get_connection: Callable[[str], Any] = airflow_connection,
            docker_api: Any = None) -> dict[str, Any]:
    """Restore the fetched set into the scratch target with the service module's restore(), timed.

    The service's own post-restore checks do not fail this step: their findings are
    recorded, and the verify step fails on them with everything it found.
    """
    state = _state(plan, pick)
    set_dir, manifest, fetched = _fetched(state)
    info = _target(state)
    previous = state.read("restore")
    if previous and previous.get("status") in ("running", "failed"):
        log.warning("%s: an earlier restore attempt touched %s; starting a fresh scratch target", pick["service"], info.describe())
        make_backend(plan, info.backend, get_connection, docker_api).stop(info)
        info = _start(plan, pick, get_connection, docker_api)
        state.save_target(info)
    ProductionGuard.from_plan(plan, get_connection).check(info)

    with state.step("restore") as record:
        record["target"] = info.describe()
        try:
            report, problems = _restore_into(pick, set_dir, manifest, info, fetched)
        finally:
            if info.kind == "milvus_lite" and info.uri:
                _release_lite(Path(info.uri))
        record.update(report=report, restore_problems=problems, restored_bytes=_restored_bytes(report, manifest, pick))
    record["mb_per_s"] = round(record["restored_bytes"] / 1e6 / record["seconds"], 2) if record["seconds"] else None
    state.write("restore", record)
    return {"service": pick["service"], "seconds": record["seconds"], "problems": len(problems)}


def _restore_into(pick: Mapping[str, Any], set_dir: Path, manifest: Manifest, info: TargetInfo,
                  fetched: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    from erp_backup.services import get_service

    service = get_service(pick["service"])
    target = info.restore_target()
    if pick.get("pitr"):
        from erp_backup.services import postgres_pitr

        report = postgres_pitr.restore_to_time(
            datetime.fromisoformat(pick["pitr"]["target_time"]), root=Path(fetched["root"]), cluster=target,
            offsite=None, use_local_archive=False, owner=info.owner,
        )
        return report, []
    if pick["service"] == "postgres":
        return _restore_postgres(service, set_dir, manifest, target)
    if pick["service"] in ("redis", "rabbitmq"):
        report = service.restore(set_dir, manifest, target, strict=False)
        problems = list(report.get("problems") or [])
        for section, names in (report.get("missing") or {}).items():
            problems.append(f"{section} missing after import: {', '.join(names[:10])}")
        return report, problems
    if pick["service"] == "gitlab":
        return service.restore(set_dir, manifest, target), []
    if pick["service"] == "minio":
        return _restore_minio(service, set_dir, manifest, target)
    try:
        return service.restore(set_dir, manifest, target), []
    except Exception as exc:
        report = getattr(exc, "report", None)
        if report is None:
            raise
        problems = list(getattr(exc, "problems", None) or report.get("problems") or [str(exc)])
        return report, problems


def _restore_postgres(service: Any, set_dir: Path, manifest: Manifest, target: str) -> tuple[dict[str, Any], list[str]]:
    """One database at a time, so a content mismatch in one is recorded and the others still get restored."""
    databases = sorted(manifest.details.get("databases", {}))
    report: dict[str, Any] = {"databases": {}, "durations": {}, "bytes": {"compressed": 0, "restored": 0}}
    problems: list[str] = []
    for index, dbname in enumerate(databases or [None]):
        kwargs: dict[str, Any] = {"apply_globals": index == 0}
        if dbname is not None:
            kwargs["databases"] = [dbname]
        try:
            part = service.restore(set_dir, manifest, target, **kwargs)
        except service.RestoreVerificationError as exc:
            problems.append(str(exc))
            continue
        report["databases"].update(part.get("databases", {}))
        for key in ("compressed", "restored"):
            report["bytes"][key] += part.get("bytes", {}).get(key, 0)
        for step, seconds in (part.get("durations") or {}).items():
            report["durations"][step] = round(report["durations"].get(step, 0.0) + seconds, 3)
        if "globals" in part:
            report["globals"] = part["globals"]
    report["tables_checked"] = sum(d.get("tables_checked", 0) for d in report["databases"].values())
    report["rows_checked"] = sum(d.get("rows_checked", 0) for d in report["databases"].values())
    return report, problems


def _restore_minio(service: Any, set_dir: Path, manifest: Manifest, target: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Every bucket of the set into a bucket of the same name on the scratch S3 endpoint."""
    report: dict[str, Any] = {"buckets": {}, "objects": 0, "bytes": {"restored": 0}}
    problems: list[str] = []
    for bucket in sorted(manifest.details.get("buckets") or {}):
        try:
            part = service.restore(set_dir, manifest, {**target, "bucket": bucket}, source_bucket=bucket)
        except service.RestoreFailed as exc:
            part = exc.report
            problems += list(part.get("problems") or [str(exc)])
        report["buckets"][bucket] = {k: part.get(k) for k in ("objects", "bytes", "verified", "verified_by", "seconds")}
        report["objects"] += int(part.get("objects") or 0)
        report["bytes"]["restored"] += int(part.get("bytes") or 0)
    return report, problems


def _restored_bytes(report: Mapping[str, Any], manifest: Manifest, pick: Mapping[str, Any]) -> int:
    for value in ((report.get("bytes") or {}).get("restored"), report.get("rdb_bytes"), report.get("wal_bytes_replayed")):
        if isinstance(value, int) and value > 0:
            return value
    return int(pick.get("size_measure", {}).get("bytes") or manifest.total_size)


# ───────────────────────── verify ─────────────────────────


def verify(plan: Plan, pick: Mapping[str, Any], *, get_connection: Callable[[str], Any] = airflow_connection) -> dict[str, Any]:
    """Check the restored data against the manifest; fail with every mismatch found."""
    state = _state(plan, pick)
    set_dir, manifest, _ = _fetched(state)
    info = _target(state)
    restored = state.read("restore") or {}
    if restored.get("status") != "ok":
        raise DrillFailed(f"{pick['service']}: nothing to verify (restore step: {restored.get('status', 'did not run')})")
    with state.step("verify") as record:
        checker = _VERIFIERS[info.kind]
        try:
            checks, found = checker(plan, pick, info, set_dir, manifest, restored.get("report") or {}, get_connection)
        finally:
            if info.kind == "milvus_lite" and info.uri:
                _release_lite(Path(info.uri))
        problems = found + list(restored.get("restore_problems") or [])  # our own findings first
        record.update(checks=checks, problems=problems)
        if problems:
            shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise DrillVerificationFailed(
                f"{pick['service']}/{pick['backup_type']}/{pick['backup_id']}: the restore does not match the manifest: {shown}"
            )
        record["status"] = "prepared" if info.kind == "directory" else "ok"
    return {"service": pick["service"], "checks": len(record["checks"]), "status": record["status"]}


def _verify_postgres(plan, pick, info, set_dir, manifest, report, get_connection):
    import psycopg

    from erp_backup import pg_content
    from erp_backup.pg_content import TableContent
    from erp_backup.services.postgres import PgEndpoint

    endpoint = PgEndpoint.parse(info.pg_conninfo)
    checks, problems = [], []
    for dbname, entry in sorted(manifest.details.get("databases", {}).items()):
        expected = [TableContent.from_dict(t) for t in entry.get("tables", [])]
        try:
            with endpoint.connect(dbname, autocommit=False) as conn:
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                conn.read_only = True
                pg_content.apply_session_settings(conn)
                actual = pg_content.inventory(conn)
                conn.rollback()
        except Exception as exc:
            problems.append(f"database {dbname!r}: cannot be read on the scratch target: {one_line(exc)}")
            continue
        found = pg_content.compare(dbname, expected, actual)
        problems += found
        if not found:
            rows = sum(t.rows for t in expected if t.kind == "r")
            checks.append(f"{dbname}: {len(expected)} tables, {rows} rows: row counts and content hashes match")
    return checks, problems


def _verify_pitr(plan, pick, info, set_dir, manifest, report, get_connection):
    import psycopg

    checks, problems = [], []
    with psycopg.connect(f"host=127.0.0.1 port={info.port} user=postgres dbname=postgres", autocommit=True) as conn:
        in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        databases = [row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1")]
    if in_recovery:
        problems.append("the cluster is still in recovery (not promoted)")
    else:
        checks.append("recovery finished and the cluster was promoted")
    checks.append(f"{len(databases)} databases accept queries: {', '.join(databases)}")
    target = datetime.fromisoformat(pick["pitr"]["target_time"])
    last = report.get("last_replayed_commit")
    if last and datetime.fromisoformat(last) > target:
        problems.append(f"last replayed commit {last} is after the target time {target.isoformat()}")
    elif last:
        checks.append(f"last replayed commit {last} <= target {target.isoformat()} ({report.get('stop')})")
    return checks, problems


def _verify_redis(plan, pick, info, set_dir, manifest, report, get_connection):
    from erp_backup.runner import LocalExecutor
    from erp_backup.scratch_redis import ScratchRedis
    from erp_backup.services import redis as svc

    server = ScratchRedis.attach(Path(info.base_dir or "") / "data")
    if not server.is_running():
        return [], [f"scratch redis-server in {server.dir} is not running"]
    endpoint = svc.RedisEndpoint.from_scratch(server)
    restored = svc.parse_keyspace(LocalExecutor().run(svc.info_command(endpoint, "keyspace")).decode())
    ranges = svc.expected_key_counts(
        svc.keyspace_from_json(manifest.details.get("keyspace", {})),
        svc.keyspace_from_json(manifest.details.get("keyspace_after", {})),
    )
    counts, problems = svc.check_key_counts(ranges, restored)
    checks = [f"db{db}: {c['restored']} keys (backup: {c['expected_min']}..{c['expected_max']})" for db, c in counts.items()]
    if report.get("sampled_keys") is not None:
        checks.append(f"{report.get('sampled_keys_matched')}/{report['sampled_keys']} sampled keys match their digests "
                      f"({report.get('sampled_keys_expired', 0)} expired)")
    return checks, problems


def _verify_rabbitmq(plan, pick, info, set_dir, manifest, report, get_connection):
    from erp_backup.runner import LocalExecutor
    from erp_backup.services import rabbitmq as svc

    endpoint = info.restore_target()
    if endpoint.mode == "http":
        import requests

        request = svc.definitions_request(endpoint)
        response = requests.request(request.method, request.url, auth=request.auth, timeout=svc.HTTP_TIMEOUT_S)
        response.raise_for_status()
        raw = response.content
    else:
        raw = LocalExecutor().run(svc.export_command(endpoint))
    exported = svc.parse_definitions(raw, f"scratch {info.describe()}")
    backup = svc.parse_definitions((set_dir / svc.DEFINITIONS_FILE).read_bytes(), f"backup {manifest.backup_id}")
    recorded = manifest.details.get("counts") or {}
    restored = svc.count_definitions(exported)
    problems = [f"{section}: {restored[section]} on the scratch node, the backup has {count}"
                for section, count in recorded.items() if section in restored and restored[section] < count]
    problems += [f"{section} missing: {', '.join(names[:10])}" for section, names in svc.missing_definitions(backup, exported).items()]
    checks = [f"{section}: {count} in the backup, {restored.get(section)} on the scratch node" for section, count in sorted(recorded.items()) if count]
    return checks, problems


def _verify_milvus(plan, pick, info, set_dir, manifest, report, get_connection):
    from erp_backup.services import milvus as svc

    client = svc.connect(svc.MilvusTarget(uri=str(info.uri)), must_exist=True)
    checks, problems = [], []
    try:
        for name, collection in sorted(manifest.details.get("collections", {}).items()):
            expected = int(collection["rows"])
            got = int(client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"])
            if got != expected:
                problems.append(f"collection {name}: {got} rows after restore, the backup has {expected}")
            else:
                checks.append(f"collection {name}: {got} rows")
    finally:
        client.close()
    for name, restored in sorted((report.get("collections") or {}).items()):
        search = (restored.get("checks") or {}).get("search") or {}
        if search.get("queries"):
            checks.append(f"collection {name}: {search['queries']} sample searches, min top-k overlap {search['min_overlap']}")
    return checks, problems


def _etcd_range(endpoint: str) -> dict[str, Any]:
    body = json.dumps({"key": base64.b64encode(b"\0").decode(), "range_end": base64.b64encode(b"\0").decode(),
                       "count_only": True}).encode()
    request = urllib.request.Request(f"{endpoint}/v3/kv/range", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _verify_etcd(plan, pick, info, set_dir, manifest, report, get_connection):
    from erp_backup.scratch_etcd import start_scratch_etcd

    data_dir = Path(info.uri or "")
    recorded = manifest.details.get("snapshot") or {}
    etcd = start_scratch_etcd(data_dir, name=report.get("member_name") or "default")
    try:
        host, port = etcd.client_url.split("//")[1].split(":")
        ProductionGuard.from_plan(plan, get_connection).check(
            TargetInfo(info.service, info.backup_type, "etcd", info.backend, info.owner, host=host, port=int(port)))
        answer = _etcd_range(etcd.endpoint)
    finally:
        if not pick.get("keep_scratch"):
            etcd.stop()
    revision, count = int(answer["header"]["revision"]), int(answer.get("count", 0))
    problems, checks = [], []
    if revision != recorded.get("revision"):
        problems.append(f"etcd revision {revision} after restore, the snapshot has {recorded.get('revision')}")
    else:
        checks.append(f"revision {revision} matches the snapshot")
    if count > int(recorded.get("total_keys", count)) or (recorded.get("total_keys") and count == 0):
        problems.append(f"{count} keys after restore, the snapshot holds {recorded.get('total_keys')} key revisions")
    else:
        checks.append(f"{count} live keys (snapshot: {recorded.get('total_keys')} key revisions)")
    return checks, problems


def _verify_s3(plan, pick, info, set_dir, manifest, report, get_connection):
    import hashlib

    import boto3

    expected = manifest.details.get("objects")
    if not isinstance(expected, list):
        return [], ["the MinIO manifest lists no objects (details.objects); the restore cannot be checked object by object"]
    s3 = boto3.client("s3", endpoint_url=info.uri, aws_access_key_id="drill", aws_secret_access_key=info.secret or "drill",
                      region_name="us-east-1")
    checks, problems = [], []
    for item in expected:
        try:
            body = s3.get_object(Bucket=item["bucket"], Key=item["key"])["Body"].read()
        except Exception as exc:
            problems.append(f"s3://{item['bucket']}/{item['key']}: missing after restore ({type(exc).__name__})")
            continue
        if hashlib.sha256(body).hexdigest() != item["sha256"]:
            problems.append(f"s3://{item['bucket']}/{item['key']}: SHA-256 differs from the manifest")
    checks.append(f"{len(expected) - len(problems)}/{len(expected)} objects match their SHA-256")
    return checks, problems


def _verify_prepared(plan, pick, info, set_dir, manifest, report, get_connection):
    prepared = Path(info.uri or "")
    checks, problems = [], []
    files = manifest.details.get("files") or {}
    tar_entry = manifest.file(files["backup_tar"]) if files.get("backup_tar") else None
    tar_name = f"{manifest.details.get('gitlab_backup_id')}_gitlab_backup.tar"
    if tar_entry is not None:
        path = prepared / tar_name
        if not path.is_file():
            problems.append(f"{tar_name} was not prepared in {prepared}")
        else:
            size, digest = sha256_file(path)
            if (size, digest) != (tar_entry.size, tar_entry.sha256):
                problems.append(f"prepared {tar_name} differs from the manifest's {tar_entry.path}")
            else:
                checks.append(f"{tar_name}: {size} bytes, SHA-256 matches the manifest")
    secrets_file = prepared / "gitlab-secrets.json"
    try:
        secrets = json.loads(secrets_file.read_text())
        if not (secrets.get("gitlab_rails") or {}).get("db_key_base"):
            problems.append("prepared gitlab-secrets.json has no gitlab_rails.db_key_base")
        else:
            checks.append("gitlab-secrets.json parses and holds gitlab_rails.db_key_base")
    except (OSError, ValueError) as exc:
        problems.append(f"prepared gitlab-secrets.json is unreadable: {exc}")
    if report.get("runbook_command_text"):
        checks.append("GitLab itself was not restored (no GitLab here): run on the GitLab host: "
                      + report["runbook_command_text"])
    return checks, problems


_VERIFIERS: dict[str, Callable[..., tuple[list[str], list[str]]]] = {
    "postgres": _verify_postgres,
    "postgres_pitr": _verify_pitr,
    "redis": _verify_redis,
    "rabbitmq": _verify_rabbitmq,
    "milvus_lite": _verify_milvus,
    "milvus": _verify_milvus,
    "etcd": _verify_etcd,
    "s3": _verify_s3,
    "directory": _verify_prepared,
}

# ───────────────────────── teardown ─────────────────────────


def teardown(plan: Plan, pick: Mapping[str, Any], *, keep_scratch: bool | None = None,
             get_connection: Callable[[str], Any] = airflow_connection, docker_api: Any = None) -> dict[str, Any]:
    """Remove the scratch target (unless keep_scratch) and the fetched files. Runs whatever happened before."""
    state = _state(plan, pick)
    keep = bool(pick.get("keep_scratch")) if keep_scratch is None else keep_scratch
    with state.step("teardown") as record:
        done: list[str] = []
        info = state.target()
        backend_name = info.backend if info else pick.get("backend", "local")
        backend = make_backend(plan, backend_name, get_connection, docker_api)
        local = backend.local if isinstance(backend, DockerBackend) else backend
        infos = [info] if info else local.run_leftovers(owner_for(pick["run_id"]), pick["service"])
        for target in infos:
            if keep:
                done.append(f"kept {target.describe()} (keep_scratch); the next drill removes it")
            else:
                done += backend.stop(target) if target.backend == backend.name else local.stop(target)
        fetched = work_dir(plan, pick["run_id"], pick["service"])
        if fetched.exists():
            shutil.rmtree(fetched)
            done.append(f"removed fetched files {fetched}")
        run_work = work_dir(plan, pick["run_id"])
        if run_work.is_dir() and not any(run_work.iterdir()):
            run_work.rmdir()
        record.update(done=done, kept=keep)
    log.info("drill teardown of %s: %s", pick["service"], "; ".join(done) or "nothing to remove")
    return {"service": pick["service"], "done": done}


