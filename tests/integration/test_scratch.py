"""Scratch servers for real: every kind of local target made, used and removed, with nothing left running.

Processes are checked by pid (their /proc command line), and by a scan for any process
whose command line names the scratch root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from erp_backup.drill.targets import LocalBackend, ProductionEndpoint, ProductionGuard, ProductionTargetRefused
from erp_backup.scratch import local as scratch_local
from erp_backup.scratch.base import SCRATCH_ROOT_ENV, ScratchError, TargetInfo, process_argv, read_pid, scratch_root
from erp_backup.scratch.etcd import ScratchEtcd, start_scratch_etcd, stop_pid_file
from erp_backup.scratch.postgres import ScratchPostgres
from erp_backup.scratch.rabbitmq import ScratchRabbit
from erp_backup.scratch.redis import ScratchRedis
from erp_backup.scratch.s3 import ScratchS3

pytestmark = pytest.mark.integration

OWNER = "drill:manual__scratch-test"


@pytest.fixture
def root() -> Iterator[Path]:
    """A scratch root the postgres and rabbitmq OS users can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="erp-scratch-test-", dir=scratch_root()))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def running(pid: int | None, marker: str) -> bool:
    """True while `pid` is alive and its command line contains `marker`."""
    return pid is not None and marker in " ".join(process_argv(pid))


def processes_naming(path: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and str(path) in " ".join(process_argv(int(proc.name))):
            found.append(f"{proc.name}: {' '.join(process_argv(int(proc.name)))}")
    return found


def listens(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


# ───────────── every kind: what it gives, and what remove() leaves (nothing) ─────────────


def _use_postgres(info: TargetInfo) -> tuple[int | None, str]:
    with psycopg.connect(info.pg_conninfo, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    cluster = ScratchPostgres.attach(Path(info.base_dir or ""))
    assert cluster.port == info.port and cluster.socket_dir and cluster.socket_dir.is_dir()
    return read_pid(cluster.data_dir / "postmaster.pid"), str(cluster.data_dir)


def _use_cluster(info: TargetInfo) -> tuple[int | None, str]:
    base = Path(info.base_dir or "")
    if os.geteuid() == 0:  # initdb-ready: the cluster user owns it
        assert base.stat().st_uid == pwd.getpwnam("postgres").pw_uid
    assert not (base / "data").exists() and not ScratchPostgres.attach(base).is_running()
    return None, ""


def _use_redis(info: TargetInfo) -> tuple[int | None, str]:
    data = Path(info.base_dir or "") / "data"
    assert data.is_dir() and data.stat().st_mode & 0o777 == 0o700
    server = ScratchRedis(dir=data, port=info.port).start()  # as the redis restore does
    assert listens("127.0.0.1", server.port or 0)
    return server.pid, "redis-server"


def _use_rabbit(info: TargetInfo) -> tuple[int | None, str]:
    rabbit = ScratchRabbit.attach(Path(info.base_dir or ""))
    assert rabbit.node == info.node and rabbit.is_running() and listens("127.0.0.1", info.port or 0)
    return read_pid(rabbit.pid_file), "beam.smp"  # the node name is in its environment, not its argv


def _use_etcd(info: TargetInfo) -> tuple[int | None, str]:
    data_dir = Path(info.uri or "")
    assert data_dir.parent == Path(info.base_dir or "") and not data_dir.exists()
    etcd = start_scratch_etcd(data_dir)  # as the drill's check does, on the restored data dir
    return etcd.pid, str(data_dir)


def _use_s3(info: TargetInfo) -> tuple[int | None, str]:
    assert info.uri == f"http://127.0.0.1:{info.port}" and info.secret and listens("127.0.0.1", info.port or 0)
    return read_pid(Path(info.base_dir or "") / "moto.pid"), "moto.server"


def _use_path(name: str):  # milvus_lite and directory: a path in the target's dir, nothing runs
    def use(info: TargetInfo) -> tuple[int | None, str]:
        assert info.uri == str(Path(info.base_dir or "") / name) and not Path(info.uri).exists()
        return None, ""
    return use


USE = {"postgres": _use_postgres, "postgres_cluster": _use_cluster, "redis": _use_redis, "rabbitmq": _use_rabbit,
       "etcd": _use_etcd, "s3": _use_s3, "milvus_lite": _use_path("drill.db"), "directory": _use_path("prepared")}


@pytest.mark.parametrize("kind", sorted(scratch_local.KINDS))
def test_each_kind_is_made_and_removed_leaving_nothing_running(root: Path, kind: str) -> None:
    backend = LocalBackend(root, ProductionGuard([]))
    info = backend.start_kind(kind, f"svc-{kind}", "full", OWNER, timeout=120)
    try:
        assert info.kind == kind and info.base_dir and Path(info.base_dir).parent == root
        pid, marker = USE[kind](info)
        assert pid is None or running(pid, marker), f"{kind}: pid {pid} is not {marker}"
        socket_dir = ScratchPostgres.attach(Path(info.base_dir)).socket_dir if kind == "postgres" else None
        assert [i.base_dir for i in backend.run_leftovers(OWNER, f"svc-{kind}")] == [info.base_dir]
    finally:
        done = backend.stop(info)
    assert f"removed {info.base_dir}" in done and not Path(info.base_dir).exists()
    assert pid is None or not running(pid, marker), f"{kind}: pid {pid} still runs after remove"
    assert socket_dir is None or not socket_dir.exists()
    assert processes_naming(root) == [] and list(root.iterdir()) == []


def test_leftovers_of_other_owners_are_stopped_and_this_owners_kept(root: Path) -> None:
    backend = LocalBackend(root, ProductionGuard([]))
    crashed_pg = backend.start_kind("postgres", "postgres", "full", "drill:crashed")
    crashed_redis = backend.start_kind("redis", "redis", "rdb", "drill:crashed")
    server = ScratchRedis(dir=Path(crashed_redis.base_dir or "") / "data", port=crashed_redis.port).start()
    crashed_s3 = backend.start_kind("s3", "minio", "full", "drill:crashed")
    moto_pid = read_pid(Path(crashed_s3.base_dir or "") / "moto.pid")
    not_a_drill = backend.start_kind("directory", "gitlab", "full", "pytest:other")
    mine = backend.start_kind("directory", "gitlab", "full", OWNER)
    pg_pid = read_pid(Path(crashed_pg.base_dir or "") / "data" / "postmaster.pid")
    assert running(pg_pid, "postgres") and running(server.pid, "redis-server") and running(moto_pid, "moto.server")

    removed = backend.cleanup_leftovers(keep_owner=OWNER)
    assert len(removed) == 3
    for gone in (crashed_pg, crashed_redis, crashed_s3):
        assert not Path(gone.base_dir or "").exists()
    assert not running(pg_pid, "postgres") and not running(server.pid, "redis-server")
    assert not running(moto_pid, "moto.server")
    assert Path(mine.base_dir or "").exists() and Path(not_a_drill.base_dir or "").exists()
    backend.stop(mine)
    backend.stop(not_a_drill)
    assert processes_naming(root) == [] and list(root.iterdir()) == []


def test_a_target_that_fails_to_start_leaves_nothing(root: Path, monkeypatch) -> None:
    monkeypatch.setenv("ERP_PG_BINDIR", str(root / "no-such-bindir"))
    backend = LocalBackend(root, ProductionGuard([]))
    with pytest.raises((ScratchError, OSError)):
        backend.start_kind("postgres", "postgres", "full", OWNER)
    assert list(root.iterdir()) == []


def test_a_production_port_is_refused_before_anything_is_made(root: Path, monkeypatch) -> None:
    monkeypatch.setattr(scratch_local, "free_port", lambda: 6379)
    guard = ProductionGuard([ProductionEndpoint("erp_redis", frozenset({"loopback"}), 6379)])
    with pytest.raises(ProductionTargetRefused, match="connection 'erp_redis'"):
        LocalBackend(root, guard).start_kind("redis", "redis", "rdb", OWNER)
    assert list(root.iterdir()) == []


# ───────────── unix sockets under a deep scratch root ─────────────


@pytest.fixture
def deep_root(root: Path, monkeypatch) -> Path:
    path = root / ("d" * 40) / ("e" * 40) / "scratch"
    path.mkdir(parents=True)
    for part in (path, path.parent, path.parent.parent):
        os.chmod(part, 0o755)
    monkeypatch.setenv(SCRATCH_ROOT_ENV, str(path))
    assert len(str(path)) > 100
    return path


def test_postgres_under_a_root_over_100_characters_starts_with_its_socket_in_a_short_private_dir(deep_root: Path):
    cluster = ScratchPostgres.new("deep", owner="pytest")
    assert cluster.base_dir.parent == deep_root
    try:
        cluster.create()
        cluster.start(timeout=60)
        socket_dir = cluster.socket_dir
        assert socket_dir is not None and len(str(socket_dir / f".s.PGSQL.{cluster.port}")) < 60
        assert socket_dir.stat().st_mode & 0o777 == 0o700
        with psycopg.connect(cluster.conninfo(), connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(f"host={socket_dir} port={cluster.port} user=postgres dbname=postgres") as conn:
            assert conn.execute("SHOW unix_socket_directories").fetchone() == (str(socket_dir),)
        attached = ScratchPostgres.attach(cluster.base_dir)
        assert (attached.port, attached.socket_dir) == (cluster.port, socket_dir)
        attached.stop()  # another process's handle stops it and removes the socket dir
        assert not cluster.is_running() and not socket_dir.exists()
    finally:
        cluster.destroy()
    assert not cluster.base_dir.exists()


def test_redis_under_a_root_over_100_characters_starts_with_its_socket_in_a_short_private_dir(deep_root: Path):
    server = ScratchRedis(dir=scratch_root() / "redis").start(timeout=30)
    try:
        assert str(server.dir).startswith(str(deep_root))
        assert server.unix_socket is not None and server.socket_dir is not None
        assert server.socket_dir.stat().st_mode & 0o777 == 0o700
        pong = subprocess.run(["redis-cli", "-s", str(server.unix_socket), "PING"], capture_output=True, check=True)
        assert pong.stdout.strip() == b"PONG"
        attached = ScratchRedis.attach(server.dir)
        assert attached.socket_dir == server.socket_dir
    finally:
        pid, socket_dir = server.pid, server.socket_dir
        server.stop()
    assert not running(pid, "redis-server") and socket_dir is not None and not socket_dir.exists()


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_the_drills_local_backend_under_a_long_scratch_root_starts_and_removes_its_target(deep_root: Path, kind: str):
    """Issue 9: a 44-character scratch root made the drill's scratch PostgreSQL fail ("pg_ctl failed")."""
    from erp_backup.drill.targets import drill_scratch_root
    from erp_backup.plan import load_plan

    root = drill_scratch_root(load_plan())
    assert root.parent == deep_root and len(str(root)) > 44
    backend = LocalBackend(root, ProductionGuard([]))
    info = backend.start_kind(kind, f"svc-{kind}", "full", OWNER, pg_major=None, timeout=120)
    try:
        assert Path(info.base_dir or "").parent == root
        if kind == "postgres":
            socket_dir = ScratchPostgres.attach(Path(info.base_dir or "")).socket_dir
            with psycopg.connect(info.pg_conninfo, connect_timeout=5) as conn:
                assert conn.execute("SHOW unix_socket_directories").fetchone() == (str(socket_dir),)
        else:
            server = ScratchRedis(dir=Path(info.base_dir or "") / "data", port=info.port).start(timeout=30)
            socket_dir = server.socket_dir
            assert subprocess.run(["redis-cli", "-p", str(info.port), "PING"], capture_output=True,
                                  check=True).stdout.strip() == b"PONG"
        assert socket_dir is not None and socket_dir.name.startswith("erp-s-") and len(str(socket_dir)) < 40
    finally:
        backend.stop(info)
    assert not Path(info.base_dir or "").exists() and not socket_dir.exists()
    shutil.rmtree(root)


# ───────────── etcd by pid file (moved from the etcd round trip) ─────────────


def test_stop_pid_file_stops_a_leftover_scratch_etcd_only(tmp_path: Path) -> None:
    etcd = start_scratch_etcd(tmp_path / "leftover")
    assert etcd.pid_file.read_text().splitlines() == [str(etcd.pid), str(tmp_path / "leftover")]
    assert stop_pid_file(etcd.pid_file) is True
    etcd.process.wait(timeout=10)
    assert not etcd.pid_file.exists()

    stale = tmp_path / "stale.etcd.pid"
    stale.write_text(f"{etcd.pid}\n{tmp_path / 'stale'}\n")  # that pid is gone now
    assert stop_pid_file(stale) is False and not stale.exists()


def test_an_attached_etcd_knows_its_endpoint_and_stops_it(tmp_path: Path) -> None:
    etcd = start_scratch_etcd(tmp_path / "attach")
    try:
        attached = ScratchEtcd.attach(tmp_path / "attach")
        assert (attached.pid, attached.endpoint, attached.is_running()) == (etcd.pid, etcd.endpoint, True)
        attached.stop()
        assert etcd.process.wait(timeout=10) is not None and not attached.is_running()
        assert not etcd.pid_file.exists()
    finally:
        etcd.stop()


def test_an_attached_moto_server_is_stopped_by_pid(tmp_path: Path) -> None:
    started = ScratchS3(tmp_path).start()
    pid = read_pid(started.pid_file)
    attached = ScratchS3.attach(tmp_path)
    assert attached.port == started.port and attached.is_running()
    attached.stop()
    assert not running(pid, "moto.server") and not listens("127.0.0.1", started.port)


def test_a_cluster_that_stopped_on_its_own_leaves_no_socket_dir_when_started_again(root: Path, monkeypatch) -> None:
    monkeypatch.setenv(SCRATCH_ROOT_ENV, str(root))
    cluster = ScratchPostgres.new("restart", owner="pytest")
    try:
        cluster.create()
        first = cluster.start(timeout=60).socket_dir
        cluster._run("pg_ctl", "-D", str(cluster.data_dir), "-m", "immediate", "-w", "stop")  # not through stop()
        assert first is not None and first.exists() and not cluster.is_running()
        second = cluster.start(timeout=60).socket_dir
        assert second is not None and second != first and second.exists() and not first.exists()
    finally:
        cluster.destroy()
    assert not second.exists()
