"""The DR drill's steps as plain functions: clean leftovers, start target, fetch, restore, verify, teardown.

The DAG's tasks are thin wrappers; tests call these directly. Every service-specific
decision comes from the service module (`erp_backup.services`): which scratch target
to start, how to restore into it and how to check the result. Choosing the sets is
`choose.pick`; what each step records is `records`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from erp_backup import crypto
from erp_backup.checksum import ChecksumMismatch, entry_problem
from erp_backup.drill.choose import offsite_store, pick
from erp_backup.drill.model import DrillFailed, DrillVerificationFailed
from erp_backup.drill.pitr_pick import slot
from erp_backup.drill.records import ServiceState, drills_root, mkdirs, service_state, work_dir
from erp_backup.drill.targets import (
    DockerBackend,
    LocalBackend,
    ProductionGuard,
    TargetInfo,
    drill_scratch_root,
    owner_for,
    slug,
)
from erp_backup.manifest import MANIFEST_NAME, Manifest
from erp_backup.plan import Plan
from erp_backup.scratch.local import release as release_target
from erp_backup.sealing import UnsealingOffsite, unsealed_copy
from erp_backup.services import get_service
from erp_backup.services.base import CheckContext, RestoreReport, ServiceModule, airflow_connection

__all__ = ["DrillFailed", "DrillVerificationFailed", "clean_leftovers", "fetch", "make_backend", "pick", "restore",
           "start_target", "teardown", "verify"]

log = logging.getLogger(__name__)


def make_backend(plan: Plan, name: str, get_connection: Callable[[str], Any] = airflow_connection,
                 docker_api: Any = None) -> LocalBackend | DockerBackend:
    guard = ProductionGuard.from_plan(plan, get_connection)
    local = LocalBackend(drill_scratch_root(plan), guard)
    if name == "docker":
        if docker_api is not None:
            return DockerBackend(docker_api, guard, local, docker_plan=plan.drill.docker)
        return DockerBackend.from_env(guard, local, plan.drill.docker)
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


# ───────────────────────── start_target ─────────────────────────


def start_target(plan: Plan, pick: Mapping[str, Any], *, get_connection: Callable[[str], Any] = airflow_connection,
                 docker_api: Any = None) -> dict[str, Any]:
    """Start the scratch target (the setup task). Refuses any production endpoint."""
    state = service_state(plan, pick)
    with state.step("start_target") as record:
        info = _start(plan, pick, get_connection, docker_api)
        state.save_target(info)
        record.update(target=info.describe(), kind=info.kind, backend=info.backend, image=info.image)
    return {"service": pick["service"], "target": info.describe()}


def _start(plan: Plan, pick: Mapping[str, Any], get_connection: Callable[[str], Any], docker_api: Any) -> TargetInfo:
    module = get_service(pick["service"])
    spec = module.scratch_spec(pick["backup_type"], pick.get("versions") or {}, pitr=bool(pick.get("pitr")))
    backend = make_backend(plan, pick["backend"], get_connection, docker_api)
    return backend.start(spec, pick["service"], pick["backup_type"], owner_for(pick["run_id"]), run_id=pick["run_id"])


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


def drill_identities(plan: Plan) -> list[Any]:
    """The drill's age identities, from the plan's identity connection (read only when a set is sealed)."""
    return crypto.identities_from_connection(plan.encryption.identity_conn_id, airflow_connection)


def _sets_to_fetch(pick: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The picked set, then (for a point-in-time drill) the sets replayed on it."""
    return [(pick["backup_type"], pick["backup_id"]), *((kind, set_id) for kind, set_id in (pick.get("pitr") or {}).get("sets", []))]


def fetch(plan: Plan, pick: Mapping[str, Any], *, offsite: Any = None) -> dict[str, Any]:
    """Bring the set (and the sets a point-in-time restore replays) to the worker, verifying every file's SHA-256."""
    state = service_state(plan, pick)
    service = pick["service"]
    with state.step("fetch") as record:
        root = work_dir(plan, pick["run_id"], slot(pick)) / "root"
        fetched_bytes, files = 0, 0
        for kind, set_id in _sets_to_fetch(pick):
            if pick["source"] == "offsite":
                set_dir = root / service / kind / set_id
                if set_dir.exists():
                    shutil.rmtree(set_dir)  # a retried fetch starts clean
                mkdirs(set_dir.parent)
                store = UnsealingOffsite(offsite_store(plan, offsite), lambda: drill_identities(plan))
                stored, _ = store.fetch_both(service, kind, set_id, set_dir)
            else:
                set_dir = Path(plan.backup_root) / service / kind / set_id
                stored = Manifest.read(set_dir / MANIFEST_NAME)
                verify_in_place(set_dir, stored)
                set_dir, _ = unsealed_copy(set_dir, stored, root / service / kind / set_id,
                                           lambda: drill_identities(plan))
            fetched_bytes += stored.total_size
            files += len(stored.files)
            if (kind, set_id) == (pick["backup_type"], pick["backup_id"]):
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


@contextmanager
def _released(info: TargetInfo) -> Iterator[None]:
    """Release what this process holds of the target (an embedded server) once the step is done."""
    try:
        yield
    finally:
        release_target(info)


def restore(plan: Plan, pick: Mapping[str, Any], *, get_connection: Callable[[str], Any] = airflow_connection,
            docker_api: Any = None) -> dict[str, Any]:
    """Restore the fetched set into the scratch target with the service module's restore verb, timed.

    The restore's own findings do not fail this step: they are recorded, and the verify
    step fails on them with everything it found.
    """
    state = service_state(plan, pick)
    set_dir, manifest, fetched = _fetched(state)
    info = _target(state)
    previous = state.read("restore")
    if previous and previous.get("status") in ("running", "failed"):
        log.warning("%s: an earlier restore attempt touched %s; starting a fresh scratch target", pick["service"], info.describe())
        make_backend(plan, info.backend, get_connection, docker_api).stop(info)
        info = _start(plan, pick, get_connection, docker_api)
        state.save_target(info)
    ProductionGuard.from_plan(plan, get_connection).check(info)
    module = get_service(pick["service"])

    with state.step("restore") as record:
        record["target"] = info.describe()
        with _released(info):
            report = _restore_into(module, pick, set_dir, manifest, info, Path(fetched["root"]))
        restored = report.restored_bytes or int((pick.get("size_measure") or {}).get("bytes") or manifest.total_size)
        record.update(report=report.as_dict(), restore_problems=report.problems, restored_bytes=restored)
    record["mb_per_s"] = round(record["restored_bytes"] / 1e6 / record["seconds"], 2) if record["seconds"] else None
    state.write("restore", record)
    return {"service": pick["service"], "seconds": record["seconds"], "problems": len(report.problems)}


def _restore_into(module: ServiceModule, pick: Mapping[str, Any], set_dir: Path, manifest: Manifest, info: TargetInfo,
                  root: Path) -> RestoreReport:
    target = module.scratch_target(info)
    pitr = pick.get("pitr")
    if pitr:
        return module.restore_to_time(root, datetime.fromisoformat(pitr["target_time"]), target, owner=info.owner)
    return module.restore(set_dir, manifest, target)


# ───────────────────────── verify ─────────────────────────


def verify(plan: Plan, pick: Mapping[str, Any], *, get_connection: Callable[[str], Any] = airflow_connection) -> dict[str, Any]:
    """Check the restored data against the manifest with the service's checks; fail with every mismatch found."""
    state = service_state(plan, pick)
    set_dir, manifest, _ = _fetched(state)
    info = _target(state)
    restored = state.read("restore") or {}
    if restored.get("status") != "ok":
        raise DrillFailed(f"{pick['service']}: nothing to verify (restore step: {restored.get('status', 'did not run')})")
    module = get_service(pick["service"])
    guard = ProductionGuard.from_plan(plan, get_connection)
    pitr = pick.get("pitr")
    ctx = CheckContext(guard=lambda host, port: guard.check_address(info, host, port),
                       keep_scratch=bool(pick.get("keep_scratch")),
                       at=datetime.fromisoformat(pitr["target_time"]) if pitr else None)
    report = RestoreReport.from_dict(restored.get("report") or {})
    with state.step("verify") as record:
        with _released(info):
            found = module.check_restored(module.scratch_target(info), set_dir, manifest, report, ctx)
        problems = found.problems + list(restored.get("restore_problems") or [])  # our own findings first
        record.update(checks=found.checks, problems=problems)
        if problems:
            shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise DrillVerificationFailed(
                f"{pick['service']}/{pick['backup_type']}/{pick['backup_id']}: the restore does not match the manifest: {shown}"
            )
        record["status"] = "prepared" if report.prepared_only else "ok"
    return {"service": pick["service"], "checks": len(record["checks"]), "status": record["status"]}


# ───────────────────────── teardown ─────────────────────────


def teardown(plan: Plan, pick: Mapping[str, Any], *, keep_scratch: bool | None = None,
             get_connection: Callable[[str], Any] = airflow_connection, docker_api: Any = None) -> dict[str, Any]:
    """Remove the scratch target (unless keep_scratch) and the fetched files. Runs whatever happened before."""
    state = service_state(plan, pick)
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
        fetched = work_dir(plan, pick["run_id"], slot(pick))
        if fetched.exists():
            shutil.rmtree(fetched)
            done.append(f"removed fetched files {fetched}")
        run_work = work_dir(plan, pick["run_id"])
        if run_work.is_dir() and not any(run_work.iterdir()):
            run_work.rmdir()
        record.update(done=done, kept=keep)
    log.info("drill teardown of %s: %s", pick["service"], "; ".join(done) or "nothing to remove")
    return {"service": pick["service"], "done": done}
