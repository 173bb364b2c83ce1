"""Drills of every other service with a restore function, at the runner-function level, on real services.

Each test takes a real backup through the same steps a backup DAG runs (backup, checksum,
offsite upload to a moto bucket), then runs the drill's steps the way dr_drill does:
pick → clean_leftovers → start_target → fetch → restore → verify → teardown → report.
The plan's connections point at the machine's real services (PostgreSQL 5432, Redis 6379,
RabbitMQ 5672) to prove a drill never restores into them.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import Connection

from erp_backup import steps
from erp_backup.drill import records, runner
from erp_backup.drill.report import finish
from erp_backup.drill.targets import ProductionGuard, ProductionTargetRefused
from erp_backup.plan import Plan, load_plan
from erp_backup.scratch import local as scratch_local
from erp_backup.scratch.base import TargetInfo
from erp_backup.scratch.redis import ScratchRedis
from erp_backup.services import get_service
from erp_backup.services.base import RunInfo, airflow_connection
from tests.fixtures.s3 import S3Endpoint
from tests.integration.dagrun import write_plan
from tests.integration.test_drill import only_services, remove_scratch_root, scratch_left

pytestmark = pytest.mark.integration

SHARED = {
    "AIRFLOW_CONN_ERP_POSTGRES": json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "postgres"}),
    "AIRFLOW_CONN_ERP_REDIS": json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": 6379}),
    "AIRFLOW_CONN_ERP_RABBITMQ": json.dumps({"conn_type": "amqp", "host": "127.0.0.1", "port": 5672,
                                             "login": "guest", "password": "guest"}),
}


@dataclasses.dataclass
class Env:
    plan: Plan
    root: Path
    bucket: str
    s3: S3Endpoint


@pytest.fixture
def make_env(tmp_path: Path, s3_endpoint: S3Endpoint, s3_bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Env]]:
    """A plan with only the given services enabled, offsite in a fresh moto bucket, connections to the real services."""
    for name, value in SHARED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", s3_endpoint.conn_json())

    made: list[Env] = []

    def make(*services: str) -> Env:
        bucket = s3_bucket("drill-svc")
        root = tmp_path / "backup"
        root.mkdir(exist_ok=True)
        monkeypatch.setenv("ERP_BACKUP_ROOT", str(root))
        path = write_plan(tmp_path / "plan.yaml", edit=only_services(*services), bucket=bucket, prefix="erp")
        monkeypatch.setenv("ERP_BACKUP_PLAN", str(path))
        made.append(Env(load_plan(path), root, bucket, s3_endpoint))
        return made[-1]

    yield make
    for env in made:
        remove_scratch_root(env.plan)


def back_up(env: Env, service: str, backup_type: str, get_connection: Callable[[str], Any] = airflow_connection,
            options: dict[str, Any] | None = None, age: timedelta = timedelta(hours=1)) -> str:
    """What a backup DAG does: backup, checksum, offsite upload. Returns the backup id."""
    job = env.plan.job(service, backup_type)
    if options:
        job = dataclasses.replace(job, options={**job.options, **options})
    moment = (datetime.now(timezone.utc) - age).replace(microsecond=0)
    run = RunInfo(job.dag_id, f"scheduled__{moment.isoformat()}", moment, logical_date=moment)
    backup_id = steps.backup(env.plan, job, run, get_connection=get_connection)
    steps.checksum(env.plan, job, backup_id)
    steps.offsite_upload(env.plan, job, backup_id)
    return backup_id


def drill(env: Env, params: dict[str, Any], run_id: str | None = None) -> dict[str, Any]:
    """The dr_drill tasks in order, stopping a set's steps at its first failure; teardown always runs."""
    run_id = run_id or f"manual__{uuid.uuid4().hex[:8]}"
    run = RunInfo(dag_id="dr_drill", run_id=run_id, run_after=datetime.now(timezone.utc))
    picks = runner.pick(env.plan, params, run)
    runner.clean_leftovers(env.plan, run_id, "local")
    for chosen in picks:
        try:
            runner.start_target(env.plan, chosen)
            runner.fetch(env.plan, chosen)
            runner.restore(env.plan, chosen)
            runner.verify(env.plan, chosen)
        except Exception:  # recorded in the step records; the report says where it failed
            pass
        finally:
            runner.teardown(env.plan, chosen)
    return finish(env.plan, run_id, notify=False)


def passed(report: dict[str, Any]) -> dict[str, Any]:
    (result,) = report["services"]
    assert report["status"] == "passed", json.dumps(report["services"], indent=2, default=str)
    assert result["rto"]["measured_s"] > 0 and result["sizes"]["fetched_bytes"] == result["sizes"]["set_bytes"]
    return result


def redis_cli(port: int, *args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], input=stdin,
                          capture_output=True, check=True).stdout.decode()


# ───────────── Redis, and the production guard ─────────────


@pytest.fixture
def redis_source(tmp_path: Path) -> Iterator[ScratchRedis]:
    """A Redis holding ERP-like keys in two dbs (the 'production' server being backed up)."""
    server = ScratchRedis(tmp_path / "redis-source").start()
    commands = "".join(f"SET erp:invoice:{i} {i * 7}\n" for i in range(300))
    commands += "HSET erp:tenant:acme plan gold seats 40\nRPUSH erp:queue a b c\nSELECT 2\nSET erp:session:x 1\n"
    redis_cli(server.port, stdin=commands.encode())
    yield server
    server.stop()


def test_redis_drill_restores_into_a_scratch_server_never_the_real_redis(make_env, redis_source: ScratchRedis):
    env = make_env("redis")
    sentinel = f"erp_drill_sentinel_{uuid.uuid4().hex[:8]}"
    redis_cli(6379, "SET", sentinel, "untouched")
    try:
        source = Connection(conn_id="erp_redis", conn_type="redis", host="127.0.0.1", port=redis_source.port)
        backup_id = back_up(env, "redis", "rdb", lambda conn_id: source)
        report = drill(env, {"service": "redis"})
        result = passed(report)
        assert result["backup_id"] == backup_id
        target = records.ServiceState(env.plan, report["run_id"], "redis").target()
        assert target.port not in (6379, redis_source.port) and target.host == "127.0.0.1"
        assert "db0: 302 keys (backup: 302..302)" in result["checks"] and "db2: 1 keys (backup: 1..1)" in result["checks"]
        assert any("sampled keys match" in check for check in result["checks"])
        assert redis_cli(6379, "GET", sentinel).strip() == "untouched"
    finally:
        redis_cli(6379, "DEL", sentinel)
    assert scratch_left(env.plan) == []

    # The guard built from the plan's connections (pointing at the real services) refuses them as targets.
    guard = ProductionGuard.from_plan(env.plan, airflow_connection)
    for port, conn_id in ((6379, "erp_redis"), (5432, "erp_postgres"), (5672, "erp_rabbitmq")):
        with pytest.raises(ProductionTargetRefused, match=f"connection '{conn_id}'"):
            guard.check(TargetInfo("redis", "rdb", "redis", "local", "drill:x", host="localhost", port=port))


@pytest.mark.parametrize(("service", "backup_type", "port"), [
    ("redis", "rdb", 6379), ("postgres", "full", 5432), ("rabbitmq", "definitions", 5672),
])
def test_target_construction_refuses_a_production_port_before_starting_anything(make_env, monkeypatch, service,
                                                                                backup_type, port):
    env = make_env(service)
    monkeypatch.setattr(scratch_local, "free_port", lambda: port)  # as if the kernel handed out the real service's port
    backend = runner.make_backend(env.plan, "local")
    with pytest.raises(ProductionTargetRefused, match="production endpoint of connection"):
        backend.start(get_service(service).scratch_spec(backup_type, {}), service, backup_type, "drill:manual__guard")
    assert scratch_left(env.plan) == []


# ───────────── RabbitMQ ─────────────


def rabbitmqctl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", "--quiet", *args], input=stdin, capture_output=True, check=True)


def test_rabbitmq_drill_imports_the_definitions_into_a_scratch_node(make_env):
    env = make_env("rabbitmq")
    vhost = f"erp_drill_{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_policy", "-p", vhost, "erp-ttl", "^erp\\.", '{"message-ttl": 60000}', "--apply-to", "queues")
        backup_id = back_up(env, "rabbitmq", "definitions")
    finally:
        rabbitmqctl("delete_vhost", vhost)
    report = drill(env, {"service": "rabbitmq"})
    result = passed(report)
    assert result["backup_id"] == backup_id
    target = records.ServiceState(env.plan, report["run_id"], "rabbitmq").target()
    assert target.node.startswith("erpdrill") and target.port != 5672
    assert any(check.startswith("vhosts: ") for check in result["checks"])
    assert any(check.startswith("policies: ") for check in result["checks"])
    # the drill created nothing on the real broker: the backed-up vhost stays deleted there
    assert vhost not in rabbitmqctl("list_vhosts").stdout.decode()
    assert scratch_left(env.plan) == []


# ───────────── Milvus (collection export and etcd snapshot) ─────────────


def build_milvus(path: Path) -> int:
    import numpy as np
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(uri=str(path))
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=8)
    schema.add_field("title", DataType.VARCHAR, max_length=64)
    index = client.prepare_index_params()
    index.add_index(field_name="vec", index_type="AUTOINDEX", metric_type="L2")
    client.create_collection("erp_docs", schema=schema, index_params=index)
    vectors = np.random.default_rng(20261129).random((400, 8), dtype=np.float32)  # distinct: no ties in top-k
    rows = [{"id": i, "vec": vectors[i].tolist(), "title": f"doc {i}", "tenant": i % 3} for i in range(400)]
    client.insert("erp_docs", rows)
    client.flush("erp_docs")
    client.close()
    return len(rows)


def test_milvus_collection_export_and_etcd_snapshot_drills(make_env, tmp_path: Path):
    from erp_backup.scratch.etcd import start_scratch_etcd
    from tests.fixtures.milvus import etcd_put, release_lite

    env = make_env("milvus")
    source_db = tmp_path / "milvus-source" / "erp.db"
    source_db.parent.mkdir()
    rows = build_milvus(source_db)
    etcd = start_scratch_etcd(tmp_path / "etcd-source")
    try:
        for i in range(50):
            etcd_put(etcd.endpoint, f"by-dev/meta/segment/{i:03d}", json.dumps({"rows": i}))
        host, port = etcd.endpoint.split("//")[1].split(":")
        conns = {
            "erp_milvus": Connection(conn_id="erp_milvus", conn_type="generic", extra=json.dumps({"uri": str(source_db)})),
            "milvus_etcd": Connection(conn_id="milvus_etcd", conn_type="generic", host=host, port=int(port)),
        }
        full_id = back_up(env, "milvus", "full", conns.__getitem__)
        release_lite(source_db)
        etcd_id = back_up(env, "milvus", "etcd", conns.__getitem__)
    finally:
        etcd.stop()

    full = passed(drill(env, {"service": "milvus", "backup_id": f"full/{full_id}"}))
    assert f"collection erp_docs: {rows} rows" in full["checks"]
    assert any("sample searches" in check for check in full["checks"])

    snapshot = passed(drill(env, {"service": "milvus", "backup_id": f"etcd/{etcd_id}"}))
    manifest_revision = snapshot["checks"][0]
    assert manifest_revision.startswith("revision ") and manifest_revision.endswith("matches the snapshot")
    assert any(check.startswith("50 live keys") for check in snapshot["checks"])
    assert scratch_left(env.plan) == []


# ───────────── MinIO ─────────────


def test_minio_drill_restores_every_object_into_a_scratch_s3(make_env, s3_bucket, s3_endpoint: S3Endpoint, monkeypatch):
    env = make_env("minio")
    source_bucket = s3_bucket("erp-documents")
    client = s3_endpoint.client()
    objects = {f"invoices/2026/{i:04d}.pdf": (b"%PDF-" + bytes([i % 256]) * (100 + i)) for i in range(40)}
    objects["계약서/견적서 (final).txt"] = "견적".encode() * 100
    for key, body in objects.items():
        client.put_object(Bucket=source_bucket, Key=key, Body=body, ContentType="application/pdf")
    monkeypatch.setenv("AIRFLOW_CONN_ERP_MINIO", s3_endpoint.conn_json())
    backup_id = back_up(env, "minio", "full", options={"buckets": [source_bucket]})

    report = drill(env, {"service": "minio", "backup_id": f"full/{backup_id}"})
    result = passed(report)
    assert any(check.endswith(f": {len(objects)}/{len(objects)} objects match their SHA-256") for check in result["checks"])
    target = records.ServiceState(env.plan, report["run_id"], "minio").target()
    assert target.uri != s3_endpoint.url and target.port != int(s3_endpoint.url.rsplit(":", 1)[1])
    assert scratch_left(env.plan) == []


# ───────────── GitLab: prepared, not restored ─────────────


def test_gitlab_drill_is_reported_as_prepared_not_restored(make_env, tmp_path: Path):
    from tests.integration.test_gitlab_local import StandinHost

    env = make_env("gitlab")
    host = StandinHost(tmp_path)
    backup_id = back_up(env, "gitlab", "full", lambda conn_id: pytest.fail("local mode needs no connection"),
                        options=host.options())
    report = drill(env, {"service": "gitlab"})
    (result,) = report["services"]
    assert report["status"] == "passed" and result["status"] == "prepared" and result["backup_id"] == backup_id
    assert result["rto"]["measured_s"] is None and "no RTO was measured" in result["rto"]["note"]
    assert any("SHA-256 matches the manifest" in check for check in result["checks"])
    assert any(check.startswith("GitLab itself was not restored") and "gitlab_restore.sh" in check
               for check in result["checks"])
    markdown = Path(report["report_files"]["markdown"]).read_text()
    assert "Prepared, not restored" in markdown and "| gitlab | full/" in markdown and "| prepared |" in markdown
    assert scratch_left(env.plan) == []


# ───────────── PostgreSQL point-in-time restore ─────────────


def test_postgres_pitr_drill_recovers_to_the_target_time(make_env, archiving_pg_factory):
    import psycopg

    from erp_backup.checksum import verify_and_seal
    from erp_backup.offsite import offsite_from_plan
    from erp_backup.services.postgres import snapshot as postgres_snapshot
    from erp_backup.services.postgres import wal as postgres_wal
    from tests.fixtures.pitr import manual_run, postgres_job, take_backup, wal_job, wal_run

    env = make_env("postgres")
    pg = archiving_pg_factory()
    window_start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)
    pg.sql("CREATE TABLE ledger (id bigserial PRIMARY KEY, phase text NOT NULL)")
    pg.sql("INSERT INTO ledger (phase) VALUES ('before-base')")
    base_set, _ = take_backup(postgres_snapshot, postgres_job("snapshot"), pg.root,
                              manual_run("backup_postgres_snapshot"), pg.connection())
    pg.sql("INSERT INTO ledger (phase) SELECT 't1' FROM generate_series(1, 10)")
    pg.switch_wal()
    target_time = pg.sql("SELECT clock_timestamp()")[0][0]
    pg.sql("INSERT INTO ledger (phase) SELECT 't2' FROM generate_series(1, 10)")
    pg.switch_wal()
    wal_set, _ = take_backup(postgres_wal, wal_job(pg.root), pg.root, wal_run(window_start, datetime.now(timezone.utc)),
                             pg.connection())
    store = offsite_from_plan(env.plan)
    for backup_set, check in ((base_set, postgres_snapshot.verify), (wal_set, postgres_wal.verify)):
        verify_and_seal(backup_set, deep_verify=check)
        store.upload_set(backup_set)

    report = drill(env, {"service": "postgres", "target_time": target_time.isoformat(), "keep_scratch": True})
    try:
        result = passed(report)
        assert result["pitr"]["base_backup_id"] == base_set.backup_id and result["pitr"]["wal_sets"] == [wal_set.backup_id]
        assert "recovery finished and the cluster was promoted" in result["checks"]
        assert result["sizes"]["set_bytes"] == base_set.manifest().total_size + wal_set.manifest().total_size
        target = records.ServiceState(env.plan, report["run_id"], "postgres").target()
        with psycopg.connect(f"host=127.0.0.1 port={target.port} user=postgres dbname=postgres") as conn:
            phases = dict(conn.execute("SELECT phase, count(*) FROM ledger GROUP BY phase").fetchall())
        assert phases == {"before-base": 1, "t1": 10}  # as of the target: before t2
    finally:
        runner.clean_leftovers(env.plan, "manual__after-pitr", "local")
    assert scratch_left(env.plan) == []
