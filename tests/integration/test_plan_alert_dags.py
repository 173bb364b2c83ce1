"""A broken service block, end to end with dag.test(): the watchdog and the drill still run and post it to Slack."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.integration.dagrun import run_dag, write_plan

pytestmark = pytest.mark.integration

UTC = timezone.utc
SLACK_ENV = "AIRFLOW_CONN_SLACK_BACKUP_ALERTS"
BROKEN = "plan.services.redis.backups.rdb.schedule"


@pytest.fixture
def broken_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slack_receiver) -> Path:
    """Only redis enabled, and its block broken by a 6-field cron; the offsite store is a NAS directory."""
    nas = tmp_path / "nas"
    nas.mkdir()

    def edit(data: dict) -> None:
        data["offsite"].update(kind="filesystem", path=str(nas))
        for name, service in data["services"].items():
            service["enabled"] = name == "redis"
        data["services"]["redis"]["backups"]["rdb"]["schedule"] = "0 15 3 * * *"

    path = write_plan(tmp_path / "plan.yaml", edit)
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(path))
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tmp_path / "staging"))
    monkeypatch.delenv("ERP_OFFSITE_PATH", raising=False)
    monkeypatch.setenv(SLACK_ENV, slack_receiver.conn_json())
    return path


def test_the_watchdog_posts_a_broken_plan_once_over_two_runs(airflow_db, dagbag, broken_plan, slack_receiver):
    run_at = datetime(2026, 2, 2, 0, 0, tzinfo=UTC)
    first, states1 = run_dag(dagbag, "backup_watchdog", run_at)
    second, states2 = run_dag(dagbag, "backup_watchdog", run_at + timedelta(hours=1))

    assert first.state == second.state == "success" and states1 == states2
    plan_alerts = [text for text in slack_receiver.texts() if "(`plan`)" in text]
    assert len(plan_alerts) == 1 and BROKEN in plan_alerts[0] and "has 6 field(s)" in plan_alerts[0]


def test_the_drill_posts_a_broken_plan_at_its_run(airflow_db, dagbag, broken_plan, slack_receiver):
    dag_run, states = run_dag(dagbag, "dr_drill", datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=7))

    assert states["pick"] == "success", states
    alerts = [text for text in slack_receiver.texts() if "dr_drill: the backup plan has broken service blocks" in text]
    assert len(alerts) == 1 and BROKEN in alerts[0] and str(broken_plan) in alerts[0]
