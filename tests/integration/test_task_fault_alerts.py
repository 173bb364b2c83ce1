"""Alerts that match the fault, end to end with dag.test() and the Slack receiver.

- A missing connection fails the backup task at its first try, with one alert and no retries,
  though the DAG keeps retries=2 for faults a retry can fix.
- A task process killed with SIGKILL (here: the whole `dag.test()` process, which runs the
  task in-process) still gets a Slack alert, from erp_backup.kill_alert's watcher.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.integration.dagrun import run_dag, write_plan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "backup_redis_rdb"
SLACK_ENV = "AIRFLOW_CONN_SLACK_BACKUP_ALERTS"


@pytest.fixture
def redis_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slack_receiver) -> Path:
    """Only redis enabled, a NAS offsite, the Slack receiver, and no `erp_redis` connection defined."""
    (tmp_path / "nas").mkdir()

    def edit(data: dict) -> None:
        data["offsite"].update(kind="filesystem", path=str(tmp_path / "nas"))
        for name, service in data["services"].items():
            service["enabled"] = name == "redis"

    path = write_plan(tmp_path / "plan.yaml", edit)
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(path))
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tmp_path / "staging"))
    monkeypatch.delenv("ERP_OFFSITE_PATH", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_ERP_REDIS", raising=False)
    monkeypatch.setenv(SLACK_ENV, slack_receiver.conn_json())
    return path


def test_a_missing_connection_fails_at_once_with_one_alert_and_no_retries(airflow_db, dagbag, redis_plan, slack_receiver):
    started = time.monotonic()
    dag_run, states = run_dag(dagbag, DAG_ID, datetime(2026, 2, 3, 18, 15, tzinfo=timezone.utc), retries=None)

    assert dagbag.dags[DAG_ID].get_task("backup").retries == 2  # retries stay on for faults a retry can fix
    (backup,) = [ti for ti in dag_run.get_task_instances() if ti.task_id == "backup"]
    assert backup.state == "failed" and backup.try_number == 1, (backup.state, backup.try_number)
    assert states["checksum"] == "upstream_failed" and dag_run.state == "failed"
    assert time.monotonic() - started < 100  # no 2-minute retry delay was waited for
    assert len(slack_receiver.messages) == 1, slack_receiver.texts()
    alert = slack_receiver.texts()[0]
    assert f"`{DAG_ID}` task `backup`" in alert and "try 1/3" in alert
    assert "ConnectionMissing" in alert and "erp_redis" in alert


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from datetime import datetime, timezone

    from erp_backup import steps

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or `kill -9` would

    steps.backup = killed
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=sys.argv[1]).dags[sys.argv[2]]
    dag.test(logical_date=datetime(2026, 2, 4, 18, 15, tzinfo=timezone.utc))
""")


def test_a_task_killed_with_sigkill_yields_an_alert(airflow_db, redis_plan, slack_receiver):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(ROOT / "dags"), DAG_ID], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stdout[-2000:] + done.stderr[-2000:]

    deadline = time.monotonic() + 30
    while not slack_receiver.messages and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(slack_receiver.messages) == 1, slack_receiver.texts()
    alert = slack_receiver.texts()[0]
    assert alert.startswith(f":skull: *Killed* `{DAG_ID}` task `backup`") and "SIGKILL" in alert
    assert "http://airflow.test:8080/dags/backup_redis_rdb/runs/" in alert
