"""Slack alerts through the provider's webhook notifier, against a local receiver."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from erp_backup.notify import failure_notifier, failure_text, one_line, send


def fake_context(exception: BaseException | None):
    """A task-failure context as Airflow passes it (the TI is Airflow's runtime object)."""
    ti = SimpleNamespace(
        dag_id="backup_postgres_full", task_id="checksum", run_id="scheduled__2026-01-01T17:00:00+00:00",
        try_number=3, task=SimpleNamespace(retries=2), log_url="http://airflow.test:8080/dags/backup_postgres_full/runs/x",
    )
    return {"ti": ti, "exception": exception}


def test_failure_text_names_dag_task_run_try_error_and_log():
    text = failure_text(fake_context(ValueError("sha256 mismatch in globals.sql.zst\nsecond line")))
    assert "`backup_postgres_full`" in text and "`checksum`" in text
    assert "scheduled__2026-01-01T17:00:00+00:00" in text
    assert "try 3/3" in text
    assert "ValueError: sha256 mismatch in globals.sql.zst" in text and "second line" not in text
    assert "http://airflow.test:8080/dags/backup_postgres_full/runs/x" in text


def test_one_line_shortens_and_handles_missing_exception():
    assert one_line(None).startswith("no exception recorded")
    assert len(one_line(RuntimeError("x" * 1000))) == 300


def test_notifier_posts_to_the_webhook(slack_receiver, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_BACKUP_ALERTS", slack_receiver.conn_json())
    failure_notifier("slack_backup_alerts")(fake_context(RuntimeError("pg_dump: connection refused")))
    assert len(slack_receiver.messages) == 1
    assert "RuntimeError: pg_dump: connection refused" in slack_receiver.texts()[0]


def test_broken_slack_connection_never_raises(monkeypatch, caplog):
    monkeypatch.delenv("AIRFLOW_CONN_SLACK_MISSING", raising=False)
    with caplog.at_level(logging.ERROR, logger="erp_backup.notify"):
        failure_notifier("slack_missing")(fake_context(RuntimeError("original failure")))
        assert send("slack_missing", "drill report") is False
    assert any("slack_missing" in record.getMessage() for record in caplog.records)


def test_unreachable_webhook_never_raises(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_DOWN", '{"conn_type": "slackwebhook", "password": "http://127.0.0.1:9/x"}')
    failure_notifier("slack_down")(fake_context(RuntimeError("original failure")))
    assert send("slack_down", "hello") is False
