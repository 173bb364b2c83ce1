"""A Slack alert when a task's process is killed (SIGKILL, the OOM killer), which Airflow 3.3 does not send.

Airflow 3.3 runs `on_failure_callback` inside the task process. When that process is
killed with SIGKILL, the supervisor marks the try failed (or up for retry) and no callback
runs (apache/airflow#60858, open). When the whole worker dies, supervisor included, the
scheduler's heartbeat timeout fails the task and runs the callback on the DAG processor
(apache/airflow#53058), so our Slack callback does fire then.

`armed` covers the first case. It starts a watcher: this file run as a stdlib-only script
(`python -I`), in its own session, reading a pipe from the task. The task writes the
webhook URL and the alert text first (never in argv or the environment), and `done` when
its function returns or raises. If the pipe closes without `done`, the task process died,
and the watcher posts the alert itself.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

DONE = b"done\n"
POST_ATTEMPTS = 3
POST_TIMEOUT_S = 10


def webhook_url(connection: Any) -> str:
    """The webhook URL of a `slackwebhook` connection, as the Slack provider builds it."""
    token = (connection.password or "").strip()
    if not token:
        raise ValueError(f"Slack connection {connection.conn_id!r} has no webhook URL or token in its password")
    if "://" in token:
        return token
    base = connection.host or ""
    if "://" not in base:
        base = f"{connection.schema or 'https'}://{connection.host or 'hooks.slack.com/services'}"
    return base.rstrip("/") + "/" + token.lstrip("/")


def killed_text(context: Mapping[str, Any]) -> str:
    """The alert for a task whose process died: DAG, task, run, try and log link."""
    ti = context.get("ti") or context.get("task_instance")
    dag_id = getattr(ti, "dag_id", "?")
    task_id = getattr(ti, "task_id", "?")
    run_id = getattr(ti, "run_id", None) or getattr(context.get("dag_run"), "run_id", "?")
    retries = getattr(getattr(ti, "task", None), "retries", None)
    try_number = getattr(ti, "try_number", "?")
    tries = f"{try_number}/{retries + 1}" if isinstance(retries, int) else str(try_number)
    try:
        log_url = ti.log_url if ti is not None else "(no task instance)"
    except Exception:  # a broken base_url must not stop the alert
        log_url = "(log url unavailable)"
    return (
        f":skull: *Killed* `{dag_id}` task `{task_id}`\n"
        f"run `{run_id}`, try {tries}\n"
        "error: the task process died without raising (SIGKILL, the OOM killer): Airflow sends no failure "
        "callback for that. The try is marked failed or up for retry; a set it left without a manifest is "
        "never counted, and the next run removes it.\n"
        f"log: {log_url}"
    )


def _current_context() -> Mapping[str, Any]:
    from airflow.sdk import get_current_context

    return get_current_context()


def _airflow_connection(conn_id: str) -> Any:
    from airflow.sdk import BaseHook

    return BaseHook.get_connection(conn_id)


def start_watcher(url: str, text: str) -> subprocess.Popen[bytes]:
    """Start the watcher and hand it the URL and text; it waits for `disarm` (or for this process to die)."""
    watcher = subprocess.Popen(
        [sys.executable, "-I", __file__], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    assert watcher.stdin is not None
    watcher.stdin.write(json.dumps({"url": url, "text": text}).encode() + b"\n")
    watcher.stdin.flush()
    return watcher


def disarm(watcher: subprocess.Popen[bytes]) -> None:
    """Tell the watcher the task ended on its own, and reap it."""
    try:
        assert watcher.stdin is not None
        watcher.stdin.write(DONE)
        watcher.stdin.close()
    except OSError as exc:  # the watcher is gone: nothing to tell
        log.warning("kill alert watcher %d already gone: %s", watcher.pid, exc)
    try:
        watcher.wait(timeout=10)
    except subprocess.TimeoutExpired:
        watcher.kill()
        watcher.wait()


@contextmanager
def armed(
    slack_conn_id: str,
    *,
    context: Mapping[str, Any] | None = None,
    get_connection: Callable[[str], Any] = _airflow_connection,
) -> Iterator[None]:
    """Run the block with a watcher that posts a Slack alert if this process is killed inside it.

    Without a usable Slack connection the block runs unwatched (a warning says so): the task's
    own failure alerts could not be sent either.
    """
    watcher = None
    try:
        url = webhook_url(get_connection(slack_conn_id))
        watcher = start_watcher(url, killed_text(context if context is not None else _current_context()))
    except Exception as exc:
        log.warning("no kill alert for this task: Slack connection %r unusable: %s", slack_conn_id, exc)
    try:
        yield
    finally:
        if watcher is not None:
            disarm(watcher)


def post(url: str, text: str) -> bool:
    """POST one Slack message to a webhook, a few times with backoff; False if it never went through."""
    body = json.dumps({"text": text}).encode()
    for attempt in range(POST_ATTEMPTS):
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=POST_TIMEOUT_S) as response:
                if 200 <= response.status < 300:
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(2**attempt)
    return False


def watch(stream: Any) -> int:
    """The watcher: read the alert, wait for `done` or end of stream; post the alert if `done` never came."""
    header = stream.readline()
    if not header:
        return 0
    alert = json.loads(header)
    if stream.read().startswith(DONE):
        return 0
    return 0 if post(alert["url"], alert["text"]) else 1


if __name__ == "__main__":
    sys.exit(watch(sys.stdin.buffer))
