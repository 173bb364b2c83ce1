"""`recover-estate --backend docker` on a real Docker engine (tests/fixtures/docker_engine.py).

The estate and its offsite sets are those of tests/integration/test_recover_estate.py (its
module fixture `estate`: PostgreSQL with WAL archiving, moto S3 as MinIO, milvus-lite, Redis,
the document writer). The plan gets the locally built images and pull: never.

- As planned (PostgreSQL by PITR), no service can run in a container here: PITR replays into a
  data directory on the worker, Redis has no container target, and the MinIO and Milvus images
  are not on the engine. Every service stays local and the report says why.
- With PostgreSQL's WAL job disabled (a site without PITR), PostgreSQL restores its `full` set
  into an erp-local/postgres container; the other services stay local.

Either way the run leaves no container, network or volume on the engine, and a crashed setup's
containers are found by the run's label when the list of targets is gone.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from erp_backup.cli import main
from erp_backup.estate.choose import plan_estate
from erp_backup.estate.recover import PITR_STAYS_LOCAL, estate_scratch_root
from erp_backup.estate.run import recover_estate, recover_phase, runs_dir, teardown_phase
from erp_backup.plan import Plan, load_plan
from tests.fixtures.docker_engine import DockerEngine
from tests.integration.docker.test_drill_docker_engine import labelled, volumes
from tests.integration.test_recover_estate import SERVICES, Estate, _store, estate  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2700)]  # a cold image build may come first

REPORT_COPY = Path("/tmp/erp-recover-estate-docker-report.md")
IMAGES = {"postgres": "erp-local/postgres:{tag}", "rabbitmq": "erp-local/rabbitmq:{tag}", "proxy": "erp-local/socat:1"}


def _docker_plan(estate: Estate, name: str, *, without_pitr: bool = False) -> Plan:
    data = yaml.safe_load(estate.plan_path.read_text())
    data["drill"]["docker"] = {"pull": "never", "images": IMAGES}
    if without_pitr:
        data["services"]["postgres"]["backups"]["wal"]["enabled"] = False
    path = estate.plan_path.with_name(name)  # a new path: plans are cached by path
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_plan(path)


@pytest.fixture
def engine(estate: Estate, docker_engine: DockerEngine, docker_images: dict[str, str],  # noqa: F811
           monkeypatch: pytest.MonkeyPatch) -> Iterator[DockerEngine]:
    monkeypatch.setenv("ERP_DRILL_DOCKER_URL", docker_engine.url)
    monkeypatch.delenv("ERP_DRILL_WORKER_CONTAINER", raising=False)
    before = volumes(docker_engine)
    assert labelled(docker_engine) == []
    yield docker_engine
    assert labelled(docker_engine) == [] and volumes(docker_engine) == before


def _no_leftovers(engine: DockerEngine, plan: Plan, run_id: str) -> None:
    assert labelled(engine, run_id) == [] and not any(estate_scratch_root(plan).glob("erp-scratch-*"))


def test_pitr_and_services_without_an_image_stay_local_and_say_why(estate: Estate, engine: DockerEngine,  # noqa: F811
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _docker_plan(estate, "plan-docker-pitr.yaml")
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(plan.path))
    out, err = io.StringIO(), io.StringIO()
    code = main(["recover-estate", "--at", estate.at.isoformat(), "--backend", "docker", "--json", "--plan", str(plan.path),
                 "--run-id", "manual__estate-docker-pitr"], stdout=out, stderr=err)
    report = json.loads(out.getvalue())
    assert code == 0 and report["status"] == "passed", err.getvalue() + json.dumps(report, indent=2, default=str)
    services = report["services"]
    assert {name: s["backend"] for name, s in services.items()} == dict.fromkeys(SERVICES, "local")
    assert services["postgres"]["pitr"] and services["postgres"]["backend_note"] == PITR_STAYS_LOCAL
    assert services["redis"]["backend_note"] == "scratch kind 'redis' has no container target"
    for name in ("minio", "milvus"):
        assert "is not on the Docker engine (drill.docker.pull: never)" in services[name]["backend_note"]
    assert report["references"]["status"] == "checked" and report["references"]["unexplained"] == 0
    assert "Kept on the local backend:" in Path(report["report_dir"], "report.md").read_text()
    _no_leftovers(engine, plan, report["run_id"])


def test_postgres_restores_into_a_container_and_nothing_is_left(estate: Estate, engine: DockerEngine,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _docker_plan(estate, "plan-docker-full.yaml", without_pitr=True)
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(plan.path))
    report = recover_estate(plan, estate.at, run_id="manual__estate-docker", backend="docker")
    REPORT_COPY.write_text(Path(report["report_dir"], "report.md").read_text())

    assert report["status"] == "passed", json.dumps(report, indent=2, default=str)
    services = report["services"]
    assert {name: s["status"] for name, s in services.items()} == dict.fromkeys(SERVICES, "restored")
    assert {name: s["backend"] for name, s in services.items()} == {
        "postgres": "docker", "minio": "local", "milvus": "local", "redis": "local"}
    postgres = services["postgres"]
    assert not postgres["pitr"] and [s["backup_type"] for s in postgres["sets"]] == ["full"]
    (target,) = postgres["targets"].values()
    assert "erp-local/postgres:15" in target and postgres["backend_note"] is None
    assert postgres["restore"]["full"]["restored_bytes"] > 0

    refs = report["references"]
    assert refs["status"] == "checked" and refs["documents"] > 0 and refs["unexplained"] == 0
    gaps = {gap["name"]: gap for gap in refs["gaps"]}
    assert gaps["documents whose object's SHA-256 differs"]["count"] == 0
    assert gaps["documents whose vectors are missing"]["unexplained"] == 0
    assert any(line.startswith("removed container erp-drill-") for line in report["teardown"])
    assert any(line.startswith("removed network erp-drill-") for line in report["teardown"])
    _no_leftovers(engine, plan, report["run_id"])


def test_a_crashed_setups_containers_are_removed_by_the_runs_label(estate: Estate, engine: DockerEngine,  # noqa: F811
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _docker_plan(estate, "plan-docker-crash.yaml", without_pitr=True)
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(plan.path))
    run_id = "manual__estate-docker-crash"
    sets = plan_estate(plan, estate.at, _store(plan), services=["postgres"])
    try:
        recover_phase(plan, sets, run_id=run_id, store=_store(plan), backend="docker")
        assert labelled(engine, run_id) != []  # the container and its network are up
        (runs_dir(plan, run_id) / "targets.json").unlink()  # as if the setup died before recording them
    finally:
        done = teardown_phase(plan, run_id, backend="docker")
    assert any(line.startswith("removed container /erp-drill-") for line in done), done
    _no_leftovers(engine, plan, run_id)
