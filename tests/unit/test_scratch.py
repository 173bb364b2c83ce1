"""Scratch servers without servers: command lines, the kind registry's choices, the process helpers."""

from __future__ import annotations

import inspect
import os
import subprocess
import time
from pathlib import Path

import pytest

from erp_backup.scratch import local as scratch_local
from erp_backup.scratch.base import (
    SOCKET_PREFIX,
    ScratchError,
    TargetInfo,
    private_socket_dir,
    process_argv,
    read_pid,
    remove_socket_dir,
    stop_pid,
)
from erp_backup.scratch.etcd import ScratchEtcd, etcd_command
from erp_backup.scratch.postgres import ScratchPostgres
from erp_backup.scratch.rabbitmq import ScratchRabbit
from erp_backup.scratch.redis import ScratchRedis, server_argv
from erp_backup.scratch.s3 import ScratchS3

SPEC_KINDS = {"postgres", "postgres_cluster", "redis", "rabbitmq", "etcd", "s3", "milvus_lite", "directory"}


# ───────────── command lines (moved from the redis and milvus command tests) ─────────────


def test_scratch_server_argv_keeps_password_in_config_file(tmp_path: Path):
    argv = server_argv("redis-server", tmp_path / "scratch-redis.conf", "127.0.0.1", 7001, tmp_path, "dump.rdb",
                       tmp_path / "scratch-redis.pid", tmp_path / "scratch-redis.log")
    assert argv == (
        "redis-server", str(tmp_path / "scratch-redis.conf"),
        "--bind", "127.0.0.1", "--port", "7001", "--dir", str(tmp_path), "--dbfilename", "dump.rdb",
        "--appendonly", "no", "--save", "", "--daemonize", "no", "--protected-mode", "yes",
        "--pidfile", str(tmp_path / "scratch-redis.pid"), "--logfile", str(tmp_path / "scratch-redis.log"),
    )


def test_scratch_server_argv_puts_the_unix_socket_where_it_is_told_owner_only():
    argv = server_argv("redis-server", None, "127.0.0.1", 7001, Path("/deep/dir"), "dump.rdb", Path("/deep/dir/p"),
                       Path("/deep/dir/l"), Path("/tmp/erp-s-abc/redis.sock"))
    assert argv[-4:] == ("--unixsocket", "/tmp/erp-s-abc/redis.sock", "--unixsocketperm", "700")


def test_scratch_etcd_command() -> None:
    command = etcd_command(Path("/tmp/drill/etcd"), 40001, 40002, name="default")
    assert command.argv == (
        "etcd", "--name", "default", "--data-dir", "/tmp/drill/etcd",
        "--listen-client-urls", "http://127.0.0.1:40001", "--advertise-client-urls", "http://127.0.0.1:40001",
        "--listen-peer-urls", "http://127.0.0.1:40002", "--initial-advertise-peer-urls", "http://127.0.0.1:40002",
        "--initial-cluster", "default=http://127.0.0.1:40002",
    )


# ───────────── the protocol and the kind registry ─────────────


@pytest.mark.parametrize("server", [ScratchPostgres, ScratchRedis, ScratchEtcd, ScratchRabbit, ScratchS3])
def test_every_scratch_server_follows_the_protocol(server: type) -> None:
    for verb in ("start", "stop", "is_running"):
        assert callable(getattr(server, verb)), f"{server.__name__}.{verb}"
    assert isinstance(inspect.getattr_static(server, "attach"), classmethod)
    assert "timeout" in inspect.signature(server.start).parameters


def test_the_registry_has_every_kind_a_service_can_ask_for():
    assert set(scratch_local.KINDS) == SPEC_KINDS
    with pytest.raises(ScratchError, match="no local scratch target of kind 'milvus' .*known: directory, etcd"):
        scratch_local.local_kind("milvus")


@pytest.mark.parametrize("kind", sorted(SPEC_KINDS))
def test_addresses_are_chosen_before_anything_is_made(kind: str) -> None:
    info = scratch_local.address(kind, "svc", "full", "drill:x")
    assert (info.kind, info.backend, info.owner, info.base_dir) == (kind, "local", "drill:x", None)
    if kind in ("postgres", "postgres_cluster", "redis", "rabbitmq", "s3"):
        assert info.host == "127.0.0.1" and info.port and 0 < info.port < 65536
    else:
        assert info.host is None and info.port is None
    assert (info.node or "").startswith("erpdrill") == (kind == "rabbitmq")


def test_removing_a_target_of_an_unknown_kind_removes_its_directory_only(tmp_path: Path) -> None:
    base = tmp_path / "erp-drill-odd"
    base.mkdir()
    done = scratch_local.remove(TargetInfo("svc", "", "odd", "local", "drill:x", base_dir=str(base)))
    assert done == [f"removed {base}"] and not base.exists()


def test_target_info_round_trips_as_json_and_describes_itself_without_secrets():
    info = TargetInfo("postgres", "snapshot", "postgres_cluster", "local", "drill:x", host="127.0.0.1", port=5999,
                      base_dir="/s/b", secret="hush")
    assert TargetInfo.from_dict({**info.as_dict(), "unknown": 1}) == info
    assert info.describe() == "PostgreSQL cluster, not started (PITR) 127.0.0.1:5999 [local]"
    assert "hush" not in repr(info) and "hush" not in info.describe()


# ───────────── process helpers ─────────────


def test_stop_pid_signals_only_the_process_it_was_told_about(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    deadline = time.monotonic() + 5
    while process_argv(sleeper.pid)[:1] != ["sleep"] and time.monotonic() < deadline:
        time.sleep(0.01)  # until the child has exec'd
    assert process_argv(sleeper.pid) == ["sleep", "60"]
    try:
        assert stop_pid(sleeper.pid, lambda argv: "redis-server" in argv[0]) is False
        assert sleeper.poll() is None  # not ours by its command line: left alone
        assert stop_pid(sleeper.pid, lambda argv: Path(argv[0]).name == "sleep", timeout=5) is True
        assert sleeper.wait(5) == -15
        assert process_argv(sleeper.pid) == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_read_pid_reads_the_first_line_or_nothing(tmp_path: Path) -> None:
    pid_file = tmp_path / "x.pid"
    assert read_pid(pid_file) is None
    pid_file.write_text("4242\n/some/dir\n")
    assert read_pid(pid_file) == 4242
    pid_file.write_text("garbage\n")
    assert read_pid(pid_file) is None


def test_socket_dirs_are_short_private_and_only_they_are_removed(tmp_path: Path) -> None:
    path = private_socket_dir()
    try:
        assert path.name.startswith(SOCKET_PREFIX) and len(str(path / "redis.sock")) < 40
        assert path.stat().st_mode & 0o777 == 0o700 and path.stat().st_uid == os.geteuid()
    finally:
        remove_socket_dir(path)
    assert not path.exists()
    other = tmp_path / "not-a-socket-dir"
    other.mkdir()
    remove_socket_dir(other)
    assert other.exists()


def test_wait_http_needs_an_http_answer_not_just_an_accepted_connection():
    """docker-proxy accepts on a published port before the container's server listens, then resets."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from erp_backup.scratch.base import ScratchError, wait_http

    resetting = socket.socket()
    resetting.bind(("127.0.0.1", 0))
    resetting.listen()

    def reset_all() -> None:
        while True:
            try:
                conn, _ = resetting.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=reset_all, daemon=True).start()
    try:
        with pytest.raises(ScratchError, match="did not answer HTTP"):
            wait_http("127.0.0.1", resetting.getsockname()[1], 1.0, "the proxy")
    finally:
        resetting.close()

    class Unauthorized(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_http("127.0.0.1", server.server_address[1], 5.0, "the management API")  # any status is an answer
    finally:
        server.shutdown()
