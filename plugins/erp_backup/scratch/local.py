"""Local scratch targets by kind: how each is made on this worker, and how it is stopped and removed.

A kind (see `erp_backup.services.base.ScratchSpec`) is one entry of `KINDS`:

- `postgres`: a created and started PostgreSQL cluster;
- `postgres_cluster`: an initdb-ready base dir owned by the cluster user, not started (PITR starts it);
- `redis`: a data dir only (the redis restore starts the server there, on the chosen port);
- `rabbitmq`: a started RabbitMQ node;
- `etcd`: a path for a new etcd data dir (`etcdctl snapshot restore` creates it; a check starts etcd);
- `s3`: a started moto S3 server, with a scratch secret;
- `milvus_lite`: a path for a milvus-lite .db file;
- `directory`: a `prepared/` path (GitLab's files for its runbook).

Every target lives in its own labelled directory under a scratch root: PostgreSQL
clusters in `erp-scratch-drill-<service>-*` with the `.erp-scratch` owner label (so
`scratch.postgres.cleanup_stale` finds them), the others in `erp-drill-<kind>-*` with
a JSON label (owner, kind, service). Leftovers are found by those labels, and their
processes stopped by pid or state file, never by process name.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erp_backup.scratch.base import HOST, ScratchError, TargetInfo, free_port
from erp_backup.scratch.etcd import stop_pid_file
from erp_backup.scratch.postgres import (
    SCRATCH_LABEL,
    ScratchPostgres,
    chown_to_cluster_user,
    cleanup_stale,
    pg_bindir,
)
from erp_backup.scratch.rabbitmq import ScratchRabbit, node_name
from erp_backup.scratch.redis import STATE_FILE_NAME as REDIS_STATE_FILE
from erp_backup.scratch.redis import ScratchRedis
from erp_backup.scratch.s3 import PID_FILE_NAME as MOTO_PID_FILE
from erp_backup.scratch.s3 import ScratchS3

log = logging.getLogger(__name__)

PG_PREFIX = "erp-scratch-drill-"  # matches scratch.postgres.cleanup_stale's erp-scratch-* glob
DIR_PREFIX = "erp-drill-"
LABEL_FILE = ".erp-drill.json"
START_TIMEOUT_S = 180.0
LOG_TAIL = 1500
# The drill's name for `postgres_cluster` until every service declares scratch_spec (and in older drill state).


@dataclass(frozen=True)
class StartOptions:
    pg_major: int | None = None
    timeout: float = START_TIMEOUT_S


@dataclass(frozen=True)
class LocalKind:
    """One kind of local scratch target.

    `address` picks what the production guard checks before anything is made (127.0.0.1 port,
    RabbitMQ node); `start` fills in the rest of the TargetInfo and starts what runs in the
    target's directory; `stop` stops it (the directory is removed after) and says what it did.
    """

    start: Callable[[TargetInfo, Path, StartOptions], None]
    stop: Callable[[TargetInfo, Path], list[str]]
    address: Callable[[TargetInfo], None] | None = None
    cluster_dir: bool = False  # a PostgreSQL cluster dir, labelled for cleanup_stale


# ───────────────────────── addresses ─────────────────────────


def _loopback_port(info: TargetInfo) -> None:
    info.host, info.port = HOST, free_port()


def _rabbit_address(info: TargetInfo) -> None:
    _loopback_port(info)
    info.node = node_name()


# ───────────────────────── start ─────────────────────────


def _start_postgres(info: TargetInfo, base: Path, options: StartOptions) -> None:
    cluster = ScratchPostgres(base, port=info.port, bindir=pg_bindir(options.pg_major))
    cluster.create()
    try:
        cluster.start(timeout=options.timeout)
    except ScratchError as exc:
        raise ScratchError(f"scratch PostgreSQL did not start: {exc} | {cluster.server_log()[-LOG_TAIL:]}") from exc


def _prepare_cluster(info: TargetInfo, base: Path, options: StartOptions) -> None:
    chown_to_cluster_user(base)


def _prepare_redis(info: TargetInfo, base: Path, options: StartOptions) -> None:
    (base / "data").mkdir(mode=0o700)  # the redis restore starts the server here, on info.port


def _start_rabbit(info: TargetInfo, base: Path, options: StartOptions) -> None:
    ScratchRabbit(base, node=info.node, port=info.port).start(options.timeout)


def _prepare_etcd(info: TargetInfo, base: Path, options: StartOptions) -> None:
    info.uri = str(base / "etcd-data")  # etcdctl snapshot restore wants a new directory


def _start_s3(info: TargetInfo, base: Path, options: StartOptions) -> None:
    info.uri, info.secret = f"http://{HOST}:{info.port}", secrets.token_hex(16)
    ScratchS3(base, port=info.port).start(options.timeout)


def _prepare_lite(info: TargetInfo, base: Path, options: StartOptions) -> None:
    info.uri = str(base / "drill.db")


def _prepare_directory(info: TargetInfo, base: Path, options: StartOptions) -> None:
    info.uri = str(base / "prepared")


# ───────────────────────── stop ─────────────────────────


def _stop_cluster(info: TargetInfo, base: Path) -> list[str]:
    cluster = ScratchPostgres.attach(base)
    running = cluster.is_running()
    cluster.stop("immediate")  # also removes its socket dir
    return [f"stopped PostgreSQL on port {cluster.port}"] if running else []


def _stop_redis(info: TargetInfo, base: Path) -> list[str]:
    if not (base / "data" / REDIS_STATE_FILE).exists():
        return []
    server = ScratchRedis.attach(base / "data")
    running = server.is_running()
    server.stop()
    return [f"stopped redis-server on port {server.port}"] if running else []


def _stop_rabbit(info: TargetInfo, base: Path) -> list[str]:
    if not (base / ScratchRabbit.STATE).exists():
        return []
    rabbit = ScratchRabbit.attach(base)
    rabbit.stop()
    return [f"stopped RabbitMQ node {rabbit.node}"]


def _stop_etcd(info: TargetInfo, base: Path) -> list[str]:
    return [f"stopped etcd ({pid_file.name})" for pid_file in base.glob("*.etcd.pid") if stop_pid_file(pid_file)]


def _stop_s3(info: TargetInfo, base: Path) -> list[str]:
    if not (base / MOTO_PID_FILE).exists():
        return []
    ScratchS3.attach(base).stop()
    return ["stopped scratch S3"]


def _stop_lite(info: TargetInfo, base: Path) -> list[str]:
    release_lite(base / "drill.db")
    return []


def _nothing_runs(info: TargetInfo, base: Path) -> list[str]:
    return []


def release_lite(path: Path) -> None:
    """Let go of the milvus-lite server this process may hold for the .db file `path`."""
    try:
        from milvus_lite import server_manager_instance

        server_manager_instance.release_server(str(path))
    except Exception as exc:  # nothing to release, or milvus-lite missing
        log.debug("milvus-lite release of %s: %s", path, exc)


KINDS: dict[str, LocalKind] = {
    "postgres": LocalKind(_start_postgres, _stop_cluster, _loopback_port, cluster_dir=True),
    "postgres_cluster": LocalKind(_prepare_cluster, _stop_cluster, _loopback_port, cluster_dir=True),
    "redis": LocalKind(_prepare_redis, _stop_redis, _loopback_port),
    "rabbitmq": LocalKind(_start_rabbit, _stop_rabbit, _rabbit_address),
    "etcd": LocalKind(_prepare_etcd, _stop_etcd),
    "s3": LocalKind(_start_s3, _stop_s3, _loopback_port),
    "milvus_lite": LocalKind(_prepare_lite, _stop_lite),
    "directory": LocalKind(_prepare_directory, _nothing_runs),
}


def release(info: TargetInfo) -> None:
    """Let go of what this process holds of a target once a step is done (an embedded milvus-lite server)."""
    if info.kind == "milvus_lite" and info.uri and not info.container:
        release_lite(Path(info.uri))


def local_kind(kind: str) -> LocalKind:
    try:
        return KINDS[kind]
    except KeyError:
        raise ScratchError(f"no local scratch target of kind {kind!r} (known: {', '.join(sorted(KINDS))})") from None


# ───────────────────────── the lifecycle ─────────────────────────


def address(kind: str, service: str, backup_type: str, owner: str) -> TargetInfo:
    """A target's TargetInfo with its address chosen, nothing made yet (so it can be checked first)."""
    info = TargetInfo(service=service, backup_type=backup_type, kind=kind, backend="local", owner=owner)
    choose = local_kind(kind).address
    if choose is not None:
        choose(info)
    return info


def create(info: TargetInfo, root: Path, *, pg_major: int | None = None, timeout: float = START_TIMEOUT_S) -> TargetInfo:
    """Make the target's labelled directory under `root` and start it there. A failed start leaves nothing."""
    kind = local_kind(info.kind)
    if kind.cluster_dir:
        base = _new_cluster_dir(root, info.service, info.owner)
    else:
        base = _new_dir(root, info.kind, info.owner, info.service)
    info.base_dir = str(base)
    try:
        kind.start(info, base, StartOptions(pg_major=pg_major, timeout=timeout))
    except BaseException:
        try:
            remove(info)
        except Exception as cleanup:  # the start's own error is the one to report
            log.warning("could not remove the half-started scratch target %s: %s", base, cleanup)
        raise
    return info


def remove(info: TargetInfo) -> list[str]:
    """Stop whatever runs for `info` and remove its directory. Returns what was done."""
    if not info.base_dir:
        return []
    base = Path(info.base_dir)
    kind = KINDS.get(info.kind)
    if kind is None:
        log.warning("scratch target %s has unknown kind %r: removing its directory only", base, info.kind)
    done = kind.stop(info, base) if kind else []
    if base.exists():
        shutil.rmtree(base, ignore_errors=True)
        done.append(f"removed {base}")
    return done


def cleanup_leftovers(root: Path, owner_prefix: str, keep_owner: str | None) -> list[str]:
    """Stop and remove targets under `root` whose owner starts with `owner_prefix`, except `keep_owner`'s."""
    removed = [f"PostgreSQL {path}" for path in cleanup_stale(owner_prefix, keep_owner=keep_owner, root=root)]
    for base in sorted(root.glob(f"{DIR_PREFIX}*")):
        label = read_label(base)
        owner = str(label.get("owner", "")) if label else ""
        if label is None or not owner.startswith(owner_prefix) or owner == keep_owner:
            continue
        log.warning("removing leftover scratch target %s (owner %s, kind %s)", base, owner, label.get("kind"))
        remove(TargetInfo(str(label.get("service", "")), "", str(label.get("kind")), "local", owner, base_dir=str(base)))
        removed.append(f"{label.get('kind')} {base}")
    return removed


def owned_targets(root: Path, owner: str, service: str) -> list[TargetInfo]:
    """Targets of one owner and service that exist under `root` (for a teardown whose setup crashed)."""
    found = []
    for base in sorted(root.glob(f"{PG_PREFIX}{service}-*")):
        try:
            if (base / SCRATCH_LABEL).read_text().strip() == owner:
                found.append(TargetInfo(service, "", "postgres", "local", owner, base_dir=str(base)))
        except OSError:
            continue
    for base in sorted(root.glob(f"{DIR_PREFIX}*")):
        label = read_label(base)
        if label and label.get("owner") == owner and label.get("service") == service:
            found.append(TargetInfo(service, "", str(label.get("kind")), "local", owner, base_dir=str(base)))
    return found


# ───────────────────────── labelled directories ─────────────────────────


def _new_cluster_dir(root: Path, service: str, owner: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=f"{PG_PREFIX}{service}-", dir=root))
    os.chmod(base, 0o755)
    (base / SCRATCH_LABEL).write_text(owner + "\n")
    return base


def _new_dir(root: Path, kind: str, owner: str, service: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{kind}-", dir=root))
    os.chmod(base, 0o755)
    label = {"owner": owner, "kind": kind, "service": service, "created": time.time()}
    (base / LABEL_FILE).write_text(json.dumps(label) + "\n")
    return base


def read_label(path: Path) -> dict[str, Any] | None:
    try:
        label = json.loads((path / LABEL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return label if isinstance(label, dict) else None
