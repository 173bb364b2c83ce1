"""Scratch restore targets for DR drills, and the guard that keeps drills off production.

Two backends build a throwaway target for a (service, backup type):

- `LocalBackend`: processes on 127.0.0.1 under one scratch root per backup root, one
  kind of `erp_backup.scratch` server per target (the kind registry `scratch.local`
  says how each is made, stopped and removed).
- `DockerBackend`: a container of the matching image and major version (the image
  per kind and the pull policy from the plan's `drill.docker`) on an `internal`
  network created per drill (no route out of it), reached through a port forwarder
  published on 127.0.0.1 only, labelled `erp-backup.drill=<run_id>`. Redis, etcd
  and GitLab have no container target (their restores start a local server or
  only prepare files); they fall back to the local backend.

Every target is described by a `TargetInfo` (JSON, kept in the drill's state), so
the teardown task, in another process, can stop it. Every target is labelled with
its owner `drill:<run_id>`; `cleanup_leftovers` stops and removes targets of other
runs (crashed drills) by label, pid file or Docker label, never by process name.

`ProductionGuard` refuses any target whose host:port, file path or RabbitMQ node
equals one of the plan's connections.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from erp_backup.plan import PROXY_KIND, DrillDockerPlan, Plan
from erp_backup.scratch import local as scratch_local
from erp_backup.scratch.base import ScratchError, TargetInfo, scratch_root, wait_ready
from erp_backup.scratch.local import START_TIMEOUT_S
from erp_backup.services.base import ContainerSpec, ScratchSpec

log = logging.getLogger(__name__)

DRILL_LABEL = "erp-backup.drill"
SERVICE_LABEL = "erp-backup.drill.service"
OWNER_PREFIX = "drill:"
DOCKER_CONN_ENV = "ERP_DRILL_DOCKER_CONN_ID"
DOCKER_URL_ENV = "ERP_DRILL_DOCKER_URL"
WORKER_CONTAINER_ENV = "ERP_DRILL_WORKER_CONTAINER"
DEFAULT_PROXY_IMAGE = "alpine/socat:1.8.0.0"

_LOOPBACK_NAMES = frozenset({"", "localhost", "ip6-localhost", "ip6-loopback", "0.0.0.0", "::"})


class TargetError(ScratchError):
    """A scratch target could not be started or stopped. The message says which and why."""


class ProductionTargetRefused(TargetError):
    """A scratch target would point at a production endpoint of the plan."""


def owner_for(run_id: str) -> str:
    return f"{OWNER_PREFIX}{run_id}"


def slug(text: str, limit: int = 48) -> str:
    """A name part safe for files, Docker names and Erlang node names."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{cleaned[: limit - 9]}-{digest}" if cleaned else digest


def drill_scratch_root(plan: Plan) -> Path:
    """One scratch root per backup root, readable by the postgres/rabbitmq OS users (0755)."""
    digest = hashlib.sha256(str(Path(plan.backup_root).absolute()).encode()).hexdigest()[:10]
    root = scratch_root() / f"erp-drill-{digest}"
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    return root


# ───────────────────────── production guard ─────────────────────────


@dataclass(frozen=True)
class ProductionEndpoint:
    conn_id: str
    hosts: frozenset[str]  # normalised names and addresses
    port: int | None
    path: str | None = None
    node: str | None = None


def _normalise(host: str) -> set[str]:
    """The forms a host can take: loopback names collapse to 'loopback'; names add their addresses."""
    host = (host or "").strip().strip("[]").lower()
    found = {host}
    try:
        if ipaddress.ip_address(host).is_loopback or host in _LOOPBACK_NAMES:
            return {"loopback"}
        return found
    except ValueError:
        pass
    if host in _LOOPBACK_NAMES:
        return {"loopback"}
    try:
        for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP):
            address = str(info[4][0])
            found.add("loopback" if ipaddress.ip_address(address).is_loopback else address)
    except (OSError, ValueError):
        pass
    return found


def _endpoints_of(conn_id: str, conn: Any, default_port: int | None) -> list[ProductionEndpoint]:
    extra = getattr(conn, "extra_dejson", None) or {}
    endpoints = []
    host = (getattr(conn, "host", None) or "").strip()
    port = getattr(conn, "port", None)
    node = extra.get("node")
    if host:
        if "://" in host:
            parts = urlsplit(host)
            endpoints.append(ProductionEndpoint(conn_id, frozenset(_normalise(parts.hostname or "")),
                                                parts.port or port or default_port, node=node))
        else:
            endpoints.append(ProductionEndpoint(conn_id, frozenset(_normalise(host)), int(port or default_port or 0) or None,
                                                node=node))
    for key in ("uri", "endpoint_url", "management_url"):
        value = extra.get(key)
        if not value:
            continue
        if "://" in value:
            parts = urlsplit(value)
            endpoints.append(ProductionEndpoint(conn_id, frozenset(_normalise(parts.hostname or "")), parts.port))
        else:
            endpoints.append(ProductionEndpoint(conn_id, frozenset(), None, path=str(Path(value).absolute())))
    if node and not endpoints:
        endpoints.append(ProductionEndpoint(conn_id, frozenset(), None, node=node))
    return endpoints


class ProductionGuard:
    """Refuses scratch targets that equal any production endpoint named by the plan's connections."""

    def __init__(self, endpoints: Iterable[ProductionEndpoint]):
        self.endpoints = list(endpoints)

    @classmethod
    def from_plan(cls, plan: Plan, get_connection: Callable[[str], Any]) -> ProductionGuard:
        """Every connection id in the plan (all services, enabled or not, and offsite); undefined ones are skipped."""
        from erp_backup.services import get_service

        ports: dict[str, int | None] = {}
        for job in plan.jobs:
            for role, conn_id in job.connections.items():
                ports.setdefault(conn_id, get_service(job.service).DEFAULT_PORTS.get(role))
        if plan.offsite.conn_id:
            ports.setdefault(plan.offsite.conn_id, 443)
        endpoints: list[ProductionEndpoint] = []
        for conn_id, default_port in sorted(ports.items()):
            try:
                conn = get_connection(conn_id)
            except Exception as exc:  # an undefined connection cannot be a production endpoint here
                log.info("production guard: connection %r is not defined here (%s); nothing to protect", conn_id, type(exc).__name__)
                continue
            endpoints.extend(_endpoints_of(conn_id, conn, default_port))
        return cls(endpoints)

    def check_address(self, info: TargetInfo, host: str, port: int) -> None:
        """Refuse `host:port`, a server a check starts for `info` (etcd on a restored data dir)."""
        self.check(TargetInfo(info.service, info.backup_type, info.kind, info.backend, info.owner, host=host, port=port))

    def check(self, info: TargetInfo) -> None:
        """Raise ProductionTargetRefused if `info` is (or points at) a production endpoint."""
        target_hosts = _normalise(info.host) if info.host else set()
        target_path = str(Path(info.uri).absolute()) if info.uri and "://" not in info.uri else None
        uri_host, uri_port = None, None
        if info.uri and "://" in info.uri:
            parts = urlsplit(info.uri)
            uri_host, uri_port = _normalise(parts.hostname or ""), parts.port
        for endpoint in self.endpoints:
            same_host_port = (
                info.port is not None and endpoint.port == info.port and bool(endpoint.hosts & target_hosts)
            ) or (uri_port is not None and endpoint.port == uri_port and bool(endpoint.hosts & (uri_host or set())))
            same_path = target_path is not None and endpoint.path == target_path
            same_node = info.node is not None and endpoint.node == info.node
            if same_host_port or same_path or same_node:
                raise ProductionTargetRefused(
                    f"refusing scratch target {info.describe()}: it is the production endpoint of connection "
                    f"{endpoint.conn_id!r}. A drill restores only into scratch targets; check the drill backend "
                    f"settings and the connection {endpoint.conn_id!r}"
                )


# ───────────────────────── local backend ─────────────────────────


class LocalBackend:
    """Scratch processes and directories on this worker, 127.0.0.1 only (see `erp_backup.scratch.local`)."""

    name = "local"

    def __init__(self, root: Path, guard: ProductionGuard):
        self.root, self.guard = Path(root), guard

    def start(self, spec: ScratchSpec, service: str, backup_type: str, owner: str, *, run_id: str = "",
              timeout: float = START_TIMEOUT_S) -> TargetInfo:
        """Start (or prepare) the scratch server a service asked for. Its address is checked before anything is made."""
        return self.start_kind(spec.kind, service, backup_type, owner, pg_major=spec.major, timeout=timeout)

    def start_kind(self, kind: str, service: str, backup_type: str, owner: str, *, pg_major: int | None = None,
                   timeout: float = START_TIMEOUT_S) -> TargetInfo:
        """Start (or prepare) a target of `kind`; refused (and removed) if it is a production endpoint."""
        info = scratch_local.address(kind, service, backup_type, owner)
        self.guard.check(info)
        scratch_local.create(info, self.root, pg_major=pg_major, timeout=timeout)
        try:
            self.guard.check(info)  # paths (milvus-lite files) are known only now
        except BaseException:
            self.stop(info)
            raise
        return info

    def stop(self, info: TargetInfo) -> list[str]:
        """Stop whatever runs for `info` and remove its directory. Returns what was done."""
        return scratch_local.remove(info)

    def cleanup_leftovers(self, keep_owner: str | None) -> list[str]:
        """Stop and remove targets of other drill runs (crashed or kept), found by their labels."""
        return scratch_local.cleanup_leftovers(self.root, OWNER_PREFIX, keep_owner)

    def run_leftovers(self, owner: str, service: str) -> list[TargetInfo]:
        """Targets of one run and service that exist on disk (for a teardown whose setup crashed)."""
        return scratch_local.owned_targets(self.root, owner, service)


# ───────────────────────── Docker ─────────────────────────


def _split_image(image: str) -> tuple[str, str]:
    repository, _, tag = image.rpartition(":")
    if not repository or "/" in tag:
        return image, "latest"
    return repository, tag


def _ready(info: TargetInfo) -> None:
    wait_ready(info, START_TIMEOUT_S)


def forward_command(port: int, target: str) -> list[str]:
    """socat's arguments: accept on `port` (a child per connection) and connect each to target:port."""
    return [f"TCP-LISTEN:{port},fork,reuseaddr", f"TCP:{target}:{port}"]


def _worker_container(value: str | None) -> str | None:
    """`$ERP_DRILL_WORKER_CONTAINER`: a container name or id; `auto` is this container (Docker sets its hostname to its id)."""
    if value == "auto":
        return socket.gethostname()
    return value or None


class DockerBackend:
    """Scratch containers through the Docker API (`docker.APIClient`, e.g. from the Docker provider's hook).

    Each drill target gets its own `internal` bridge network (no route out of it, so
    the target cannot reach production, the host's other networks or the internet
    by any address) and container, both labelled `erp-backup.drill=<run_id>`, so the
    next run's `cleanup_leftovers` finds what a killed worker left. Docker publishes
    no port from an internal network, so a worker on the host reaches the target
    through a forwarder container (`<target>-proxy`, socat) that sits on that network
    and on a network of its own, its port published on 127.0.0.1 only. A worker in a
    container (`$ERP_DRILL_WORKER_CONTAINER`) joins the drill network instead and
    reaches the target by container name. The image per scratch kind (and `proxy`)
    and the pull policy come from the plan (`drill.docker`).
    """

    name = "docker"

    def __init__(self, api: Any, guard: ProductionGuard, local: LocalBackend, *, worker_container: str | None = None,
                 docker_conn_id: str | None = None, ready: Callable[[TargetInfo], None] = _ready,
                 docker_plan: DrillDockerPlan | None = None):
        self.api, self.guard, self.local = api, guard, local
        self.worker_container, self.docker_conn_id, self.ready = worker_container, docker_conn_id, ready
        self.docker_plan = docker_plan or DrillDockerPlan()

    @classmethod
    def from_env(cls, guard: ProductionGuard, local: LocalBackend, docker_plan: DrillDockerPlan | None = None) -> DockerBackend:
        from erp_backup.runner import docker_api

        conn_id = os.environ.get(DOCKER_CONN_ENV) or None
        url = os.environ.get(DOCKER_URL_ENV) or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        return cls(docker_api(conn_id, url), guard, local, worker_container=_worker_container(os.environ.get(WORKER_CONTAINER_ENV)),
                   docker_conn_id=conn_id, docker_plan=docker_plan)

    def start(self, spec: ScratchSpec, service: str, backup_type: str, owner: str, *, run_id: str,
              timeout: float = START_TIMEOUT_S) -> TargetInfo:
        """Run the service's scratch image; a spec without one runs on the local backend."""
        if spec.container is None:
            log.info("%s/%s has no container target; using the local backend", service, backup_type)
            return self.local.start(spec, service, backup_type, owner, run_id=run_id, timeout=timeout)
        name = f"erp-drill-{slug(run_id, 40)}-{service}"
        labels = {DRILL_LABEL: run_id, SERVICE_LABEL: service}
        image = self.docker_plan.image_for(spec.kind, spec.container.image)
        info = TargetInfo(service=service, backup_type=backup_type, kind=spec.kind, backend=self.name, owner=owner,
                          image=image, container=name, network=name,
                          docker_conn_id=self.docker_conn_id, secret=secrets.token_hex(16))
        log.info("drill %s: creating internal network %s and container %s (%s)", run_id, name, name, image)
        self.api.create_network(name, driver="bridge", internal=True, labels=labels, check_duplicate=True)
        try:
            self._ensure_image(image)
            self._run_container(info, spec.container, labels)
            self.guard.check(info)
            self.ready(info)
        except BaseException:
            self.stop(info)  # nothing half-started stays behind
            raise
        return info

    def _ensure_image(self, image: str) -> None:
        """Pull `image` as the plan's `drill.docker.pull` says: if-missing, always or never."""
        from docker.errors import ImageNotFound

        policy = self.docker_plan.pull
        if policy != "always":
            try:
                self.api.inspect_image(image)
                return
            except ImageNotFound:
                pass
            if policy == "never":
                raise TargetError(f"image {image} is not on the Docker engine and the plan's drill.docker.pull is "
                                  "'never': build or load it there, or change drill.docker.images")
        repository, tag = _split_image(image)
        log.info("pulling %s:%s (drill.docker.pull: %s)", repository, tag, policy)
        self.api.pull(repository, tag=tag)

    def _run_container(self, info: TargetInfo, spec: ContainerSpec, labels: dict[str, str]) -> None:
        name = info.container
        assert name and info.image
        host_config = self.api.create_host_config(port_bindings={}, network_mode=name)
        environment = {**spec.environment, **dict.fromkeys(spec.secret_env, info.secret)}
        self.api.create_container(
            image=info.image, name=name, labels=labels, environment=environment,
            command=list(spec.command) if spec.command else None, ports=[spec.port], host_config=host_config, detach=True,
        )
        self.api.start(name)
        if self.worker_container:
            self.api.connect_container_to_network(self.worker_container, name)
            info.worker_container = self.worker_container
            info.host, info.port = name, spec.port
        else:
            info.host, info.port = "127.0.0.1", self._run_proxy(info, spec.port, labels)
        if spec.uri_scheme:
            info.uri = f"{spec.uri_scheme}://{info.host}:{info.port}"

    def _run_proxy(self, info: TargetInfo, port: int, labels: dict[str, str]) -> int:
        """Start `info.proxy`: socat from 127.0.0.1:<published> to the target's port; returns the published port.

        The forwarder has a network of its own (the only one a port is published from)
        and joins the target's internal network, where it finds the target by name.
        """
        target = info.container
        assert target
        image = self.docker_plan.image_for(PROXY_KIND, DEFAULT_PROXY_IMAGE)
        self._ensure_image(image)
        proxy = info.proxy = f"{target}-proxy"  # set before it is made, so a failed start removes it
        log.info("drill: forwarding 127.0.0.1 to %s:%d through %s (%s)", target, port, proxy, image)
        self.api.create_network(proxy, driver="bridge", internal=False, labels=labels, check_duplicate=True)
        host_config = self.api.create_host_config(port_bindings={port: ("127.0.0.1", None)}, network_mode=proxy)
        self.api.create_container(image=image, name=proxy, labels=labels, ports=[port], host_config=host_config,
                                  command=forward_command(port, target), detach=True)
        self.api.connect_container_to_network(proxy, target)
        self.api.start(proxy)
        return self._published_port(proxy, port)

    def _published_port(self, name: str, port: int) -> int:
        bindings = self.api.port(name, port) or []
        if not bindings:
            raise TargetError(f"container {name}: port {port} was not published on 127.0.0.1")
        wrong = [binding.get("HostIp") for binding in bindings if binding.get("HostIp") != "127.0.0.1"]
        if wrong:
            raise TargetError(f"container {name}: port {port} published on {wrong[0]!r}, not 127.0.0.1")
        return int(bindings[0]["HostPort"])

    def stop(self, info: TargetInfo) -> list[str]:
        if info.backend != self.name:
            return self.local.stop(info)
        done = []
        for action, call in (
            (f"removed container {info.proxy}", (lambda: self.api.remove_container(info.proxy, force=True, v=True))
             if info.proxy else None),
            (f"removed container {info.container}", lambda: self.api.remove_container(info.container, force=True, v=True)),
            (f"disconnected {info.worker_container} from {info.network}",
             (lambda: self.api.disconnect_container_from_network(info.worker_container, info.network, force=True))
             if info.worker_container else None),
            (f"removed network {info.network}", lambda: self.api.remove_network(info.network)),
            (f"removed network {info.proxy}", (lambda: self.api.remove_network(info.proxy)) if info.proxy else None),
        ):
            if call is None:
                continue
            try:
                call()
                done.append(action)
            except Exception as exc:  # already gone: nothing to do
                log.warning("drill teardown: %s failed: %s", action, exc)
        return done

    def cleanup_leftovers(self, keep_run_id: str | None) -> list[str]:
        """Remove containers (with their anonymous volumes) and networks labelled by other drill runs."""
        removed = []
        for container in self.api.containers(all=True, filters={"label": [DRILL_LABEL]}):
            labels = container.get("Labels") or {}
            if labels.get(DRILL_LABEL) == keep_run_id:
                continue
            self.api.remove_container(container["Id"], force=True, v=True)
            removed.append(f"container {(container.get('Names') or [container['Id']])[0]} (drill {labels.get(DRILL_LABEL)})")
        for network in self.api.networks(filters={"label": [DRILL_LABEL]}):
            labels = network.get("Labels") or {}
            if labels.get(DRILL_LABEL) == keep_run_id:
                continue
            if self.worker_container:
                try:
                    self.api.disconnect_container_from_network(self.worker_container, network["Id"], force=True)
                except Exception as exc:  # not attached to this one
                    log.info("drill cleanup: %s was not on network %s (%s)", self.worker_container, network["Id"], exc)
            self.api.remove_network(network["Id"])
            removed.append(f"network {network.get('Name', network['Id'])} (drill {labels.get(DRILL_LABEL)})")
        return removed
