"""Recover the estate: fetch each service's sets from offsite, start fresh scratch targets, restore, tear down.

Services go in dependency order (`estate.depends_on`); the services of one layer run in
parallel in a thread pool. Everything service-specific comes from the service modules:
the scratch target (`scratch_spec`/`scratch_target`), the restore (`restore`, or
`restore_to_time` for PITR). Scratch targets are local processes on 127.0.0.1 under an
estate scratch root, labelled `estate:<run>`, or, with the Docker backend (`backend`, by
default the plan's `drill.backend`), containers of the drill's `DockerBackend` labelled
`erp-backup.drill=<run>`. A service stays on the local backend, with the reason in its
`backend_note`, when its target cannot be a container: a PITR restore (it writes the base
and WAL into a data directory on this worker and replays them there), a scratch kind with no
container target, or an image missing from the engine under `drill.docker.pull: never`.
The production guard refuses any target equal to a production endpoint of the plan.
`teardown` always removes what was started, and every container and network labelled with the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from erp_backup import crypto
from erp_backup.drill.targets import DRILL_LABEL, DockerBackend, LocalBackend, ProductionGuard, slug
from erp_backup.estate.choose import ChosenSet, EstatePlanOfSets, ServicePlan, layers
from erp_backup.manifest import Manifest
from erp_backup.notify import one_line
from erp_backup.plan import Plan
from erp_backup.scratch import local as scratch_local
from erp_backup.scratch.base import TargetInfo, scratch_root
from erp_backup.sealing import UnsealingOffsite
from erp_backup.services import get_service
from erp_backup.services.base import RestoreReport, ScratchSpec, airflow_connection

log = logging.getLogger(__name__)

OWNER_PREFIX = "estate:"
BACKENDS = ("local", "docker")
PITR_STAYS_LOCAL = ("PITR stays on the local backend: restore_to_time writes the base and WAL into a data directory "
                    "on this worker and replays them there; a container target has no such directory")


def estate_scratch_root(plan: Plan) -> Path:
    """One scratch root per backup root, apart from the weekly drill's (whose clean-up would take ours)."""
    digest = hashlib.sha256(str(Path(plan.backup_root).absolute()).encode()).hexdigest()[:10]
    root = scratch_root() / f"erp-estate-{digest}"
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    return root


def work_root(plan: Plan, run_id: str) -> Path:
    return Path(plan.backup_root) / "estate" / "work" / slug(run_id, 64)


@dataclass
class ServiceRun:
    """What recovering one service did: its targets, timings, the restore's findings."""

    chosen: ServicePlan
    status: str = "pending"  # restored | failed | skipped
    backend: str = "local"  # where its targets ran: local | docker
    backend_note: str | None = None  # why a Docker recovery kept this service on the local backend
    targets: dict[str, TargetInfo] = field(default_factory=dict)  # backup type -> target
    seconds: dict[str, float] = field(default_factory=dict)  # fetch, start, restore, total
    fetched_bytes: int = 0
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def service(self) -> str:
        return self.chosen.service

    def as_dict(self) -> dict[str, Any]:
        return {**self.chosen.as_dict(), "status": self.status, "backend": self.backend,
                "backend_note": self.backend_note, "seconds": dict(self.seconds),
                "fetched_bytes": self.fetched_bytes, "targets": {t: i.describe() for t, i in self.targets.items()},
                "restore": self.reports, "problems": list(self.problems), "error": self.error}


class EstateRecovery:
    """One recovery run: its work dir, its scratch targets, and what each service's recovery did."""

    def __init__(self, plan: Plan, run_id: str, store: Any, *, get_connection: Callable[[str], Any] = airflow_connection,
                 identities: Callable[[], Sequence[Any]] | None = None, backend: str | None = None,
                 docker_api: Any = None):
        self.plan, self.run_id = plan, run_id
        self.backend_name = backend or plan.drill.backend
        if self.backend_name not in BACKENDS:
            raise ValueError(f"backend {self.backend_name!r} is not valid; valid: {', '.join(BACKENDS)}")
        # Sealed sets are decrypted on fetch with the drill's identity (--identity FILE from the CLI).
        self.store = store if isinstance(store, UnsealingOffsite) else UnsealingOffsite(
            store, identities or (lambda: crypto.identities_from_connection(plan.encryption.identity_conn_id,
                                                                             get_connection)))
        self.owner = f"{OWNER_PREFIX}{run_id}"
        self.work = work_root(plan, run_id)
        self.root = estate_scratch_root(plan)
        self.local = LocalBackend(self.root, ProductionGuard.from_plan(plan, get_connection))
        self._docker_api = docker_api
        self._docker: DockerBackend | None = None
        self.runs: dict[str, ServiceRun] = {}
        self.layers: list[list[str]] = []
        self.wall_seconds = 0.0
        self._lock = threading.Lock()

    @property
    def docker(self) -> DockerBackend:
        """The drill's Docker backend (made on first use: a local recovery needs no engine)."""
        if self._docker is None:
            if self._docker_api is not None:
                self._docker = DockerBackend(self._docker_api, self.local.guard, self.local,
                                             docker_plan=self.plan.drill.docker)
            else:
                self._docker = DockerBackend.from_env(self.local.guard, self.local, self.plan.drill.docker)
        return self._docker

    def backend_for(self, spec: ScratchSpec, pitr: bool) -> tuple[LocalBackend | DockerBackend, str | None]:
        """The backend for one target, and why it is the local one when Docker was asked for."""
        if self.backend_name != "docker":
            return self.local, None
        if pitr:
            return self.local, PITR_STAYS_LOCAL
        if spec.container is None:
            return self.local, f"scratch kind {spec.kind!r} has no container target"
        image = self.plan.drill.docker.image_for(spec.kind, spec.container.image)
        if self.plan.drill.docker.pull == "never" and not self._image_present(image):
            return self.local, f"image {image} (scratch kind {spec.kind!r}) is not on the Docker engine (drill.docker.pull: never)"
        return self.docker, None

    def _image_present(self, image: str) -> bool:
        from docker.errors import ImageNotFound

        try:
            self.docker.api.inspect_image(image)
            return True
        except ImageNotFound:
            return False

    def clean_leftovers(self) -> list[str]:
        """Targets and work dirs of earlier (crashed) estate recoveries under this backup root."""
        removed = scratch_local.cleanup_leftovers(self.root, OWNER_PREFIX, self.owner)
        parent = self.work.parent
        if parent.is_dir():
            for entry in parent.iterdir():
                if entry != self.work:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(f"work dir {entry}")
        for item in removed:
            log.warning("estate %s: removed leftover %s", self.run_id, item)
        return removed

    def recover(self, sets: EstatePlanOfSets) -> dict[str, ServiceRun]:
        """Restore every planned service, layer by layer; a service whose dependency failed is skipped."""
        self.runs = {p.service: ServiceRun(p) for p in sets.services}
        self.layers = layers(list(self.runs), self.plan.estate.depends_on if self.plan.estate else {})
        started = time.monotonic()
        for layer in self.layers:
            with ThreadPoolExecutor(max_workers=len(layer), thread_name_prefix="estate") as pool:
                list(pool.map(lambda name: self._recover_one(name, sets.at), layer))
        self.wall_seconds = round(time.monotonic() - started, 3)
        return self.runs

    def _recover_one(self, service: str, at: datetime) -> None:
        run = self.runs[service]
        depends = self.plan.estate.depends_on.get(service, ()) if self.plan.estate else ()
        failed = [d for d in depends if d in self.runs and self.runs[d].status != "restored"]
        if failed:
            run.status, run.error = "skipped", f"not restored: it depends on {', '.join(failed)}, which failed"
            return
        started = time.monotonic()
        try:
            if run.chosen.pitr:
                self._restore_pitr(run, at)
            else:
                for chosen in run.chosen.sets:
                    self._restore_set(run, chosen)
            run.status = "restored"
        except Exception as exc:
            run.status, run.error = "failed", one_line(exc)
            log.exception("estate %s: %s failed", self.run_id, service)
        run.seconds["total"] = round(time.monotonic() - started, 3)

    def _timed(self, run: ServiceRun, step: str, work: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            return work()
        finally:
            run.seconds[step] = round(run.seconds.get(step, 0.0) + time.monotonic() - started, 3)

    def _fetch(self, run: ServiceRun, chosen: ChosenSet) -> tuple[Path, Manifest]:
        set_dir = self.work / run.service / "root" / run.service / chosen.backup_type / chosen.backup_id
        if set_dir.exists():
            shutil.rmtree(set_dir)
        set_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        manifest = self._timed(run, "fetch", lambda: self.store.fetch_set(run.service, chosen.backup_type,
                                                                          chosen.backup_id, set_dir))
        run.fetched_bytes += manifest.total_size
        return set_dir, manifest

    def _start(self, run: ServiceRun, backup_type: str, manifest: Manifest, pitr: bool) -> TargetInfo:
        module = get_service(run.service)
        spec = module.scratch_spec(backup_type, module.versions(manifest), pitr=pitr)
        backend, note = self.backend_for(spec, pitr)
        info = self._timed(run, "start", lambda: backend.start(spec, run.service, backup_type, self.owner,
                                                               run_id=self.run_id))
        with self._lock:
            run.targets[backup_type] = info
            if info.backend == "docker":
                run.backend = "docker"
            run.backend_note = note or run.backend_note
        return info

    def _record(self, run: ServiceRun, backup_type: str, report: RestoreReport) -> None:
        run.reports[backup_type] = report.as_dict()
        run.problems += [f"{backup_type}: {problem}" for problem in report.problems]

    def _restore_set(self, run: ServiceRun, chosen: ChosenSet) -> None:
        module = get_service(run.service)
        set_dir, manifest = self._fetch(run, chosen)
        info = self._start(run, chosen.backup_type, manifest, pitr=False)
        try:
            report = self._timed(run, "restore", lambda: module.restore(set_dir, manifest, module.scratch_target(info)))
        finally:
            scratch_local.release(info)
        self._record(run, chosen.backup_type, report)

    def _restore_pitr(self, run: ServiceRun, at: datetime) -> None:
        module = get_service(run.service)
        manifests = [self._fetch(run, chosen)[1] for chosen in run.chosen.sets]
        base = run.chosen.sets[0]
        info = self._start(run, base.backup_type, manifests[0], pitr=True)
        root = self.work / run.service / "root"
        report = self._timed(run, "restore", lambda: module.restore_to_time(
            root, at, module.scratch_target(info), owner=self.owner, identities=self.store.identities))
        self._record(run, base.backup_type, report)

    def target(self, service: str, backup_type: str | None) -> Any:
        """What the service's verbs take for its restored target (of `backup_type`, or its only one)."""
        run = self.runs.get(service)
        if run is None or run.status != "restored":
            return None
        if backup_type is None and len(run.targets) == 1:
            backup_type = next(iter(run.targets))
        info = run.targets.get(backup_type or "")
        if info is None:
            raise ValueError(f"{service}: no restored target of type {backup_type!r} (restored: {', '.join(run.targets)}); "
                             f"set backup_type in the plan's estate.references entry")
        return get_service(service).scratch_target(info)

    def release(self) -> None:
        for run in self.runs.values():
            for info in run.targets.values():
                scratch_local.release(info)

    def save_targets(self, path: Path) -> None:
        """Record the started targets (0600: may hold a scratch password) for a teardown in another process."""
        from erp_backup.drill.records import write_json

        write_json(path, [info.as_dict() for run in self.runs.values() for info in run.targets.values()])

    def _all_targets(self, saved: Path | None) -> list[TargetInfo]:
        infos = [info for run in self.runs.values() for info in run.targets.values()]
        if not infos and saved is not None and saved.is_file():
            infos = [TargetInfo.from_dict(item) for item in json.loads(saved.read_text())]
        return infos

    def teardown(self, keep: bool = False, saved: Path | None = None) -> list[str]:
        """Stop and remove every scratch target (this process's, else those saved) and the fetched files."""
        done: list[str] = []
        for info in self._all_targets(saved):
            if keep:
                done.append(f"kept {info.describe()}; the next recovery removes it")
                continue
            try:
                done += (self.docker if info.backend == "docker" else self.local).stop(info)
            except Exception as exc:
                done.append(f"could not stop {info.describe()}: {one_line(exc)}")
        for leftover in scratch_local.cleanup_leftovers(self.root, self.owner, None) if not keep else []:
            done.append(f"removed {leftover}")
        if self.backend_name == "docker" and not keep:
            done += self._remove_labelled()
        if self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)
            done.append(f"removed fetched files {self.work}")
        return done

    def _remove_labelled(self) -> list[str]:
        """Containers (with their anonymous volumes) and networks labelled with this run that a crashed setup left."""
        api, label, done = self.docker.api, {"label": [f"{DRILL_LABEL}={self.run_id}"]}, []
        for container in api.containers(all=True, filters=label):
            api.remove_container(container["Id"], force=True, v=True)
            done.append(f"removed container {(container.get('Names') or [container['Id']])[0]}")
        for network in api.networks(filters=label):
            api.remove_network(network["Id"])
            done.append(f"removed network {network.get('Name', network['Id'])}")
        return done
