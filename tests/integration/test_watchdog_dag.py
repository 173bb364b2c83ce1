"""The backup_watchdog DAG end to end: real staging sets, a NAS (or moto S3) offsite, the Slack receiver."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from erp_backup.offsite import FilesystemOffsite, S3Offsite
from erp_backup.plan import Plan, load_plan
from erp_backup.scratch.base import free_port
from erp_backup.watchdog import OFFSITE_KEY, check, state_path
from tests.fixtures.s3 import S3Endpoint
from tests.integration.dagrun import run_dag, write_plan
from tests.unit.test_watchdog import make_offsite_set

pytestmark = pytest.mark.integration

UTC = timezone.utc
DAG_ID = "backup_watchdog"
SLACK_ENV = "AIRFLOW_CONN_SLACK_BACKUP_ALERTS"
OFFSITE_CONN_ENV = "AIRFLOW_CONN_BACKUP_OFFSITE"
RUN_AT = datetime(2026, 2, 1, 0, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 10, 20, 0, tzinfo=UTC)  # for direct check() calls; the DAG checks the wall clock


def only_postgres_full_with_24h_rpo(nas: Path) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        # `path` cannot go through write_plan's **offsite: it is write_plan's own first parameter.
        data["offsite"].update(kind="filesystem", path=str(nas))
        for name, service in data["services"].items():
            service["enabled"] = name == "postgres"
            for type_name, backup in service["backups"].items():
                backup["enabled"] = type_name == "full"
        data["services"]["postgres"]["rpo"] = "24h"

    return edit


@pytest.fixture
def plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slack_receiver) -> Plan:
    nas = tmp_path / "nas"
    nas.mkdir()
    plan_path = write_plan(tmp_path / "plan.yaml", only_postgres_full_with_24h_rpo(nas))
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(plan_path))
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tmp_path / "staging"))
    monkeypatch.delenv("ERP_OFFSITE_PATH", raising=False)
    monkeypatch.setenv(SLACK_ENV, slack_receiver.conn_json())
    return load_plan()


def test_the_dag_is_hourly_single_run_retried_and_alerting(dagbag):
    dag = dagbag.dags[DAG_ID]
    assert dag.timetable.expression == "0 * * * *"
    assert dag.max_active_runs == 1 and dag.catchup is False and set(dag.tags) == {"backup", "watchdog"}
    assert "idempotent" in dag.doc_md and "state.json" in dag.doc_md
    assert dag.get_task("alert").upstream_task_ids == {"check_freshness"}
    for task in dag.tasks:
        assert task.retries >= 2 and task.retry_exponential_backoff and task.on_failure_callback


def freshness_rows(dag_run) -> list[dict]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        xcom = session.scalars(
            XComModel.get_many(run_id=dag_run.run_id, dag_ids=DAG_ID, task_ids="check_freshness", key="return_value")
        ).one()
        value = xcom.value
    return json.loads(value) if isinstance(value, str) else value


def test_breach_is_announced_once_over_two_runs_and_recovery_once(airflow_db, dagbag, plan: Plan, slack_receiver):
    nas = FilesystemOffsite(plan.offsite.path)
    stale = make_offsite_set(plan.backup_root, nas, datetime.now(UTC) - timedelta(hours=30))

    first, states1 = run_dag(dagbag, DAG_ID, RUN_AT)
    second, states2 = run_dag(dagbag, DAG_ID, RUN_AT + timedelta(hours=1))

    assert first.state == second.state == "success"
    assert states1 == states2 == {"check_freshness": "success", "alert": "success"}
    assert len(slack_receiver.messages) == 1
    breach = slack_receiver.texts()[0]
    assert "postgres/full breach" in breach and "`backup_postgres_full`" in breach and stale.backup_id in breach
    rows = {row["key"]: row for row in freshness_rows(second)}
    assert set(rows) == {"backup_postgres_full", OFFSITE_KEY}
    job_row = rows["backup_postgres_full"]
    assert job_row["status"] == "breach" and job_row["newest_set"] == stale.backup_id
    assert job_row["rpo"] == "24h" and job_row["age"].startswith("30h")
    assert {reason["code"] for reason in job_row["reasons"]} == {"overdue", "rpo"}
    assert rows[OFFSITE_KEY]["status"] == "ok"
    assert json.loads(state_path(plan).read_text())["backup_postgres_full"]["status"] == "breach"

    fresh = make_offsite_set(plan.backup_root, nas, datetime.now(UTC) - timedelta(minutes=5))
    third, states3 = run_dag(dagbag, DAG_ID, RUN_AT + timedelta(hours=2))

    assert third.state == "success" and states3["alert"] == "success"
    assert len(slack_receiver.messages) == 2
    recovery = slack_receiver.texts()[1]
    assert "postgres/full recovered" in recovery and fresh.backup_id in recovery
    assert freshness_rows(third)[0]["status"] == "ok"


@pytest.fixture
def s3_plan(plan: Plan, s3_endpoint: S3Endpoint, s3_bucket: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> Plan:
    from dataclasses import replace

    monkeypatch.setenv(OFFSITE_CONN_ENV, s3_endpoint.conn_json())
    return replace(plan, offsite=replace(plan.offsite, kind="s3", conn_id="backup_offsite", bucket=s3_bucket("watchdog"), prefix="erp"))


def test_s3_offsite_manifests_confirm_the_newest_set(s3_plan: Plan, s3_endpoint: S3Endpoint):
    store = S3Offsite(s3_plan.offsite.conn_id, s3_plan.offsite.bucket, s3_plan.offsite.prefix)
    older = make_offsite_set(s3_plan.backup_root, store, NOW - timedelta(hours=2))
    newest = make_offsite_set(s3_plan.backup_root, store, NOW - timedelta(hours=1))

    job_row, offsite_row = check(s3_plan, NOW, store)
    assert job_row.newest_id == newest.backup_id and job_row.reasons == () and not offsite_row.breached

    s3_endpoint.client().delete_object(Bucket=s3_plan.offsite.bucket, Key=f"erp/{newest.key}/manifest.json")
    job_row, _ = check(s3_plan, NOW, S3Offsite(s3_plan.offsite.conn_id, s3_plan.offsite.bucket, s3_plan.offsite.prefix))
    assert job_row.newest_id == older.backup_id
    assert [reason.code for reason in job_row.reasons] == ["offsite_missing"]
    assert newest.backup_id in job_row.reasons[0].text


def test_unreachable_s3_is_one_breach_row_and_the_check_goes_on(s3_plan: Plan, monkeypatch: pytest.MonkeyPatch):
    nas = FilesystemOffsite(Path(s3_plan.backup_root).parent / "nas")
    newest = make_offsite_set(s3_plan.backup_root, nas, NOW - timedelta(hours=2))
    dead_endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv(OFFSITE_CONN_ENV, json.dumps({
        "conn_type": "aws", "login": "x", "password": "y",
        "extra": {"endpoint_url": dead_endpoint, "region_name": "us-east-1",
                  "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}},
    }))
    store = S3Offsite(s3_plan.offsite.conn_id, s3_plan.offsite.bucket, s3_plan.offsite.prefix)

    job_row, offsite_row = check(s3_plan, NOW, store)

    assert [reason.code for reason in offsite_row.reasons] == ["offsite_unreachable"]
    assert dead_endpoint in offsite_row.reasons[0].text and "offsite unreachable" in offsite_row.reasons[0].text
    assert job_row.newest_id == newest.backup_id and job_row.reasons == ()
    assert job_row.notes == ("offsite not confirmed (unreachable): judged from the staging manifest",)
