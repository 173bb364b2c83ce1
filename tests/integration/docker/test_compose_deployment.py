"""docker-compose.yaml started for real: the same DAGs under CeleryExecutor.

The stack is docker-compose.yaml plus tests/compose/docker-compose.test.yaml (local
images, simple auth manager, a test plan, moto as the offsite S3), run by Debian's
docker-compose 1.29 on the tests' private engine:

- Airflow: metadata PostgreSQL, Redis broker, api-server, scheduler, dag-processor,
  triggerer, the default Celery worker, the backup-queue worker and the drill-queue
  worker (airflow-init first).
- ERP (`erp` profile): erp-postgres with the sample data, erp-redis, erp-rabbitmq and
  erp-milvus-etcd. MinIO and Milvus have no image here (docs/deployment.md).

Through the REST API (/api/v2 with a JWT from /auth/token) the test runs
`backup_postgres_full`, then `dr_drill` for PostgreSQL with the docker backend (its
scratch container on the engine the drill worker reaches through the mounted
socket). It checks that every backup task ran on the backup-queue worker, which holds
no age identity, and every drill task on the drill-queue worker, the only one that
holds it. It ends with `down -v`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
import yaml

from erp_backup.drill.targets import DRILL_LABEL
from tests.conftest import AGE_KEYS
from tests.fixtures.docker_engine import SOCKET, DockerEngine
from tests.fixtures.polling import poll

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2700)]

ROOT = Path(__file__).resolve().parents[3]
OVERRIDE = ROOT / "tests" / "compose" / "docker-compose.test.yaml"
SAMPLE_SQL = ROOT / "include" / "estate" / "erp_sample.sql"
PROJECT = "erp-compose-test"
COMPOSE = "/usr/bin/docker-compose"  # Debian's 1.29
BUCKET = "compose-backups"
S3_KEY, S3_SECRET, REGION = "compose-test", "compose-test-secret", "us-east-1"
SERVICES = ["postgres", "redis", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer", "airflow-worker", "airflow-worker-backup", "airflow-worker-drill",
            "erp-postgres", "erp-redis", "erp-rabbitmq", "erp-milvus-etcd", "moto"]
RUN_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compose_env(engine: DockerEngine, workdir: Path, api_port: int, passwords: dict[str, str]) -> dict[str, str]:
    """Every variable of .env.example, filled for this run (connections as JSON)."""
    def conn(**fields: Any) -> str:
        return json.dumps(fields)

    s3 = conn(conn_type="aws", login=S3_KEY, password=S3_SECRET,
              extra={"endpoint_url": "http://moto:5000", "region_name": REGION})
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ERP_", "_AIRFLOW"))},
        "DOCKER_HOST": engine.url,
        "ERP_TEST_DIR": str(workdir),
        "AIRFLOW_UID": "50000",
        "AIRFLOW_IMAGE_NAME": "all-erp/airflow-backup:3.3.2",
        "AIRFLOW_BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW_API_BIND": "127.0.0.1",
        "AIRFLOW_API_PORT": str(api_port),
        "AIRFLOW_DB_PASSWORD": passwords["airflow_db"],
        "AIRFLOW_REDIS_PASSWORD": passwords["airflow_redis"],
        "AIRFLOW_FERNET_KEY": passwords["fernet"],
        "AIRFLOW_JWT_SECRET": passwords["jwt"],
        "AIRFLOW_API_SECRET_KEY": passwords["api"],
        "_AIRFLOW_WWW_USER_USERNAME": "admin",
        "_AIRFLOW_WWW_USER_PASSWORD": passwords["admin"],
        # Nothing listens there: an alert would fail, and a callback never raises.
        "AIRFLOW_CONN_SLACK_BACKUP_ALERTS": conn(conn_type="slackwebhook", password="http://127.0.0.1:9/compose-test"),
        "AIRFLOW_CONN_ERP_POSTGRES": conn(conn_type="postgres", host="erp-postgres", port=5432, login="postgres",
                                          password=passwords["erp_postgres"], schema="erp"),
        "AIRFLOW_CONN_BACKUP_OFFSITE": s3,
        "AIRFLOW_CONN_BACKUP_OFFSITE_PRUNE": s3,
        **AGE_KEYS.env(),
        "AIRFLOW_CONN_ERP_MINIO": s3,
        "AIRFLOW_CONN_ERP_MILVUS": conn(conn_type="generic", host="erp-milvus", port=19530),
        "AIRFLOW_CONN_MILVUS_ETCD": conn(conn_type="generic", host="erp-milvus-etcd", port=2379),
        "AIRFLOW_CONN_OPS_GITLAB": conn(conn_type="generic", host="ops-gitlab"),
        "AIRFLOW_CONN_ERP_REDIS": conn(conn_type="redis", host="erp-redis", port=6379, password=passwords["erp_redis"]),
        "AIRFLOW_CONN_ERP_RABBITMQ": conn(conn_type="http", host="erp-rabbitmq", port=15672, login="erp-admin",
                                          password=passwords["erp_rabbitmq"]),
        "ERP_BACKUP_HOST_DIR": str(workdir / "backup"),
        "DOCKER_SOCKET": str(SOCKET),
        "DOCKER_GID": str(SOCKET.stat().st_gid),
        "ERP_POSTGRES_PASSWORD": passwords["erp_postgres"],
        "ERP_MINIO_ROOT_PASSWORD": "unused-no-minio-image",
        "ERP_MILVUS_MINIO_USER": "unused",
        "ERP_MILVUS_MINIO_PASSWORD": "unused-no-minio-image",
        "ERP_REDIS_PASSWORD": passwords["erp_redis"],
        "ERP_RABBITMQ_PASSWORD": passwords["erp_rabbitmq"],
    }


def write_test_plan(path: Path) -> None:
    """The committed plan with the test's bucket and the drill's local images (pull: never)."""
    data = yaml.safe_load((ROOT / "include" / "backup_plan.yaml").read_text())
    data["offsite"].update(bucket=BUCKET, prefix="compose")
    data["drill"]["docker"] = {"pull": "never", "images": {"postgres": "erp-local/postgres:{tag}",
                                                          "rabbitmq": "erp-local/rabbitmq:{tag}",
                                                          "proxy": "erp-local/socat:1"}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    path.chmod(0o644)


@dataclass
class Stack:
    engine: DockerEngine
    env: dict[str, str]
    api_url: str
    s3_url: str
    admin_password: str
    workdir: Path
    timings: dict[str, float]

    def compose(self, *args: str, stdin: bytes | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        argv = [COMPOSE, "--project-name", PROJECT, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yaml"),
                "-f", str(OVERRIDE), "--profile", "erp", *args]
        return subprocess.run(argv, env=self.env, input=stdin, capture_output=True, timeout=timeout)

    def container(self, service: str) -> dict[str, Any]:
        found = self.engine.api.containers(all=True, filters={"label": [f"com.docker.compose.project={PROJECT}",
                                                                        f"com.docker.compose.service={service}"]})
        assert len(found) == 1, f"{service}: {len(found)} containers"
        return self.engine.api.inspect_container(found[0]["Id"])

    def logs(self, service: str, tail: int = 60) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), service).stdout.decode(errors="replace")

    def token(self) -> str:
        response = requests.post(f"{self.api_url}/auth/token", json={"username": "admin", "password": self.admin_password},
                                 timeout=30)
        assert response.status_code in (200, 201), response.text
        return response.json()["access_token"]

    def api(self, method: str, path: str, token: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, f"{self.api_url}/api/v2{path}", headers={"Authorization": f"Bearer {token}"},
                                timeout=30, **kwargs)


def wait_for(what: str, check, timeout: float, stack: Stack, service: str, interval: float = 2.0) -> Any:
    result = poll(check, timeout, interval, ignore=(requests.RequestException, OSError))
    if not result:
        pytest.fail(f"{what}: not within {timeout:.0f} s; {service} says:\n{stack.logs(service)}")
    return result


def project_leftovers(engine: DockerEngine) -> list[str]:
    label = [f"com.docker.compose.project={PROJECT}"]
    return ([c["Names"][0] for c in engine.api.containers(all=True, filters={"label": label})]
            + [n["Name"] for n in engine.api.networks(filters={"label": label})]
            + [v["Name"] for v in engine.api.volumes(filters={"label": label}).get("Volumes") or []])


@pytest.fixture(scope="module")
def stack(docker_engine: DockerEngine, docker_images: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from cryptography.fernet import Fernet

    assert project_leftovers(docker_engine) == [], "a previous run left its stack: docker-compose down -v"
    workdir = tmp_path_factory.mktemp("compose")
    workdir.chmod(0o755)
    for name in ("logs", "config", "backup"):
        (workdir / name).mkdir()
    passwords = {name: secrets.token_hex(16) for name in
                 ("airflow_db", "airflow_redis", "jwt", "api", "admin", "erp_postgres", "erp_redis", "erp_rabbitmq")}
    passwords["fernet"] = Fernet.generate_key().decode()
    (workdir / "config" / "passwords.json").write_text(json.dumps({"admin": passwords["admin"]}))
    write_test_plan(workdir / "plan.yaml")
    api_port = free_port()
    stack = Stack(docker_engine, compose_env(docker_engine, workdir, api_port, passwords), f"http://127.0.0.1:{api_port}",
                  "", passwords["admin"], workdir, {})
    started = time.monotonic()
    try:
        up = stack.compose("up", "-d", *SERVICES)
        assert up.returncode == 0, up.stderr.decode(errors="replace")[-3000:] + stack.logs("airflow-init", 10) + stack.logs("airflow-apiserver", 40)
        stack.timings["up -d"] = time.monotonic() - started
        moto_port = int(stack.container("moto")["NetworkSettings"]["Ports"]["5000/tcp"][0]["HostPort"])
        stack.s3_url = f"http://127.0.0.1:{moto_port}"
        yield stack
    finally:
        down_started = time.monotonic()
        down = stack.compose("down", "-v", "--remove-orphans", "--timeout", "20")
        stack.timings["down -v"] = time.monotonic() - down_started
        print(f"compose timings (s): {json.dumps({k: round(v, 1) for k, v in stack.timings.items()})}")
        assert down.returncode == 0, down.stderr.decode(errors="replace")[-3000:]
        assert project_leftovers(docker_engine) == []


def s3_client(stack: Stack):
    return boto3.client("s3", endpoint_url=stack.s3_url, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                        region_name=REGION)


def run_and_wait(stack: Stack, token: str, dag_id: str, conf: dict[str, Any],
                 worker: str = "airflow-worker-backup") -> tuple[dict, list[dict]]:
    """Unpause `dag_id` (the scheduler then also runs its latest cron tick), trigger a manual run, wait for it."""
    response = stack.api("PATCH", f"/dags/{dag_id}", token, json={"is_paused": False})
    assert response.status_code == 200, response.text
    response = stack.api("POST", f"/dags/{dag_id}/dagRuns", token, json={"logical_date": None, "conf": conf})
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]

    def finished() -> dict | None:
        run = stack.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}", token).json()
        return run if run.get("state") in ("success", "failed") else None

    started = time.monotonic()
    run = wait_for(f"{dag_id} run {run_id}", finished, RUN_TIMEOUT_S, stack, worker, interval=3)
    stack.timings[dag_id] = time.monotonic() - started
    instances = stack.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", token,
                          params={"limit": 100}).json()["task_instances"]
    return run, instances


def test_the_compose_stack_runs_a_backup_on_the_backup_worker_and_a_docker_drill_on_the_drill_worker(stack: Stack):
    started = time.monotonic()
    erp = stack.container("erp-postgres")
    assert erp["State"]["Health"]["Status"] == "healthy"
    load = stack.compose("exec", "-T", "erp-postgres", "psql", "-X", "-q", "-U", "postgres", "-d", "erp",
                         "-v", "ON_ERROR_STOP=1", "-v", "app_role=erp_app", "-f", "-", stdin=SAMPLE_SQL.read_bytes())
    assert load.returncode == 0, load.stderr.decode(errors="replace")[-2000:]
    s3 = s3_client(stack)
    wait_for("moto", lambda: s3.list_buckets() is not None, 60, stack, "moto")
    s3.create_bucket(Bucket=BUCKET)

    wait_for("the API server", lambda: requests.get(f"{stack.api_url}/api/v2/version", timeout=5).ok, 300, stack,
             "airflow-apiserver")
    token = stack.token()
    for dag_id in ("backup_postgres_full", "dr_drill"):
        wait_for(f"{dag_id} parsed", lambda d=dag_id: stack.api("GET", f"/dags/{d}", token).status_code == 200, 300,
                 stack, "airflow-dag-processor")
    errors = stack.api("GET", "/importErrors", token).json()
    assert errors["total_entries"] == 0, errors
    backup_worker = stack.container("airflow-worker-backup")["Config"]["Hostname"]
    drill_worker = stack.container("airflow-worker-drill")["Config"]["Hostname"]
    default_worker = stack.container("airflow-worker")["Config"]["Hostname"]
    stack.timings["stack ready"] = time.monotonic() - started

    run, instances = run_and_wait(stack, token, "backup_postgres_full", {})
    assert run["state"] == "success", (instances, stack.logs("airflow-worker-backup"))
    assert instances and {ti["state"] for ti in instances} <= {"success", "skipped"}
    ran = [ti for ti in instances if ti["state"] == "success"]
    assert {(ti["queue"], ti["hostname"]) for ti in ran} == {("backup", backup_worker)}, ran
    assert len({backup_worker, drill_worker, default_worker}) == 3
    keys = [obj["Key"] for obj in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(key.endswith("manifest.json") for key in keys) and any("postgres/full" in key for key in keys), keys

    run, instances = run_and_wait(stack, token, "dr_drill", {"service": "postgres", "backend": "docker"},
                                  worker="airflow-worker-drill")
    assert run["state"] == "success", (instances, stack.logs("airflow-worker-drill", 150))
    assert {ti["state"] for ti in instances} <= {"success", "skipped"}
    ran = [ti for ti in instances if ti["state"] == "success"]
    # Every drill task, the decrypting restore included, on the only worker that holds the identity.
    assert {(ti["queue"], ti["hostname"]) for ti in ran} == {("drill", drill_worker)}, ran
    assert {"drill.restore", "drill.verify"} <= {ti["task_id"] for ti in ran}
    report = stack.api("GET", f"/dags/dr_drill/dagRuns/{run['dag_run_id']}/taskInstances/report/xcomEntries/return_value",
                       token).json()
    assert report["value"]["status"] == "passed", report
    # The scratch container, its network and the forwarder are gone; the worker is back on its own network only.
    assert stack.engine.api.containers(all=True, filters={"label": [DRILL_LABEL]}) == []
    assert stack.engine.api.networks(filters={"label": [DRILL_LABEL]}) == []
    assert list(stack.container("airflow-worker-drill")["NetworkSettings"]["Networks"]) == ["erp-backup"]
