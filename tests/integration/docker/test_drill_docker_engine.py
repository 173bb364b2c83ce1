"""dr_drill with backend=docker on a real Docker engine (tests/fixtures/docker_engine.py).

The scratch PostgreSQL is the locally built erp-local/postgres:15 (plan `drill.docker`,
pull: never, so nothing can come from a registry). The drill's backup and offsite copy
are the ones of tests/integration/test_drill.py (its `pg_backup` and `drill` fixtures).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from erp_backup.drill import records, runner
from erp_backup.drill.targets import DRILL_LABEL, DockerBackend, LocalBackend, ProductionGuard
from erp_backup.plan import DrillDockerPlan, load_plan
from erp_backup.services import get_service
from tests.fixtures.docker_engine import SOCKET as SOCKET_PATH
from tests.fixtures.docker_engine import DockerEngine
from tests.integration.dagrun import run_dag
from tests.integration.test_drill import (  # noqa: F401  (fixtures)
    DB,
    Drill,
    conf,
    drill,
    pg_backup,
    scratch_left,
    soon,
    task_states,
)

# The first test to use `docker_images` may carry a cold build of every image (about 15 min on 2 cores,
# more under load), longer than pytest.ini's 900 s per test.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2700)]

ROOT = Path(__file__).resolve().parents[3]
DOCKER_IMAGES = {"postgres": "erp-local/postgres:{tag}", "rabbitmq": "erp-local/rabbitmq:{tag}",
                 "proxy": "erp-local/socat:1"}


def labelled(engine: DockerEngine, run_id: str | None = None) -> list[str]:
    """Every container and network of any drill (or of drill `run_id`) on the engine."""
    label = [f"{DRILL_LABEL}={run_id}" if run_id else DRILL_LABEL]
    containers = [c["Names"][0] for c in engine.api.containers(all=True, filters={"label": label})]
    networks = [n["Name"] for n in engine.api.networks(filters={"label": label})]
    return containers + networks


def volumes(engine: DockerEngine) -> set[str]:
    return {v["Name"] for v in engine.api.volumes().get("Volumes") or []}


@pytest.fixture
def docker_drill(drill: Drill, docker_engine: DockerEngine, docker_images: dict[str, str],  # noqa: F811
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[Drill]:
    """The `drill` fixture's plan with the local images and pull: never, on the tests' engine."""
    data = yaml.safe_load(drill.plan.path.read_text())
    data["drill"]["docker"] = {"pull": "never", "images": DOCKER_IMAGES}
    path = drill.plan.path.with_name("plan-docker.yaml")  # a new path: plans are cached by path
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(path))
    monkeypatch.setenv("ERP_DRILL_DOCKER_URL", docker_engine.url)
    monkeypatch.delenv("ERP_DRILL_WORKER_CONTAINER", raising=False)
    drill.plan = load_plan(path)
    before = volumes(docker_engine)
    assert labelled(docker_engine) == []
    yield drill
    assert labelled(docker_engine) == [] and volumes(docker_engine) == before


def test_a_docker_drill_restores_into_the_local_image_and_leaves_nothing(dagbag, airflow_db, docker_drill: Drill,
                                                                         docker_engine: DockerEngine):
    dag_run, _ = run_dag(dagbag, "dr_drill", soon(21), retries=0, conf=conf(backend="docker"))
    states = task_states(dag_run)
    assert set(states.values()) == {"success"} and dag_run.state == "success", states
    (result,) = docker_drill.report(dag_run.run_id)["services"]
    assert result["restore_summary"]["rows_checked"] == docker_drill.backup.table_rows() > 1000
    target = records.ServiceState(docker_drill.plan, dag_run.run_id, "postgres").target()
    assert target is not None and (target.backend, target.image) == ("docker", "erp-local/postgres:15")
    assert target.host == "127.0.0.1" and target.container and target.network == target.container
    assert target.proxy == f"{target.container}-proxy"
    assert scratch_left(docker_drill.plan) == []


def test_a_failed_restore_in_a_container_is_torn_down(dagbag, airflow_db, docker_drill: Drill):
    def point_dump_at_globals(data: dict) -> None:
        data["details"]["databases"][DB]["file"] = data["details"]["globals"]["file"]  # pg_restore gets plain SQL

    docker_drill.edit_offsite_manifest(point_dump_at_globals)
    dag_run, _ = run_dag(dagbag, "dr_drill", soon(22), retries=0, conf=conf(backend="docker"))
    states = task_states(dag_run)
    assert states["drill.start_target"] == "success" and states["drill.restore"] == "failed"
    assert states["drill.teardown"] == "success" and dag_run.state == "failed"
    done = records.ServiceState(docker_drill.plan, dag_run.run_id, "postgres").read("teardown")["done"]
    assert any(line.startswith("removed container erp-drill-") for line in done)
    assert any(line.startswith("removed network erp-drill-") for line in done)


KILLED_WORKER = """
import json, sys, time
from erp_backup.drill import runner
from erp_backup.plan import DrillDockerPlan, load_plan
from erp_backup.services import get_service
plan = load_plan(sys.argv[1])
backend = runner.make_backend(plan, "docker", lambda conn_id: (_ for _ in ()).throw(LookupError(conn_id)))
info = backend.start(get_service("postgres").scratch_spec("full", {}), "postgres", "full", "drill:scheduled__killed",
                     run_id="scheduled__killed")
print("TARGET " + json.dumps(info.as_dict()), flush=True)
time.sleep(600)
"""


def test_a_sigkilled_workers_target_is_removed_by_the_next_runs_clean_leftovers(docker_drill: Drill,
                                                                              docker_engine: DockerEngine):
    worker = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(docker_drill.plan.path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT}"})
    try:
        assert worker.stdout is not None
        line = next((line for line in worker.stdout if line.startswith("TARGET ")), "")  # logs go to stdout too
        assert line, f"the worker exited {worker.poll()} before starting its target"
        target = json.loads(line.removeprefix("TARGET "))
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    assert docker_engine.api.inspect_container(target["container"])["State"]["Running"] is True
    proxy = target["proxy"]
    assert proxy and docker_engine.api.inspect_container(proxy)["State"]["Running"] is True
    assert sorted(labelled(docker_engine)) == sorted([f"/{target['container']}", f"/{proxy}", target["network"], proxy])

    removed = runner.clean_leftovers(docker_drill.plan, "scheduled__next", "docker")
    assert f"container /{target['container']} (drill scheduled__killed)" in removed
    assert f"network {target['network']} (drill scheduled__killed)" in removed
    assert {f"container /{proxy} (drill scheduled__killed)", f"network {proxy} (drill scheduled__killed)"} <= set(removed)
    assert labelled(docker_engine) == []


@pytest.fixture(scope="module")
def production(docker_engine: DockerEngine, docker_images: dict[str, str]) -> Iterator[dict[str, str]]:
    """A stand-in production server (erp-local/redis) on its own network, as in the seed's deployment."""
    api = docker_engine.api
    api.create_network("erp-test-prod", driver="bridge")
    api.create_container(docker_images["redis"], name="erp-test-prod-redis",
                         host_config=api.create_host_config(network_mode="erp-test-prod"))
    api.start("erp-test-prod-redis")
    address = api.inspect_container("erp-test-prod-redis")["NetworkSettings"]["Networks"]["erp-test-prod"]["IPAddress"]
    try:
        yield {"name": "erp-test-prod-redis", "address": address, "network": "erp-test-prod"}
    finally:
        api.remove_container("erp-test-prod-redis", force=True, v=True)
        api.remove_network("erp-test-prod")


def connects(engine: DockerEngine, container: str, host: str, port: int) -> bool:
    """Whether a TCP connection from inside `container` to host:port succeeds within 5 s."""
    exec_id = engine.api.exec_create(container, ["timeout", "5", "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"])
    engine.api.exec_start(exec_id)
    return engine.api.exec_inspect(exec_id)["ExitCode"] == 0


@pytest.fixture(scope="module")
def docker_target(docker_engine: DockerEngine, docker_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """One scratch PostgreSQL target of the docker backend, shared by the isolation tests."""
    guard = ProductionGuard([])
    backend = DockerBackend(docker_engine.api, guard, LocalBackend(tmp_path_factory.mktemp("scratch"), guard),
                            docker_plan=DrillDockerPlan(pull="never", images=DOCKER_IMAGES))
    info = backend.start(get_service("postgres").scratch_spec("full", {}), "postgres", "full", "drill:manual__iso",
                         run_id="manual__iso")
    yield info
    backend.stop(info)
    assert labelled(docker_engine) == []


def test_the_forwarder_publishes_on_loopback_only_and_the_target_cannot_resolve_production(
        docker_engine: DockerEngine, docker_target, production: dict[str, str]):
    api = docker_engine.api
    assert not any(api.inspect_container(docker_target.container)["NetworkSettings"]["Ports"].values())
    ports = api.inspect_container(docker_target.proxy)["NetworkSettings"]["Ports"]
    assert ports == {"5432/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(docker_target.port)}]}
    assert api.inspect_network(docker_target.network)["Internal"] is True
    assert connects(docker_engine, docker_target.container, "127.0.0.1", 5432)  # the probe itself works
    assert connects(docker_engine, production["name"], production["name"], 6379)  # production listens
    assert not connects(docker_engine, docker_target.container, production["name"], 6379)


def test_the_target_cannot_reach_production_by_address(docker_engine: DockerEngine, docker_target,
                                                       production: dict[str, str]):
    """Its only network is internal: Docker's iptables rules drop whatever leaves its subnet."""
    assert connects(docker_engine, production["name"], production["address"], 6379)  # the address is right
    assert not connects(docker_engine, docker_target.container, production["address"], 6379)
    proxy_gateway = docker_engine.api.inspect_network(docker_target.proxy)["IPAM"]["Config"][0]["Gateway"]
    assert not connects(docker_engine, docker_target.container, proxy_gateway, docker_target.port)  # nor the host


IN_CONTAINER_WORKER = """
import json, psycopg
from erp_backup.drill.targets import DockerBackend, LocalBackend, ProductionGuard
from erp_backup.plan import DrillDockerPlan
from erp_backup.services import get_service
guard = ProductionGuard([])
backend = DockerBackend.from_env(guard, LocalBackend("/tmp", guard),
                                 DrillDockerPlan(pull="never", images={"postgres": "erp-local/postgres:{tag}",
                                                                       "proxy": "erp-local/socat:1"}))
info = backend.start(get_service("postgres").scratch_spec("full", {}), "postgres", "full", "drill:manual__in",
                     run_id="manual__in")
network = backend.api.inspect_network(info.network)
with psycopg.connect(info.pg_conninfo, connect_timeout=10) as conn:
    answer = conn.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone()[0]
done = backend.stop(info)
print(json.dumps({"host": info.host, "port": info.port, "container": info.container, "internal": network["Internal"],
                  "worker": info.worker_container, "major": answer, "done": done}))
"""


def test_a_worker_in_a_container_joins_the_drill_network_and_reaches_the_target_by_name(
        docker_engine: DockerEngine, docker_images: dict[str, str]):
    """The compose case: the worker runs in the project's image with the engine's socket, ERP_DRILL_WORKER_CONTAINER=auto."""
    api = docker_engine.api
    api.create_network("erp-test-workers", driver="bridge")
    worker = api.create_container(
        docker_images["airflow"], ["python", "-c", IN_CONTAINER_WORKER], user="50000:0",  # group_add as in compose
        environment={"ERP_DRILL_WORKER_CONTAINER": "auto", "ERP_DRILL_DOCKER_URL": "unix:///var/run/docker.sock",
                     "PYTHONPATH": "/opt/airflow/plugins"},
        host_config=api.create_host_config(network_mode="erp-test-workers", group_add=[SOCKET_PATH.stat().st_gid], binds={
            str(SOCKET_PATH): {"bind": "/var/run/docker.sock", "mode": "rw"},
            str(ROOT / "plugins"): {"bind": "/opt/airflow/plugins", "mode": "ro"},
            str(ROOT / "include"): {"bind": "/opt/airflow/include", "mode": "ro"}}),
    )
    try:
        api.start(worker)
        code = api.wait(worker, timeout=240)["StatusCode"]
        out, err = api.logs(worker, stderr=False).decode(), api.logs(worker, stdout=False).decode()
        assert code == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["host"] == result["container"] and result["port"] == 5432 and result["internal"] is True
        assert result["worker"] == worker["Id"][:12] and result["major"] == 15
        assert result["done"] == [f"removed container {result['container']}",
                                  f"disconnected {result['worker']} from {result['container']}",
                                  f"removed network {result['container']}"]
        assert labelled(docker_engine, "manual__in") == []
        assert list(api.inspect_container(worker)["NetworkSettings"]["Networks"]) == ["erp-test-workers"]
    finally:
        api.remove_container(worker, force=True, v=True)
        api.remove_network("erp-test-workers")
