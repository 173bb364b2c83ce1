"""Scratch restore targets for DR drills, and the guard that keeps drills off production.

Two backends build a throwaway target for a (service, backup type):

- `LocalBackend`: processes on 127.0.0.1 under one scratch root per backup root:
  a PostgreSQL cluster (`scratch_pg`), a redis-server dir (`scratch_redis`, started
  by the redis restore itself on a port chosen here), a RabbitMQ node (`ScratchRabbit`),
  a fresh milvus-lite file, a new etcd data dir (started by verify with `scratch_etcd`),
  a moto S3 server for MinIO, and a plain directory for GitLab's prepared files.
- `DockerBackend`: a container of the matching image and major version on an
  internal Docker network created per drill, ports published on 127.0.0.1 only,
  labelled `erp-backup.drill=<run_id>`. Redis, etcd and GitLab have no container
  target (their restores start a local server or only prepare files); they fall
  back to the local backend.

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
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from erp_backup.plan import Plan
from erp_backup.scratch_pg import (
    SCRATCH_LABEL,
    ScratchError,
    ScratchPostgres,
    chown_to_cluster_user,
    cleanup_stale,
    free_port,
    pg_bindir,
    scratch_root,
)

log = logging.getLogger(__name__)

DRILL_LABEL = "erp-backup.drill"
SERVICE_LABEL = "erp-backup.drill.service"
OWNER_PREFIX = "drill:"
LABEL_FILE = ".erp-drill.json"
PG_PREFIX = "erp-scratch-drill-"  # matches scratch_pg.cleanup_stale's erp-scratch-* glob
DIR_PREFIX = "erp-drill-"
START_TIMEOUT_S = 180.0
DOCKER_CONN_ENV = "ERP_DRILL_DOCKER_CONN_ID"
DOCKER_URL_ENV = "ERP_DRILL_DOCKER_URL"
WORKER_CONTAINER_ENV = "ERP_DRILL_WORKER_CONTAINER"
RABBITMQ_LIBDIR = Path("/usr/lib/rabbitmq/bin")
LOG_TAIL = 1500

DEFAULT_PORTS = {"postgres": 5432, "redis": 6379, "rabbitmq": 5672, "milvus": 19530, "minio": 9000, "gitlab": 443}
ROLE_PORTS = {"etcd": 2379}
_LOOPBACK_NAMES = frozenset({"", "localhost", "ip6-localhost", "ip6-loopback", "0.0.0.0", "::"})


class TargetError(RuntimeError):
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


# ───────────────────────── what a target is ─────────────────────────


@dataclass
class TargetInfo:
    """A started scratch target: enough to restore into it, check it and remove it, from any process."""

    service: str
    backup_type: str
    kind: str  # postgres | postgres_pitr | redis | rabbitmq | milvus_lite | milvus | etcd | s3 | directory
    backend: str  # local | docker
    owner: str
    host: str | None = None
    port: int | None = None
    base_dir: str | None = None
    uri: str | None = None
    node: str | None = None
    image: str | None = None
    container: str | None = None
    network: str | None = None
    worker_container: str | None = None
    docker_conn_id: str | None = None
    secret: str | None = field(default=None, repr=False)  # scratch-only password (Docker targets)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetInfo:
        return cls(**{key: data.get(key) for key in cls.__dataclass_fields__ if key in data})

    def describe(self) -> str:
        """Where it is, without secrets."""
        where = {
            "postgres": f"PostgreSQL {self.host}:{self.port}",
            "postgres_pitr": f"PostgreSQL (PITR) 127.0.0.1:{self.port}",
            "redis": f"redis-server {self.host}:{self.port}",
            "rabbitmq": f"RabbitMQ node {self.node or self.container} (AMQP {self.host}:{self.port})",
            "milvus_lite": f"milvus-lite {self.uri}",
            "milvus": f"Milvus {self.uri}",
            "etcd": f"etcd data dir {self.uri}",
            "s3": f"S3 endpoint {self.uri}",
            "directory": f"directory {self.uri}",
        }.get(self.kind, self.kind)
        if self.container:
            where += f" in container {self.container} ({self.image}, network {self.network})"
        return f"{where} [{self.backend}]"

    @property
    def pg_conninfo(self) -> str:
        password = f" password={self.secret}" if self.secret else ""
        return f"host={self.host} port={self.port} user=postgres dbname=postgres{password}"

    def restore_target(self) -> Any:
        """What the service module's restore() takes as `target`."""
        if self.kind == "postgres":
            return self.pg_conninfo
        if self.kind == "postgres_pitr":
            assert self.base_dir
            return ScratchPostgres(Path(self.base_dir), port=self.port, bindir=pg_bindir())
        if self.kind == "redis":
            from erp_backup.scratch_redis import ScratchRedis

            assert self.base_dir
            return ScratchRedis(dir=Path(self.base_dir) / "data", host=self.host or "127.0.0.1", port=self.port)
        if self.kind == "rabbitmq":
            from erp_backup.services.rabbitmq import RabbitEndpoint

            if self.container:  # the management API of the container (no docker exec needed)
                return RabbitEndpoint(mode="http", host=self.host or "127.0.0.1", port=self.port,
                                      management_url=f"http://{self.host}:{self.port}", login="drill", password=self.secret)
            return RabbitEndpoint(mode="rabbitmqctl", host="127.0.0.1", port=self.port, node=self.node)
        if self.kind in ("milvus_lite", "milvus", "etcd"):
            return self.uri
        if self.kind == "s3":  # erp_backup.services.minio.RestoreTarget fields, without the bucket
            return {"endpoint_url": self.uri, "access_key": "drill", "secret_key": self.secret or "drill",
                    "region": "us-east-1", "create_bucket": True}
        if self.kind == "directory":
            assert self.uri
            return Path(self.uri)
        raise TargetError(f"unknown target kind {self.kind!r}")


def target_kind(service: str, backup_type: str, pitr: bool = False) -> str:
    if service == "postgres":
        return "postgres_pitr" if pitr else "postgres"
    if service == "milvus":
        return "etcd" if backup_type == "etcd" else "milvus_lite"
    return {"redis": "redis", "rabbitmq": "rabbitmq", "minio": "s3", "gitlab": "directory"}[service]


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
            address = info[4][0]
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
        ports: dict[str, int | None] = {}
        for job in plan.jobs:
            for role, conn_id in job.connections.items():
                ports.setdefault(conn_id, ROLE_PORTS.get(role) or DEFAULT_PORTS.get(job.service))
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


# ───────────────────────── labelled scratch dirs ─────────────────────────


def _new_dir(root: Path, prefix: str, owner: str, kind: str, service: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    os.chmod(base, 0o755)
    label = {"owner": owner, "kind": kind, "service": service, "created": time.time()}
    (base / LABEL_FILE).write_text(json.dumps(label) + "\n")
    return base


def _read_label(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / LABEL_FILE).read_text())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_pid(pid: int, must_contain: str, timeout: float = 20.0) -> bool:
    """SIGTERM (then SIGKILL) `pid` if its command line contains `must_contain`; a recycled pid is left alone."""
    if not must_contain or must_contain not in _cmdline(pid):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and must_contain in _cmdline(pid):
        time.sleep(0.1)
    if must_contain in _cmdline(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


def _wait_tcp(host: str, port: int, timeout: float, what: str, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as exc:
            if not alive():
                raise TargetError(f"{what} exited before it listened on {host}:{port}") from exc
            if time.monotonic() > deadline:
                raise TargetError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s: {exc}") from exc
        time.sleep(0.2)


# ───────────────────────── scratch RabbitMQ node ─────────────────────────


class ScratchRabbit:
    """A RabbitMQ node of its own (own name, ports, mnesia and logs) on 127.0.0.1, no plugins.

    Started from the rabbitmq-server package's scripts; as root it runs as the
    `rabbitmq` OS user (sharing that user's Erlang cookie, so `rabbitmqctl --node`
    reaches it). The state file lets another process stop it.
    """

    STATE = "scratch-rabbit.json"

    def __init__(self, base_dir: Path, node: str | None = None, port: int | None = None, dist_port: int | None = None):
        self.base_dir = Path(base_dir)
        self.node = node or f"erpdrill{secrets.token_hex(4)}@localhost"
        self.port = port or free_port()
        self.dist_port = dist_port or free_port()

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "rabbit.pid"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "startup.log"

    def _env(self) -> dict[str, str]:
        home = "/var/lib/rabbitmq" if os.geteuid() == 0 else str(self.base_dir)
        return {
            "HOME": home,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base_dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base_dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CONFIG_FILE": str(self.base_dir / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base_dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base_dir / "rabbitmq-env.conf"),
        }

    def _argv(self, script: str, *args: str) -> list[str]:
        env = [f"{key}={value}" for key, value in self._env().items()]
        binary = RABBITMQ_LIBDIR / script
        argv = ["env", *env, str(binary if binary.exists() else script), *args]
        return ["runuser", "-u", "rabbitmq", "--", *argv] if os.geteuid() == 0 else argv

    def _chown(self) -> None:
        if os.geteuid() != 0:
            return
        entry = pwd.getpwnam("rabbitmq")
        for root, dirs, files in os.walk(self.base_dir):
            os.chown(root, entry.pw_uid, entry.pw_gid)
            for name in files:
                os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)

    def start(self, timeout: float = START_TIMEOUT_S) -> ScratchRabbit:
        (self.base_dir / "enabled_plugins").write_text("[].\n")
        self._chown()
        log.info("starting scratch RabbitMQ node %s on 127.0.0.1:%d (%s)", self.node, self.port, self.base_dir)
        with open(self.log_file, "ab") as out:
            try:
                process = subprocess.Popen(
                    self._argv("rabbitmq-server"), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                raise TargetError("rabbitmq-server is not installed on this worker (Debian package rabbitmq-server)") from exc
        (self.base_dir / self.STATE).write_text(json.dumps(
            {"node": self.node, "port": self.port, "dist_port": self.dist_port, "launcher_pid": process.pid}
        ))
        done = subprocess.run(
            self._argv("rabbitmqctl", "--node", self.node, "wait", "--timeout", str(int(timeout)), str(self.pid_file)),
            capture_output=True, text=True, timeout=timeout + 30,
        )
        if done.returncode != 0:
            tail = self.log_file.read_text(errors="replace")[-LOG_TAIL:] if self.log_file.exists() else ""
            self.stop()
            raise TargetError(f"scratch RabbitMQ node {self.node} did not start: {done.stderr.strip()[-LOG_TAIL:]} {tail}")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        pid = _read_pid(self.pid_file)
        if pid is not None and self.node in _cmdline(pid):
            subprocess.run(
                self._argv("rabbitmqctl", "--node", self.node, "stop", str(self.pid_file)),
                capture_output=True, timeout=timeout,
            )
            _stop_pid(pid, self.node)
        try:
            launcher = json.loads((self.base_dir / self.STATE).read_text()).get("launcher_pid")
        except (OSError, ValueError):
            launcher = None
        if launcher:
            try:
                os.killpg(launcher, signal.SIGKILL)  # the launcher's session: runuser and the scripts
            except (ProcessLookupError, PermissionError):
                pass

    @classmethod
    def attach(cls, base_dir: Path) -> ScratchRabbit:
        state = json.loads((Path(base_dir) / cls.STATE).read_text())
        return cls(Path(base_dir), node=state["node"], port=state["port"], dist_port=state["dist_port"])


# ───────────────────────── scratch S3 (moto) ─────────────────────────


class ScratchS3:
    """A moto S3 server subprocess on 127.0.0.1 (stands in for MinIO), stopped by pid."""

    def __init__(self, base_dir: Path, port: int | None = None):
        self.base_dir = Path(base_dir)
        self.port = port or free_port()

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "moto.pid"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ScratchS3:
        with open(self.base_dir / "moto.log", "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid_file.write_text(f"{process.pid}\n{self.port}\n")
        _wait_tcp("127.0.0.1", self.port, timeout, "scratch S3 (moto)", alive=lambda: process.poll() is None)
        return self

    def stop(self) -> None:
        pid = _read_pid(self.pid_file)
        if pid is not None:
            _stop_pid(pid, "moto.server")
        self.pid_file.unlink(missing_ok=True)


# ───────────────────────── backends ─────────────────────────


class LocalBackend:
    """Scratch processes and directories on this worker, 127.0.0.1 only."""

    name = "local"

    def __init__(self, root: Path, guard: ProductionGuard):
        self.root, self.guard = Path(root), guard

    def start(self, service: str, backup_type: str, owner: str, *, pg_major: int | None = None,
              pitr: bool = False, timeout: float = START_TIMEOUT_S) -> TargetInfo:
        """Start (or prepare) the target. Its address is checked against production before anything is created."""
        kind = target_kind(service, backup_type, pitr)
        info = TargetInfo(service=service, backup_type=backup_type, kind=kind, backend=self.name, owner=owner)
        if kind in ("postgres", "postgres_pitr", "redis", "rabbitmq", "s3"):
            info.host, info.port = "127.0.0.1", free_port()
        if kind == "rabbitmq":
            info.node = f"erpdrill{secrets.token_hex(4)}@localhost"
        self.guard.check(info)

        if kind in ("postgres", "postgres_pitr"):
            base = Path(tempfile.mkdtemp(prefix=f"{PG_PREFIX}{service}-", dir=self.root))
            os.chmod(base, 0o755)
            (base / SCRATCH_LABEL).write_text(owner + "\n")
            info.base_dir = str(base)
            cluster = ScratchPostgres(base, port=info.port, bindir=pg_bindir(pg_major))
            if kind == "postgres":
                cluster.create()
                try:
                    cluster.start(timeout=timeout)
                except ScratchError as exc:
                    raise TargetError(f"scratch PostgreSQL did not start: {exc} | {cluster.server_log()[-LOG_TAIL:]}") from exc
            else:
                chown_to_cluster_user(base)
            return info

        base = _new_dir(self.root, f"{DIR_PREFIX}{kind}-", owner, kind, service)
        info.base_dir = str(base)
        if kind == "redis":
            (base / "data").mkdir(mode=0o700)  # the redis restore starts the server here, on info.port
        elif kind == "rabbitmq":
            ScratchRabbit(base, node=info.node, port=info.port).start(timeout)
        elif kind == "milvus_lite":
            info.uri = str(base / "drill.db")
        elif kind == "etcd":
            info.uri = str(base / "etcd-data")  # etcdctl snapshot restore wants a new directory
        elif kind == "s3":
            info.uri, info.secret = f"http://127.0.0.1:{info.port}", secrets.token_hex(16)
            ScratchS3(base, port=info.port).start(timeout)
        elif kind == "directory":
            info.uri = str(base / "prepared")
        self.guard.check(info)  # paths (milvus-lite files) are known only now
        return info

    def stop(self, info: TargetInfo) -> list[str]:
        """Stop whatever runs for `info` and remove its directory. Returns what was done."""
        done: list[str] = []
        if not info.base_dir:
            return done
        base = Path(info.base_dir)
        if info.kind in ("postgres", "postgres_pitr"):
            cluster = ScratchPostgres(base, port=info.port or 0, bindir=pg_bindir())
            if cluster.is_running():
                cluster.stop("immediate")
                done.append(f"stopped PostgreSQL on port {info.port}")
        else:
            done += _stop_dir_processes(base, info.kind)
        if base.exists():
            shutil.rmtree(base, ignore_errors=True)
            done.append(f"removed {base}")
        return done

    def cleanup_leftovers(self, keep_owner: str | None) -> list[str]:
        """Stop and remove targets of other drill runs (crashed or kept), found by their labels."""
        removed = [f"PostgreSQL {path}" for path in cleanup_stale(OWNER_PREFIX, keep_owner=keep_owner, root=self.root)]
        for base in sorted(self.root.glob(f"{DIR_PREFIX}*")):
            label = _read_label(base)
            if label is None or not str(label.get("owner", "")).startswith(OWNER_PREFIX) or label["owner"] == keep_owner:
                continue
            log.warning("removing leftover drill target %s (owner %s, kind %s)", base, label["owner"], label.get("kind"))
            _stop_dir_processes(base, str(label.get("kind")))
            shutil.rmtree(base, ignore_errors=True)
            removed.append(f"{label.get('kind')} {base}")
        return removed

    def run_leftovers(self, owner: str, service: str) -> list[TargetInfo]:
        """Targets of one run and service that exist on disk (for a teardown whose setup crashed)."""
        found = []
        for base in sorted(self.root.glob(f"{PG_PREFIX}{service}-*")):
            try:
                if (base / SCRATCH_LABEL).read_text().strip() == owner:
                    found.append(TargetInfo(service, "", "postgres", self.name, owner, base_dir=str(base)))
            except OSError:
                continue
        for base in sorted(self.root.glob(f"{DIR_PREFIX}*")):
            label = _read_label(base)
            if label and label.get("owner") == owner and label.get("service") == service:
                found.append(TargetInfo(service, "", str(label.get("kind")), self.name, owner, base_dir=str(base)))
        return found


def _stop_dir_processes(base: Path, kind: str) -> list[str]:
    done = []
    if kind == "redis":
        from erp_backup.scratch_redis import STATE_FILE_NAME, ScratchRedis

        if (base / "data" / STATE_FILE_NAME).exists():
            server = ScratchRedis.attach(base / "data")
            if server.is_running():
                server.stop()
                done.append(f"stopped redis-server on port {server.port}")
    elif kind == "rabbitmq":
        if (base / ScratchRabbit.STATE).exists():
            rabbit = ScratchRabbit.attach(base)
            rabbit.stop()
            done.append(f"stopped RabbitMQ node {rabbit.node}")
    elif kind == "etcd":
        from erp_backup.scratch_etcd import stop_pid_file

        for pid_file in base.glob("*.etcd.pid"):
            if stop_pid_file(pid_file):
                done.append(f"stopped etcd ({pid_file.name})")
    elif kind == "s3":
        pid_file = base / "moto.pid"
        if pid_file.exists():
            ScratchS3(base, port=int(pid_file.read_text().split()[1])).stop()
            done.append("stopped scratch S3")
    elif kind == "milvus_lite":
        _release_lite(base / "drill.db")
    return done


def _release_lite(path: Path) -> None:
    try:
        from milvus_lite import server_manager_instance

        server_manager_instance.release_server(str(path))
    except Exception as exc:  # nothing to release, or milvus-lite missing
        log.debug("milvus-lite release of %s: %s", path, exc)


# ───────────────────────── Docker ─────────────────────────


@dataclass(frozen=True)
class ContainerSpec:
    image: str
    port: int
    environment: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] | None = None


def _major_minor(version: str | None, parts: int) -> str | None:
    if not version:
        return None
    match = re.search(r"\d+(?:\.\d+){0,%d}" % (parts - 1), str(version))
    return match.group(0) if match else None


def container_spec(kind: str, versions: dict[str, Any], secret: str) -> ContainerSpec | None:
    """The image (matching the backed-up major version) and settings of a scratch container. Pure.

    None: this kind has no container target (it runs on the local backend).
    """
    if kind == "postgres":
        major = versions.get("postgres_major") or 15
        return ContainerSpec(f"postgres:{major}", 5432, {"POSTGRES_PASSWORD": secret})
    if kind == "rabbitmq":  # definitions go in and out through the management API
        return ContainerSpec(f"rabbitmq:{_major_minor(versions.get('rabbitmq'), 2) or '3.10'}-management", 15672,
                             {"RABBITMQ_DEFAULT_USER": "drill", "RABBITMQ_DEFAULT_PASS": secret})
    if kind == "milvus_lite":
        version = _major_minor(versions.get("milvus"), 3) or "2.5.4"
        return ContainerSpec(
            f"milvusdb/milvus:v{version}", 19530,
            {"ETCD_USE_EMBED": "true", "ETCD_DATA_DIR": "/var/lib/milvus/etcd", "COMMON_STORAGETYPE": "local"},
            ("milvus", "run", "standalone"),
        )
    if kind == "s3":
        return ContainerSpec("minio/minio:latest", 9000, {"MINIO_ROOT_USER": "drill", "MINIO_ROOT_PASSWORD": secret},
                             ("server", "/data"))
    return None


def _split_image(image: str) -> tuple[str, str]:
    repository, _, tag = image.rpartition(":")
    if not repository or "/" in tag:
        return image, "latest"
    return repository, tag


def _tcp_ready(info: TargetInfo, timeout: float = START_TIMEOUT_S) -> None:
    assert info.host and info.port
    _wait_tcp(info.host, info.port, timeout, f"container {info.container}")
    if info.kind == "postgres":
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(info.pg_conninfo, connect_timeout=5):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise TargetError(f"PostgreSQL in {info.container} did not accept connections: {exc}") from exc
                time.sleep(0.5)


class DockerBackend:
    """Scratch containers through the Docker API (`docker.APIClient`, e.g. from the Docker provider's hook).

    Each target gets its own internal network (`internal=True`: no route to
    production or anywhere else) and publishes its port on 127.0.0.1 only. When the
    worker itself runs in a container (`$ERP_DRILL_WORKER_CONTAINER`), that container
    joins the drill network and reaches the target by name instead.
    """

    name = "docker"

    def __init__(self, api: Any, guard: ProductionGuard, local: LocalBackend, *, worker_container: str | None = None,
                 docker_conn_id: str | None = None, ready: Callable[[TargetInfo], None] = _tcp_ready):
        self.api, self.guard, self.local = api, guard, local
        self.worker_container, self.docker_conn_id, self.ready = worker_container, docker_conn_id, ready

    @classmethod
    def from_env(cls, guard: ProductionGuard, local: LocalBackend) -> DockerBackend:
        from erp_backup.runner import docker_api

        conn_id = os.environ.get(DOCKER_CONN_ENV) or None
        url = os.environ.get(DOCKER_URL_ENV) or "unix:///var/run/docker.sock"
        return cls(docker_api(conn_id, url), guard, local, worker_container=os.environ.get(WORKER_CONTAINER_ENV) or None,
                   docker_conn_id=conn_id)

    def start(self, service: str, backup_type: str, owner: str, *, run_id: str, versions: dict[str, Any],
              pitr: bool = False, pg_major: int | None = None, timeout: float = START_TIMEOUT_S) -> TargetInfo:
        kind = target_kind(service, backup_type, pitr)
        secret = secrets.token_hex(16)
        spec = None if pitr else container_spec(kind, versions, secret)
        if spec is None:
            log.info("%s/%s has no container target; using the local backend", service, backup_type)
            return self.local.start(service, backup_type, owner, pg_major=pg_major, pitr=pitr, timeout=timeout)

        name = f"erp-drill-{slug(run_id, 40)}-{service}"
        labels = {DRILL_LABEL: run_id, SERVICE_LABEL: service}
        info = TargetInfo(service=service, backup_type=backup_type, kind="milvus" if kind == "milvus_lite" else kind,
                          backend=self.name, owner=owner, image=spec.image, container=name, network=name,
                          docker_conn_id=self.docker_conn_id, secret=secret)
        log.info("drill %s: creating internal network %s and container %s (%s)", run_id, name, name, spec.image)
        self.api.create_network(name, driver="bridge", internal=True, labels=labels, check_duplicate=True)
        try:
            self._run_container(info, spec, labels)
            self.guard.check(info)
            self.ready(info)
        except BaseException:
            self.stop(info)  # nothing half-started stays behind
            raise
        return info

    def _run_container(self, info: TargetInfo, spec: ContainerSpec, labels: dict[str, str]) -> None:
        name = info.container
        assert name
        repository, tag = _split_image(spec.image)
        self.api.pull(repository, tag=tag)
        host_config = self.api.create_host_config(port_bindings={spec.port: ("127.0.0.1", None)}, network_mode=name)
        self.api.create_container(
            image=spec.image, name=name, labels=labels, environment=spec.environment,
            command=list(spec.command) if spec.command else None, ports=[spec.port], host_config=host_config, detach=True,
        )
        self.api.start(name)
        if self.worker_container:
            self.api.connect_container_to_network(self.worker_container, name)
            info.worker_container = self.worker_container
            info.host, info.port = name, spec.port
        else:
            bindings = self.api.port(name, spec.port) or []
            if not bindings:
                raise TargetError(f"container {name}: port {spec.port} was not published on 127.0.0.1")
            binding = bindings[0]
            if binding.get("HostIp") != "127.0.0.1":
                raise TargetError(f"container {name}: port {spec.port} published on {binding.get('HostIp')!r}, not 127.0.0.1")
            info.host, info.port = "127.0.0.1", int(binding["HostPort"])
        if info.kind in ("milvus", "s3"):
            info.uri = f"http://{info.host}:{info.port}"

    def stop(self, info: TargetInfo) -> list[str]:
        if info.backend != self.name:
            return self.local.stop(info)
        done = []
        for action, call in (
            (f"removed container {info.container}", lambda: self.api.remove_container(info.container, force=True, v=True)),
            (f"disconnected {info.worker_container} from {info.network}",
             (lambda: self.api.disconnect_container_from_network(info.worker_container, info.network, force=True))
             if info.worker_container else None),
            (f"removed network {info.network}", lambda: self.api.remove_network(info.network)),
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
        """Remove containers and networks labelled by other drill runs."""
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
                except Exception:
                    pass
            self.api.remove_network(network["Id"])
            removed.append(f"network {network.get('Name', network['Id'])} (drill {labels.get(DRILL_LABEL)})")
        return removed
