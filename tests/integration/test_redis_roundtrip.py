"""Redis round trips against real servers: the machine's Redis (127.0.0.1:6379) and password-protected
scratch servers. Back up → verify → restore into a scratch server → compare with what was written."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from airflow.sdk import Connection

from erp_backup.manifest import FILE_MODE, Manifest
from erp_backup.scratch.base import free_port
from erp_backup.scratch.redis import PID_FILE_NAME, STATE_FILE_NAME, ScratchRedis
from erp_backup.services import redis as svc
from erp_backup.services.base import BackupOutcome, CheckContext, RunInfo, SourceUnavailable
from erp_backup.sets import BackupSet
from erp_backup.stream import decompress_to, stream_to_file
from tests.fixtures.factories import make_backup_context, make_manifest

pytestmark = pytest.mark.integration

SHARED_PORT = 6379
TEST_DB = 13
PASSWORD = "scratch-Pa55-" + uuid.uuid4().hex[:8]
BINARY_VALUE = bytes(range(256)) * 4


def redis_cli(port: int, *args: str, db: int = 0, password: str | None = None, stdin: bytes | None = None) -> bytes:
    env = {**os.environ, **({"REDISCLI_AUTH": password} if password else {})}
    argv = ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "-n", str(db), "-e", *args]
    return subprocess.run(argv, input=stdin, capture_output=True, env=env, check=True).stdout


def run_backup(root: Path, conn: Connection, backup_id: str = "20261126T031500Z") -> tuple[BackupSet, Manifest]:
    started = datetime.now(timezone.utc)
    ctx = make_backup_context(root, service="redis", backup_type="rdb", run=RunInfo("backup_redis_rdb", "manual", started),
                              backup_id=backup_id, connection=conn)
    outcome: BackupOutcome = svc.backup(ctx)
    manifest = make_manifest(context=ctx, outcome=outcome, captured_started_at=started,
                             captured_finished_at=datetime.now(timezone.utc))
    return ctx.backup_set, manifest


@pytest.fixture
def shared_redis_data():
    """Keys of every type under a unique prefix in a dedicated db of the machine's Redis; removed afterwards."""
    prefix = f"erp_test_{uuid.uuid4().hex[:12]}:"
    keys = {
        "string": prefix + "string", "list": prefix + "list", "hash": prefix + "hash", "set": prefix + "set",
        "zset": prefix + "zset", "stream": prefix + "stream", "binary": prefix + "binary", "ttl": prefix + "ttl",
    }
    port = SHARED_PORT
    redis_cli(port, "SET", keys["string"], "grüße from ERP", db=TEST_DB)
    redis_cli(port, "RPUSH", keys["list"], "one", "two", "three", db=TEST_DB)
    redis_cli(port, "HSET", keys["hash"], "tenant", "acme", "plan", "gold", db=TEST_DB)
    redis_cli(port, "SADD", keys["set"], "x", "y", "z", db=TEST_DB)
    redis_cli(port, "ZADD", keys["zset"], "1.5", "low", "7", "high", db=TEST_DB)
    redis_cli(port, "XADD", keys["stream"], "1-1", "event", "created", db=TEST_DB)
    redis_cli(port, "-x", "SET", keys["binary"], db=TEST_DB, stdin=BINARY_VALUE)
    redis_cli(port, "SET", keys["ttl"], "session", "EX", "3600", db=TEST_DB)
    try:
        yield keys
    finally:
        redis_cli(port, "DEL", *keys.values(), db=TEST_DB)


def test_shared_redis_backup_verify_and_restore_into_scratch(tmp_path: Path, shared_redis_data: dict[str, str]):
    conn = Connection(conn_id="erp_redis", conn_type="redis", host="127.0.0.1", port=SHARED_PORT)
    backup_set, manifest = run_backup(tmp_path / "staging", conn)

    rdb = backup_set.path / svc.RDB_FILE
    assert [entry.path for entry in manifest.files] == [svc.RDB_FILE]
    assert (rdb.stat().st_mode & 0o777) == FILE_MODE
    assert sorted(p.name for p in backup_set.path.iterdir()) == [svc.RDB_FILE]  # no raw temp file left behind
    assert manifest.source == {"conn_id": "erp_redis", "host": "127.0.0.1", "port": SHARED_PORT,
                               "version": manifest.details["redis_version"]}
    assert manifest.tools["redis-cli"].startswith("redis-cli ")
    assert manifest.details["keyspace"][str(TEST_DB)]["keys"] >= len(shared_redis_data)
    sampled = {item["key"]: item for item in manifest.details["sample"] if item["db"] == TEST_DB}
    assert set(shared_redis_data.values()) <= set(sampled)
    assert sampled[shared_redis_data["ttl"]]["persistent"] is False
    assert sampled[shared_redis_data["hash"]]["type"] == "hash"

    assert svc.verify(backup_set, manifest) == []

    scratch = ScratchRedis(tmp_path / "scratch")
    try:
        report = svc.restore(backup_set.path, manifest, scratch)
        assert report.ok is True and report.problems == []
        assert report.details["sampled_keys_matched"] >= len(shared_redis_data)
        assert report.details["key_counts"][str(TEST_DB)]["restored"] >= len(shared_redis_data)
        assert scratch.is_running() and report.details["target"]["port"] == scratch.port
        assert report.restored_bytes == manifest.details["rdb_bytes"]

        # Independent look at the restored data.
        port = scratch.port
        keys = shared_redis_data
        assert redis_cli(port, "GET", keys["string"], db=TEST_DB).decode().strip() == "grüße from ERP"
        assert redis_cli(port, "LRANGE", keys["list"], "0", "-1", db=TEST_DB).split() == [b"one", b"two", b"three"]
        assert redis_cli(port, "HGET", keys["hash"], "plan", db=TEST_DB).strip() == b"gold"
        assert redis_cli(port, "ZSCORE", keys["zset"], "high", db=TEST_DB).strip() == b"7"
        assert redis_cli(port, "XLEN", keys["stream"], db=TEST_DB).strip() == b"1"
        assert redis_cli(port, "--raw", "GET", keys["binary"], db=TEST_DB)[:-1] == BINARY_VALUE
        assert 0 < int(redis_cli(port, "TTL", keys["ttl"], db=TEST_DB)) <= 3600
    finally:
        scratch.stop()
    assert not scratch.is_running()


@pytest.fixture(scope="module")
def auth_source(tmp_path_factory: pytest.TempPathFactory):
    """A password-protected scratch Redis holding persistent keys in two dbs."""
    server = ScratchRedis(tmp_path_factory.mktemp("auth-source"), password=PASSWORD).start()
    try:
        port = server.port
        redis_cli(port, "CONFIG", "SET", "repl-diskless-sync-delay", "0", password=PASSWORD)
        for index in range(120):
            redis_cli(port, "SET", f"order:{index:04d}", f"total={index * 7}", password=PASSWORD)
        redis_cli(port, "HSET", "tenant:acme", "name", "ACME", "seats", "40", db=5, password=PASSWORD)
        redis_cli(port, "SADD", "tenants", "acme", "globex", db=5, password=PASSWORD)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def auth_backup(auth_source: ScratchRedis, tmp_path_factory: pytest.TempPathFactory) -> tuple[BackupSet, Manifest]:
    conn = Connection(conn_id="erp_redis", conn_type="redis", host="127.0.0.1", port=auth_source.port,
                      password=PASSWORD)
    return run_backup(tmp_path_factory.mktemp("auth-staging"), conn)


def test_password_reaches_redis_cli_and_restore_is_exact(auth_backup, tmp_path: Path, caplog):
    backup_set, manifest = auth_backup
    assert manifest.details["keyspace"] == {"0": {"keys": 120, "expires": 0}, "5": {"keys": 2, "expires": 0}}
    assert manifest.details["dbsize"] == {"0": 120, "5": 2}
    sample = manifest.details["sample"]
    assert [item["key"] for item in sample if item["db"] == 0] == [f"order:{i:04d}" for i in range(50)]
    assert [item["key"] for item in sample if item["db"] == 5] == ["tenant:acme", "tenants"]
    assert PASSWORD not in manifest.to_json()

    with caplog.at_level("DEBUG"):
        report = svc.restore(backup_set.path, manifest, {"dir": tmp_path / "scratch"})
    assert report.details["key_counts"] == {
        "0": {"restored": 120, "expected_min": 120, "expected_max": 120},
        "5": {"restored": 2, "expected_min": 2, "expected_max": 2},
    }
    assert report.details["sampled_keys_matched"] == 52 and report.ok
    assert report.details["kept_running"] is False
    assert not (tmp_path / "scratch" / STATE_FILE_NAME).exists()  # the server this call started is stopped
    assert PASSWORD not in caplog.text


def test_wrong_password_names_the_connection(auth_source: ScratchRedis, tmp_path: Path):
    conn = Connection(conn_id="erp_redis", conn_type="redis", host="127.0.0.1", port=auth_source.port,
                      password="not-the-password")
    with pytest.raises(SourceUnavailable, match="connection 'erp_redis'.*rejected the credentials") as caught:
        run_backup(tmp_path, conn)
    assert f"127.0.0.1:{auth_source.port}" in str(caught.value) and "WRONGPASS" in str(caught.value)
    assert "not-the-password" not in str(caught.value)


def test_unreachable_redis_names_the_connection_and_host(tmp_path: Path):
    port = free_port()
    conn = Connection(conn_id="erp_redis", conn_type="redis", host="127.0.0.1", port=port)
    expected = rf"connection 'erp_redis': Redis at 127\.0\.0\.1:{port} is unreachable"
    with pytest.raises(SourceUnavailable, match=expected):
        run_backup(tmp_path, conn)
    assert not list((tmp_path / "redis" / "rdb").glob("*/*.zst"))


def test_verify_rejects_a_corrupt_rdb(auth_backup, tmp_path: Path):
    backup_set, manifest = auth_backup
    copy = BackupSet(tmp_path, "redis", "rdb", backup_set.backup_id)
    shutil.copytree(backup_set.path, copy.path)
    raw = tmp_path / "dump.rdb"
    decompress_to(copy.path / svc.RDB_FILE, raw)
    data = bytearray(raw.read_bytes())
    data[len(data) // 2] ^= 0x5A
    (copy.path / svc.RDB_FILE).unlink()
    stream_to_file([bytes(data)], copy.path, svc.RDB_FILE)

    problems = svc.verify(copy, manifest)
    assert len(problems) == 1 and "redis-check-rdb rejected dump.rdb.zst" in problems[0]

    (copy.path / svc.RDB_FILE).unlink()
    assert svc.verify(copy, manifest) == [f"{copy.key}: {svc.RDB_FILE} is missing"]


def test_restore_reports_a_sampled_key_that_differs_and_stops_its_server(auth_backup, tmp_path: Path):
    backup_set, manifest = auth_backup
    details = json.loads(json.dumps(manifest.details))
    details["sample"][3]["digest"] = "0" * 40
    tampered = dataclasses.replace(manifest, details=details)

    report = svc.restore(backup_set.path, tampered, {"dir": tmp_path / "scratch"})
    assert report.ok is False and report.details["sampled_keys_matched"] == 51
    assert len(report.problems) == 1 and "order:0003" in report.problems[0]
    assert not (tmp_path / "scratch" / PID_FILE_NAME).exists()


def test_check_restored_reads_the_server_the_restore_left_running(auth_backup, tmp_path: Path):
    backup_set, manifest = auth_backup
    guarded: list[tuple[str, int]] = []
    ctx = CheckContext(guard=lambda host, port: guarded.append((host, port)))
    scratch = ScratchRedis(tmp_path / "data")
    try:
        report = svc.restore(backup_set.path, manifest, scratch)
        found = svc.check_restored(ScratchRedis(tmp_path / "data"), backup_set.path, manifest, report, ctx)
        port = scratch.port
    finally:
        scratch.stop()
    assert found.problems == []
    assert found.checks == ["db0: 120 keys (backup: 120..120)", "db5: 2 keys (backup: 2..2)",
                            "52/52 sampled keys match their digests (0 expired)"]
    assert guarded == [("127.0.0.1", port)]

    stopped = svc.check_restored(ScratchRedis(tmp_path / "data"), backup_set.path, manifest, report, ctx)
    assert stopped.checks == [] and len(stopped.problems) == 1 and "is not running" in stopped.problems[0]


def test_restore_dry_run_changes_nothing(auth_backup, tmp_path: Path):
    backup_set, manifest = auth_backup
    target = tmp_path / "scratch"
    report = svc.restore(backup_set.path, manifest, {"dir": target}, dry_run=True)
    assert report.dry_run is True and any("decompress" in step for step in report.actions)
    assert not target.exists()


def test_restore_refuses_to_overwrite_an_existing_rdb(auth_backup, tmp_path: Path):
    backup_set, manifest = auth_backup
    (tmp_path / "dump.rdb").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        svc.restore(backup_set.path, manifest, {"dir": tmp_path})
    assert (tmp_path / "dump.rdb").read_bytes() == b"keep me"


def test_scratch_redis_can_be_stopped_from_another_process_by_its_state_file(auth_backup, tmp_path: Path):
    backup_set, _ = auth_backup
    decompress_to(backup_set.path / svc.RDB_FILE, tmp_path / "dump.rdb")
    before = (tmp_path / "dump.rdb").read_bytes()

    started = ScratchRedis(tmp_path).start()
    assert int((tmp_path / PID_FILE_NAME).read_text()) == started.pid
    assert redis_cli(started.port, "DBSIZE").strip() == b"120"
    redis_cli(started.port, "SET", "written-after-load", "1")

    attached = ScratchRedis.attach(tmp_path)
    assert (attached.pid, attached.port) == (started.pid, started.port)
    assert attached.is_running()
    attached.stop()
    started._process.wait(10)  # reap our child; the attached handle signalled it
    assert not (tmp_path / PID_FILE_NAME).exists() and not (tmp_path / STATE_FILE_NAME).exists()
    assert (tmp_path / "dump.rdb").read_bytes() == before  # no save on shutdown
    with pytest.raises(Exception, match="no scratch redis state"):
        ScratchRedis.attach(tmp_path)
