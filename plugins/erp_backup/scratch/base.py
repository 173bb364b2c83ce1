"""The scratch-server protocol, the process helpers every scratch server shares, and `TargetInfo`.

A scratch server is a throwaway server process on 127.0.0.1 that a restore check or a
DR drill starts, uses and removes. Each one (`postgres`, `redis`, `etcd`, `rabbitmq`,
`s3`) follows `ScratchServer`: `start(timeout)`, `stop()`, `is_running()`, and
`attach(directory)` to get a handle on a server another process started in
`directory` (from its pid or state file), so that process can stop it.

Processes are stopped by pid, and only after their command line shows they are still
the server we started (a recycled pid is never signalled), never by process name.
Unix sockets go to a short private directory under /tmp (`private_socket_dir`), as a
socket path is limited to 107 bytes and scratch roots can be deep.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SCRATCH_ROOT_ENV = "ERP_SCRATCH_ROOT"
SOCKET_PARENT = Path("/tmp")
SOCKET_PREFIX = "erp-s-"
LOG_TAIL = 1500


class ScratchError(RuntimeError):
    """A scratch server could not be started, reached or stopped. The message says which and why."""


@runtime_checkable
class ScratchServer(Protocol):
    """What every scratch server does. `start` returns the started server itself."""

    def start(self, timeout: float = ...) -> Self: ...

    def stop(self) -> None: ...

    def is_running(self) -> bool: ...

    @classmethod
    def attach(cls, directory: Path) -> Self: ...


# ───────────────────────── places ─────────────────────────


def free_port(host: str = HOST) -> int:
    """A port the kernel just handed out on `host` (another process may still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def scratch_root() -> Path:
    """Where scratch servers keep their directories: $ERP_SCRATCH_ROOT, else the temp dir."""
    root = Path(os.environ.get(SCRATCH_ROOT_ENV) or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return root


def chown_tree(path: Path, user: str) -> None:
    """Give `path` and everything under it to the OS user `user`."""
    entry = pwd.getpwnam(user)
    for root, _dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def private_socket_dir(user: str | None = None) -> Path:
    """A new 0700 directory for a server's unix socket, short enough for any socket path."""
    parent = SOCKET_PARENT if SOCKET_PARENT.is_dir() else None
    path = Path(tempfile.mkdtemp(prefix=SOCKET_PREFIX, dir=parent))
    os.chmod(path, 0o700)
    if user:
        chown_tree(path, user)
    return path


def remove_socket_dir(path: Path | str | None) -> None:
    """Remove a directory made by `private_socket_dir` (anything else is left alone)."""
    if path and Path(path).name.startswith(SOCKET_PREFIX):
        shutil.rmtree(path, ignore_errors=True)


def log_tail(path: Path, limit: int = LOG_TAIL) -> str:
    """The end of a server's log file, for error messages."""
    try:
        return path.read_text(errors="replace")[-limit:].strip() or "(empty log)"
    except OSError:
        return "(no log)"


# ───────────────────────── processes ─────────────────────────


def process_argv(pid: int) -> list[str]:
    """The command line of a live process; [] when it is gone or a zombie (its cmdline is empty)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def process_environ(pid: int) -> dict[str, str]:
    """The environment a live process started with; {} when it is gone or not ours to read."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (part.decode(errors="replace").partition("=") for part in raw.split(b"\0") if part)
    return {key: value for key, _, value in pairs}


def read_pid(pid_file: Path) -> int | None:
    """The pid on the first line of a pid file; None when there is no readable one."""
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop_pid(pid: int, is_ours: Callable[[list[str]], bool], timeout: float = 20.0) -> bool:
    """SIGTERM `pid` (SIGKILL after `timeout`) if `is_ours(its argv)`; a recycled pid is left alone.

    Returns True if the process was ours and has been signalled.
    """
    def ours() -> bool:
        argv = process_argv(pid)
        return bool(argv) and is_ours(argv)

    if not ours():
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while ours():
        if time.monotonic() > deadline:
            log.warning("pid %d ignored SIGTERM for %.0f s; killing it", pid, timeout)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.05)
    return True


def wait_tcp(host: str, port: int, timeout: float, what: str, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until `host:port` accepts a TCP connection; raise ScratchError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as exc:
            if not alive():
                raise ScratchError(f"{what} exited before it listened on {host}:{port}") from exc
            if time.monotonic() > deadline:
                raise ScratchError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s: {exc}") from exc
        time.sleep(0.2)


# ───────────────────────── what a target is ─────────────────────────


@dataclass
class TargetInfo:
    """A started scratch target: enough to restore into it, check it and remove it, from any process."""

    service: str
    backup_type: str
    kind: str  # postgres | postgres_cluster | redis | rabbitmq | milvus_lite | etcd | s3 | directory
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
    proxy: str | None = None  # the docker backend's port forwarder: container and network of that name
    docker_conn_id: str | None = None
    secret: str | None = field(default=None, repr=False)  # scratch-only password

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetInfo:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    def describe(self) -> str:
        """Where it is, without secrets."""
        where = {
            "postgres": f"PostgreSQL {self.host}:{self.port}",
            "postgres_cluster": f"PostgreSQL cluster, not started (PITR) 127.0.0.1:{self.port}",
            "redis": f"redis-server {self.host}:{self.port}",
            "rabbitmq": f"RabbitMQ node {self.node or self.container} (AMQP {self.host}:{self.port})",
            "milvus_lite": f"Milvus {self.uri}" if self.container else f"milvus-lite {self.uri}",
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


def wait_http(host: str, port: int, timeout: float, what: str) -> None:
    """Wait until host:port answers HTTP (any status). Through Docker's docker-proxy a published
    port accepts TCP connections before the server in the container listens, and resets them."""
    import http.client

    deadline = time.monotonic() + timeout
    while True:
        connection = http.client.HTTPConnection(host, port, timeout=5)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            return
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() > deadline:
                raise ScratchError(f"{what} did not answer HTTP on {host}:{port}: {exc!r}") from exc
            time.sleep(0.5)
        finally:
            connection.close()


def wait_ready(info: TargetInfo, timeout: float) -> None:
    """Wait until a started server answers: its TCP port, and for PostgreSQL a real login. A container
    target of another kind (a management API, S3, Milvus) must answer HTTP: see `wait_http`."""
    if not (info.host and info.port):
        raise ScratchError(f"{info.describe()} has no address to wait for")
    wait_tcp(info.host, info.port, timeout, info.describe())
    if info.kind != "postgres":
        if info.container:
            wait_http(info.host, info.port, timeout, info.describe())
        return
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(info.pg_conninfo, connect_timeout=5):
                return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise ScratchError(f"{info.describe()} did not accept connections: {exc}") from exc
            time.sleep(0.5)
