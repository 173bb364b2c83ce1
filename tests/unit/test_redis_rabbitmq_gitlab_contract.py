"""Redis, RabbitMQ and GitLab: the contract's pure verbs (CLI targets, scratch specs and targets, versions, sizes)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import Connection

from erp_backup.drill.targets import TargetInfo
from erp_backup.manifest import FileEntry, Manifest
from erp_backup.scratch.redis import ScratchRedis
from erp_backup.services import get_service
from erp_backup.services.base import (
    ConnectionMissing,
    ContainerSpec,
    PointInTimeUnavailable,
    ScratchSpec,
    ServiceModule,
    TargetUsageError,
)
from erp_backup.services.rabbitmq import RabbitEndpoint
from tests.fixtures.factories import make_manifest

NAMES = ("redis", "rabbitmq", "gitlab")
TYPES = {"redis": "rdb", "rabbitmq": "definitions", "gitlab": "full"}
NOW = datetime(2026, 11, 26, 3, 15, tzinfo=timezone.utc)


def no_connection(conn_id: str) -> Any:
    raise LookupError(f"no {conn_id}")


def manifest(service: str, *, details: dict[str, Any] | None = None, tools: dict[str, str] | None = None,
             files: list[FileEntry] | None = None) -> Manifest:
    return make_manifest(service=service, backup_type=TYPES[service], captured_started_at=NOW, tools=tools or {},
                         files=files or [], details=details or {})


def info(service: str, kind: str, **fields: Any) -> TargetInfo:
    return TargetInfo(service=service, backup_type=TYPES[service], kind=kind, backend="local", owner="drill:t",
                      **fields)


@pytest.mark.parametrize("name", NAMES)
def test_module_declares_one_type_and_no_point_in_time(name: str) -> None:
    module = get_service(name)
    assert isinstance(module, ServiceModule)
    wanted = frozenset({TYPES[name]})
    assert (module.SUPPORTED_TYPES, module.RESTORE_TYPES, module.DRILL_TYPES) == (wanted, wanted, wanted)
    assert module.PITR_TYPES == frozenset()
    with pytest.raises(PointInTimeUnavailable):
        module.plan_point_in_time([], NOW)
    with pytest.raises(PointInTimeUnavailable):
        module.restore_to_time(Path("/nowhere"), NOW, None)


@pytest.mark.parametrize("name", NAMES)
def test_restore_refuses_an_option_it_does_not_take(name: str, tmp_path: Path) -> None:
    module = get_service(name)
    assert "strict" not in module.RESTORE_OPTIONS
    target: Any = tmp_path / "target" if name == "gitlab" else {"dir": tmp_path / "target"} if name == "redis" else {}
    set_dir = tmp_path / "set"
    set_dir.mkdir()
    (set_dir / "definitions.json").write_text('{"vhosts": []}')
    details = {"gitlab_backup_id": "1", "gitlab_version": "gitlab-ce 17.5.1", "files": {}, "compression": {}}
    with pytest.raises(ValueError, match="unknown option.*strict.*known: "):
        module.restore(set_dir, manifest(name, details=details), target, dry_run=True, options={"strict": False})
    assert not (tmp_path / "target").exists()


# -- target_from_cli -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["redis", "gitlab"])
def test_directory_targets(name: str, tmp_path: Path) -> None:
    module = get_service(name)
    chosen = module.target_from_cli(TYPES[name], str(tmp_path / "new"), None, no_connection)
    if name == "redis":
        assert chosen.target == {"dir": tmp_path / "new"}
        assert chosen.description == f"scratch redis-server in {tmp_path / 'new'}"
    else:
        assert chosen.target == tmp_path / "new"
        assert chosen.description.startswith(f"directory {tmp_path / 'new'} (prepared for the runbook")

    with pytest.raises(TargetUsageError, match=f"{name} restores need --target: a directory"):
        module.target_from_cli(TYPES[name], None, None, no_connection)
    (tmp_path / "file").write_text("x")
    with pytest.raises(TargetUsageError, match=f"--target {tmp_path / 'file'} exists and is not a directory"):
        module.target_from_cli(TYPES[name], str(tmp_path / "file"), None, no_connection)
    with pytest.raises(TargetUsageError, match="not .*a connection: give --target"):
        module.target_from_cli(TYPES[name], None, "erp_redis", no_connection)


def test_rabbitmq_targets() -> None:
    rabbitmq = get_service("rabbitmq")
    for local in (None, "local"):
        chosen = rabbitmq.target_from_cli("definitions", local, None, no_connection)
        assert chosen.target == RabbitEndpoint() and "local node" in chosen.description
    chosen = rabbitmq.target_from_cli("definitions", "rabbit@mq-2", None, no_connection)
    assert chosen.target == RabbitEndpoint(node="rabbit@mq-2") and chosen.description == "node rabbit@mq-2 (rabbitmqctl)"
    for bad in ("amqp://guest@mq-2", "mq-2"):
        with pytest.raises(TargetUsageError, match="rabbitmq restores take --target local, --target <node name>"):
            rabbitmq.target_from_cli("definitions", bad, None, no_connection)
    with pytest.raises(TargetUsageError, match="not both"):
        rabbitmq.target_from_cli("definitions", "local", "erp_rabbitmq_dr", no_connection)


def test_rabbitmq_target_from_a_connection() -> None:
    rabbitmq = get_service("rabbitmq")
    conn = Connection(conn_id="erp_rabbitmq_dr", conn_type="amqp", host="mq-dr", port=5672, login="restore",
                      password="secret-pw", extra=json.dumps({"mode": "http"}))
    chosen = rabbitmq.target_from_cli("definitions", None, "erp_rabbitmq_dr", {"erp_rabbitmq_dr": conn}.__getitem__)
    assert chosen.target == RabbitEndpoint.from_connection(conn)
    assert chosen.description == "management API http://mq-dr:15672 (connection 'erp_rabbitmq_dr')"
    assert "secret-pw" not in chosen.description

    with pytest.raises(ConnectionMissing, match="AIRFLOW_CONN_ERP_MISSING"):
        rabbitmq.target_from_cli("definitions", None, "erp_missing", no_connection)
    odd = Connection(conn_id="odd", conn_type="amqp", host="mq", extra=json.dumps({"mode": "smtp"}))
    with pytest.raises(TargetUsageError, match="--target-conn odd: rabbitmq mode must be one of rabbitmqctl, http"):
        rabbitmq.target_from_cli("definitions", None, "odd", lambda conn_id: odd)


# -- scratch_spec and scratch_target ---------------------------------------------------------------


def test_scratch_specs() -> None:
    assert get_service("redis").scratch_spec("rdb", {"redis": "7.0.15"}) == ScratchSpec("redis", None)
    assert get_service("gitlab").scratch_spec("full", {"gitlab": "gitlab-ce 17.5.1"}) == ScratchSpec("directory", None)
    rabbitmq = get_service("rabbitmq")
    spec = rabbitmq.scratch_spec("definitions", {"rabbitmq": "3.13.7"})
    assert spec == ScratchSpec("rabbitmq", ContainerSpec("rabbitmq:3.13-management", 15672,
                                                         {"RABBITMQ_DEFAULT_USER": "drill"}, None,
                                                         secret_env=("RABBITMQ_DEFAULT_PASS",)))
    assert rabbitmq.scratch_spec("definitions", {}).container.image == "rabbitmq:3.10-management"


def test_scratch_targets(tmp_path: Path) -> None:
    redis = get_service("redis").scratch_target(info("redis", "redis", host="127.0.0.1", port=41234,
                                                     base_dir=str(tmp_path)))
    assert isinstance(redis, ScratchRedis)
    assert (redis.dir, redis.host, redis.port, redis.pid) == ((tmp_path / "data").resolve(), "127.0.0.1", 41234, None)

    rabbitmq = get_service("rabbitmq")
    local = rabbitmq.scratch_target(info("rabbitmq", "rabbitmq", host="127.0.0.1", port=40001,
                                         node="erpdrill1@localhost"))
    assert local == RabbitEndpoint(mode="rabbitmqctl", host="127.0.0.1", port=40001, node="erpdrill1@localhost")
    container = rabbitmq.scratch_target(info("rabbitmq", "rabbitmq", host="10.9.0.4", port=15672, container="c1",
                                             secret="scratch-pw"))
    assert container == RabbitEndpoint(mode="http", host="10.9.0.4", port=15672,
                                       management_url="http://10.9.0.4:15672", login="drill", password="scratch-pw")

    prepared = tmp_path / "prepared"
    assert get_service("gitlab").scratch_target(info("gitlab", "directory", uri=str(prepared))) == prepared
    with pytest.raises(ValueError, match="no directory"):
        get_service("gitlab").scratch_target(info("gitlab", "directory"))


# -- versions and source_size ----------------------------------------------------------------------


def test_versions() -> None:
    redis = get_service("redis")
    assert redis.versions(manifest("redis", details={"redis_version": "7.0.15"},
                                   tools={"redis-cli": "redis-cli 7.0.11"})) == {"redis": "7.0.15"}
    assert redis.versions(manifest("redis", details={"redis_version": "unknown"},
                                   tools={"redis-cli": "redis-cli 7.0.11"})) == {"redis": "redis-cli 7.0.11"}
    assert redis.versions(manifest("redis")) == {}

    rabbitmq = get_service("rabbitmq")
    assert rabbitmq.versions(manifest("rabbitmq", tools={"rabbitmqctl": "3.10.8"})) == {"rabbitmq": "3.10.8"}
    assert rabbitmq.versions(manifest("rabbitmq", tools={"requests": "2.32.3"},
                                      details={"rabbitmq_version": "3.13.7"})) == {"rabbitmq": "3.13.7"}
    assert rabbitmq.versions(manifest("rabbitmq")) == {}

    gitlab = get_service("gitlab")
    assert gitlab.versions(manifest("gitlab", details={"gitlab_version": "gitlab-ee 17.5.1-ee"})) == {
        "gitlab": "gitlab-ee 17.5.1-ee"}
    assert gitlab.versions(manifest("gitlab")) == {}


def test_source_sizes() -> None:
    redis = get_service("redis")
    assert redis.source_size(manifest("redis", details={"rdb_bytes": 123_456})) == 123_456
    for unknown in ({}, {"rdb_bytes": 0}, {"rdb_bytes": True}, {"rdb_bytes": "12"}):
        assert redis.source_size(manifest("redis", details=unknown)) is None

    rabbitmq = get_service("rabbitmq")
    definitions = FileEntry(path="definitions.json", size=48_213, sha256="0" * 64)
    assert rabbitmq.source_size(manifest("rabbitmq", files=[definitions])) == 48_213
    assert rabbitmq.source_size(manifest("rabbitmq")) is None

    gitlab = get_service("gitlab")
    assert gitlab.source_size(manifest("gitlab", details={"measured": {"backup_tar_bytes": 9_000_000,
                                                                       "total_bytes": 9_004_000}})) == 9_000_000
    assert gitlab.source_size(manifest("gitlab", details={})) is None
