"""Redis, RabbitMQ and the GitLab stand-in in containers of the tests' engine.

- Redis (erp-local/redis, password from a config on stdin, as in docker-compose.yaml): `redis-cli
  --rdb` from the worker through the port published on 127.0.0.1 (the Redis service has no
  docker-exec mode), restored into a scratch server and compared key by key.

- RabbitMQ (erp-local/rabbitmq, management plugin): definitions exported with `rabbitmqctl` by
  `docker exec`, restored into a scratch container of the drill's docker backend over its
  management API, and checked with the drill's `check_restored`.
- GitLab: tests/fixtures/gitlab_standin (bash scripts with GitLab's interface) in a container
  named ops-gitlab; `gitlab-backup create` runs by `docker exec` and the archive is copied out
  with `get_archive`.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from airflow.sdk import Connection
from pyrage import x25519

from erp_backup import steps
from erp_backup.drill.targets import DRILL_LABEL, DockerBackend, LocalBackend, ProductionGuard
from erp_backup.plan import DrillDockerPlan, load_plan
from erp_backup.services import get_service
from erp_backup.scratch.redis import ScratchRedis
from erp_backup.services import rabbitmq as svc
from erp_backup.services import redis as redis_svc
from erp_backup.sealing import unsealed_copy
from erp_backup.services.base import CheckContext, RunInfo
from erp_backup.sets import SetState
from tests.conftest import AGE_KEYS
from tests.fixtures.docker_engine import DockerEngine
from tests.fixtures.factories import make_backup_context, make_manifest
from tests.integration.test_gitlab_local import StandinHost

# The first test to use `docker_images` may carry a cold build of every image (about 15 min on 2 cores,
# more under load), longer than pytest.ini's 900 s per test.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2700)]

NETWORK = "erp-test-services"


@pytest.fixture(scope="module")
def services_network(docker_engine: DockerEngine) -> Iterator[str]:
    docker_engine.api.create_network(NETWORK, driver="bridge")
    yield NETWORK
    docker_engine.api.remove_network(NETWORK)


def exec_code(engine: DockerEngine, container: str, *argv: str) -> int:
    exec_id = engine.api.exec_create(container, list(argv))
    engine.api.exec_start(exec_id)
    return engine.api.exec_inspect(exec_id)["ExitCode"]


def exec_ok(engine: DockerEngine, container: str, *argv: str, stdin_text: str | None = None) -> str:
    command = ["sh", "-c", f"printf '%s\\n' '{stdin_text}' | {' '.join(argv)}"] if stdin_text else list(argv)
    exec_id = engine.api.exec_create(container, command)
    out = engine.api.exec_start(exec_id)
    code = engine.api.exec_inspect(exec_id)["ExitCode"]
    assert code == 0, f"{argv}: {out.decode(errors='replace')}"
    return out.decode()


# ───────────── Redis ─────────────


def test_redis_in_a_container_backs_up_over_its_loopback_port_and_restores_exactly(
        docker_engine: DockerEngine, docker_images: dict[str, str], services_network: str, tmp_path: Path):
    api, name, password = docker_engine.api, "erp-redis", uuid.uuid4().hex
    api.create_container(
        docker_images["redis"], ["sh", "-c", 'printf "requirepass %s\\nbind 0.0.0.0\\n" "$REDISCLI_AUTH" | exec redis-server -'],
        name=name, environment={"REDISCLI_AUTH": password}, ports=[6379],
        host_config=api.create_host_config(network_mode=services_network, port_bindings={6379: ("127.0.0.1", None)}))
    try:
        api.start(name)
        port = int(api.port(name, 6379)[0]["HostPort"])
        assert password not in json.dumps(api.inspect_container(name)["Args"])  # the secret is not in argv
        deadline = time.monotonic() + 30
        while exec_code(docker_engine, name, "redis-cli", "ping") != 0:
            assert time.monotonic() < deadline, api.logs(name).decode(errors="replace")
            time.sleep(0.3)
        exec_ok(docker_engine, name, "sh", "-c", "for i in $(seq 1 50); do redis-cli SET order:$i total=$i >/dev/null; done;"
                " redis-cli -n 3 HSET tenant:acme seats 40 >/dev/null")
        started = datetime.now(timezone.utc)
        conn = Connection(conn_id="erp_redis", conn_type="redis", host="127.0.0.1", port=port, password=password)
        ctx = make_backup_context(tmp_path / "staging", service="redis", backup_type="rdb",
                                  run=RunInfo("backup_redis_rdb", "manual", started), backup_id="20261203T031500Z",
                                  connection=conn)
        outcome = redis_svc.backup(ctx)
        manifest = make_manifest(context=ctx, outcome=outcome, captured_started_at=started,
                                 captured_finished_at=datetime.now(timezone.utc))
    finally:
        api.remove_container(name, force=True, v=True)
    assert manifest.details["keyspace"]["0"]["keys"] == 50 and manifest.details["keyspace"]["3"]["keys"] == 1
    assert redis_svc.verify(ctx.backup_set, manifest) == []
    scratch = ScratchRedis(tmp_path / "scratch")
    try:
        report = redis_svc.restore(ctx.backup_set.path, manifest, scratch)
        assert report.ok and report.problems == [] and report.restored_bytes == manifest.details["rdb_bytes"]
        get = ["redis-cli", "-h", "127.0.0.1", "-p", str(scratch.port)]
        assert subprocess.run([*get, "GET", "order:42"], capture_output=True, check=True).stdout.strip() == b"total=42"
        assert subprocess.run([*get, "-n", "3", "HGET", "tenant:acme", "seats"], capture_output=True,
                              check=True).stdout.strip() == b"40"
    finally:
        scratch.stop()


# ───────────── RabbitMQ ─────────────


@pytest.fixture(scope="module")
def erp_rabbitmq(docker_engine: DockerEngine, docker_images: dict[str, str], services_network: str) -> Iterator[str]:
    api, name = docker_engine.api, "erp-rabbitmq"
    api.create_container(docker_images["rabbitmq"], name=name, hostname=name,
                         environment={"RABBITMQ_DEFAULT_USER": "erp", "RABBITMQ_DEFAULT_PASS": uuid.uuid4().hex},
                         host_config=api.create_host_config(network_mode=services_network))
    try:
        api.start(name)
        deadline = time.monotonic() + 120
        while not exec_code(docker_engine, name, "rabbitmqctl", "--quiet", "await_startup", "--timeout", "5") == 0:
            assert time.monotonic() < deadline, api.logs(name).decode(errors="replace")[-2000:]
            time.sleep(1)
        yield name
    finally:
        api.remove_container(name, force=True, v=True)


def test_rabbitmq_definitions_by_docker_exec_restore_into_a_scratch_container(
        erp_rabbitmq: str, docker_engine: DockerEngine, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", docker_engine.url)
    vhost, password = f"erp_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    for argv in (("add_vhost", vhost), ("set_permissions", "-p", vhost, "erp", ".*", ".*", ".*"),
                 ("set_policy", "-p", vhost, "erp-ttl", "^erp\\.", '{"message-ttl": 60000}', "--apply-to", "queues")):
        exec_ok(docker_engine, erp_rabbitmq, "rabbitmqctl", "--quiet", *argv)
    exec_ok(docker_engine, erp_rabbitmq, "rabbitmqctl", "--quiet", "add_user", vhost, stdin_text=password)
    topology = json.dumps({"queues": [{"name": "erp.orders", "vhost": vhost, "durable": True, "auto_delete": False,
                                       "arguments": {"x-queue-type": "classic"}}]})
    exec_ok(docker_engine, erp_rabbitmq, "sh", "-c",
            f"echo '{topology}' > /tmp/t.json && rabbitmqctl --quiet import_definitions /tmp/t.json")

    started = datetime.now(timezone.utc)
    conn = Connection(conn_id="erp_rabbitmq", conn_type="amqp", host=erp_rabbitmq, port=5672)
    ctx = make_backup_context(tmp_path, service="rabbitmq", backup_type="definitions",
                              options={"exec_mode": "docker", "container": erp_rabbitmq},
                              run=RunInfo("backup_rabbitmq_definitions", "manual", started),
                              backup_id="20261203T034500Z", connection=conn)
    outcome = svc.backup(ctx)
    manifest = make_manifest(context=ctx, outcome=outcome, captured_started_at=started,
                             captured_finished_at=datetime.now(timezone.utc))
    assert manifest.source["version"] == "3.10.8" and vhost in manifest.details["vhosts"]
    assert svc.verify(ctx.backup_set, manifest) == []

    guard = ProductionGuard([])
    backend = DockerBackend(docker_engine.api, guard, LocalBackend(tmp_path / "scratch", guard),
                            docker_plan=DrillDockerPlan(pull="never", images={"rabbitmq": "erp-local/rabbitmq:{tag}",
                                                                             "proxy": "erp-local/socat:1"}))
    spec = get_service("rabbitmq").scratch_spec("definitions", {"rabbitmq": manifest.source["version"]})
    info = backend.start(spec, "rabbitmq", "definitions", "drill:manual__mq", run_id="manual__mq")
    try:
        assert info.image == "erp-local/rabbitmq:3.10-management" and info.host == "127.0.0.1"
        target = get_service("rabbitmq").scratch_target(info)
        report = svc.restore(ctx.backup_set.path, manifest, target)
        assert report.ok and report.details["missing"] == {}
        checks = svc.check_restored(target, ctx.backup_set.path, manifest, report,
                                    CheckContext(guard=lambda host, port: None))
        assert checks.problems == [] and checks.checks, checks
        restored = svc._Broker(target, "scratch").export()  # what the scratch broker now holds
        assert [q["name"] for q in restored["queues"] if q["vhost"] == vhost] == ["erp.orders"]
        assert [p["name"] for p in restored["policies"] if p["vhost"] == vhost] == ["erp-ttl"]
        assert vhost in [u["name"] for u in restored["users"]]
    finally:
        backend.stop(info)
    assert docker_engine.api.containers(all=True, filters={"label": [DRILL_LABEL]}) == []


# ───────────── GitLab stand-in ─────────────


@pytest.fixture
def ops_gitlab(docker_engine: DockerEngine, docker_images: dict[str, str], services_network: str,
               tmp_path: Path) -> Iterator[StandinHost]:
    """The stand-in host copied to tmp_path and mounted at the same path in a container named ops-gitlab."""
    host = StandinHost(tmp_path)
    api = docker_engine.api
    api.create_container("erp-local/base:bookworm", ["sleep", "infinity"], name="ops-gitlab",
                         host_config=api.create_host_config(network_mode=services_network, init=True,
                                                            binds={str(host.home): {"bind": str(host.home), "mode": "rw"}}))
    try:
        api.start("ops-gitlab")
        yield host
    finally:
        api.remove_container("ops-gitlab", force=True, v=True)


def test_gitlab_backup_runs_through_the_docker_api_and_its_archive_is_copied_out(
        ops_gitlab: StandinHost, docker_engine: DockerEngine, tmp_path: Path):
    options = {**ops_gitlab.options(compression="none"), "exec_mode": "docker", "container": "ops-gitlab",
               "docker_url": docker_engine.url}
    plan = replace(load_plan(), backup_root=tmp_path / "backup")
    job = replace(plan.job("gitlab", "full"), options=options)
    run = RunInfo(dag_id="backup_gitlab_full", run_id="manual__docker", run_after=datetime.now(timezone.utc))
    backup_id = steps.backup(plan, job, run, get_connection=lambda conn_id: pytest.fail("docker_url is an option"))
    backup_set = steps.backup_set_for(plan, job, backup_id)
    steps.checksum(plan, job, backup_id)
    assert backup_set.state is SetState.VERIFIED

    # The set is sealed (encrypt: true by default): read it as a restore does, decrypted with the identity.
    clear_dir, manifest = unsealed_copy(backup_set.path, backup_set.manifest(), tmp_path / "clear",
                                        lambda: [x25519.Identity.from_str(AGE_KEYS.identity)])
    gitlab_id = manifest.details["gitlab_backup_id"]
    assert manifest.source["exec_mode"] == "docker" and manifest.source["container"] == "ops-gitlab"
    assert list(ops_gitlab.backups.iterdir()) == []  # GitLab's tar is removed once our copy is safe
    create = next(line for line in ops_gitlab.log_lines() if line.startswith("gitlab-backup create"))
    assert create.startswith("gitlab-backup create STRATEGY=copy CRON=1 ")
    with tarfile.open(clear_dir / f"{gitlab_id}_gitlab_backup.tar") as archive:
        dump = archive.extractfile("db/database.sql.gz")
        assert dump is not None
        assert gzip.decompress(dump.read()) == (ops_gitlab.data / "db" / "database.sql").read_bytes()
