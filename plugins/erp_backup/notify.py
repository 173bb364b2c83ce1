"""Slack alerts through the Slack provider's webhook notifier, imported only when sending. Alerts never raise."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 300


def one_line(error: object) -> str:
    """The first line of an error, shortened, for a chat message."""
    if error is None:
        return "no exception recorded (killed, timed out, or marked failed)"
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    first = next((line.strip() for line in text.splitlines() if line.strip()), text.strip())
    return first if len(first) <= MAX_ERROR_CHARS else first[: MAX_ERROR_CHARS - 1] + "…"


def failure_text(context: dict[str, Any]) -> str:
    """The alert for a failed task: DAG, task, run, try number, one-line error and log link."""
    ti = context.get("ti") or context.get("task_instance")
    dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", "?")
    task_id = getattr(ti, "task_id", "?")
    run_id = getattr(ti, "run_id", None) or getattr(context.get("dag_run"), "run_id", "?")
    try_number = getattr(ti, "try_number", "?")
    max_tries = getattr(getattr(ti, "task", None), "retries", None)
    tries = f"{try_number}/{max_tries + 1}" if isinstance(max_tries, int) else str(try_number)
    try:
        log_url = ti.log_url if ti is not None else "(no task instance)"
    except Exception:  # a broken base_url must not hide the alert
        log_url = "(log url unavailable)"
    return (
        f":red_circle: *Failed* `{dag_id}` task `{task_id}`\n"
        f"run `{run_id}`, try {tries}\n"
        f"error: {one_line(context.get('exception'))}\n"
        f"log: {log_url}"
    )


class FailureAlert:
    """A task failure callback that posts through the Slack provider's SlackWebhookNotifier.

    The provider is imported only when a task fails, so DAG parsing stays cheap. The
    connection is resolved afresh on every alert, and a broken Slack connection is
    logged and swallowed, so the task's own failure stays the visible cause.
    """

    def __init__(self, slack_conn_id: str, build_text: Callable[[dict[str, Any]], str] = failure_text):
        self.slack_conn_id = slack_conn_id
        self.build_text = build_text

    def __call__(self, context: dict[str, Any]) -> None:
        try:
            from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

            SlackWebhookNotifier(slack_webhook_conn_id=self.slack_conn_id, text=self.build_text(context)).notify(context)
        except Exception as exc:
            log.error("Slack alert via %r failed (original failure unchanged): %s", self.slack_conn_id, exc)


def failure_notifier(slack_conn_id: str) -> FailureAlert:
    return FailureAlert(slack_conn_id)


def send(slack_conn_id: str, text: str) -> bool:
    """Post a message (drill summaries, watchdog breaches). Returns False instead of raising."""
    try:
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        SlackWebhookNotifier(slack_webhook_conn_id=slack_conn_id, text=text).notify({})
        return True
    except Exception as exc:
        log.error("Slack message via %r failed: %s", slack_conn_id, exc)
        return False
