"""DAG integrity: every DAG imports, follows the plan, and parses cheaply."""

from __future__ import annotations

from datetime import timedelta

import pytest

from erp_backup.factory import TASK_IDS
from erp_backup.plan import load_plan

PLAN = load_plan()
BACKUP_JOBS = PLAN.enabled_jobs


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_every_enabled_job_has_a_dag_and_no_other_backup_dags(dagbag):
    backup_dags = {dag_id for dag_id in dagbag.dags if dag_id.startswith("backup_") and dag_id != "backup_watchdog"}
    assert backup_dags == {job.dag_id for job in BACKUP_JOBS}


@pytest.mark.parametrize("job", BACKUP_JOBS, ids=lambda job: job.dag_id)
def test_backup_dag_follows_the_plan(dagbag, job):
    dag = dagbag.dags[job.dag_id]
    assert dag.timetable.expression == job.schedule
    assert str(getattr(dag.timetable.timezone, "name", dag.timetable.timezone)) == job.timezone
    assert dag.timetable.interval == (job.interval or timedelta(0))
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    assert {"backup", f"service:{job.service}", f"type:{job.backup_type}"} <= set(dag.tags)
    assert f"`{job.schedule}`" in dag.doc_md and f"{job.retention.days} days" in dag.doc_md
    assert "idempotent" in dag.doc_md and "airflow backfill create" in dag.doc_md
    effect = "ships the data of its own window" if job.interval else "captures the source as it is now"
    assert f"What a backfill does here: each run {effect}" in dag.doc_md


@pytest.mark.parametrize("job", BACKUP_JOBS, ids=lambda job: job.dag_id)
def test_backup_dag_tasks_in_order_with_retries_and_alerts(dagbag, job):
    dag = dagbag.dags[job.dag_id]
    assert set(dag.task_ids) == set(TASK_IDS)
    for upstream, downstream in zip(TASK_IDS, TASK_IDS[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    for task in dag.tasks:
        assert task.retries >= 2
        assert task.retry_exponential_backoff
        assert task.on_failure_callback, f"{task.task_id} has no Slack failure callback"
        assert task.owner != "airflow"


@pytest.mark.parametrize("job", BACKUP_JOBS, ids=lambda job: job.dag_id)
def test_enabled_jobs_are_implemented(job):
    from erp_backup.services import get_service

    assert job.backup_type in get_service(job.service).SUPPORTED_TYPES


def test_parsing_makes_no_connection_or_variable_lookup(monkeypatch):
    """Top-level DAG code must not touch connections, variables or the network."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import BaseHook, Variable

    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"called at parse time: {args}")

    monkeypatch.setattr(BaseHook, "get_connection", classmethod(forbidden))
    monkeypatch.setattr(Variable, "get", staticmethod(forbidden))

    import socket

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    bag = DagBag(dag_folder=str(PLAN.path.parents[1] / "dags"))
    assert bag.import_errors == {}
    assert bag.dags
    assert calls == []


def test_plugin_loader_skips_the_package():
    """Airflow's plugin loader execs plugins/*.py under bare names (redis/__init__.py as `redis`); it must skip
    our package and load only the Backups page plugin."""
    from airflow._shared.module_loading import find_path_from_directory

    plugins = PLAN.path.parents[1] / "plugins"
    assert (plugins / "erp_backup" / "services" / "redis" / "__init__.py").exists()
    assert list(find_path_from_directory(str(plugins), ".airflowignore", "glob")) == [str(plugins / "erp_backups_plugin.py")]


def test_every_task_runs_on_the_queue_of_the_worker_that_holds_its_keys(dagbag):
    """docker-compose.yaml: the drill worker alone holds the age identity, the backup worker alone deletes offsite."""
    from erp_backup.factory import BACKUP_QUEUE, DRILL_QUEUE

    drills = {"dr_drill", "dr_estate_drill"}
    assert drills <= dagbag.dags.keys()
    for dag_id, dag in dagbag.dags.items():
        expected = DRILL_QUEUE if dag_id in drills else BACKUP_QUEUE
        wrong = {task.task_id: task.queue for task in dag.tasks if task.queue != expected}
        assert not wrong, f"{dag_id}: these tasks are not on queue {expected!r}: {wrong}"
