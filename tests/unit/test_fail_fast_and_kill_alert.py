"""Alerts that match the fault: unfixable errors fail at once; a killed task process still gets its Slack alert."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from erp_backup.drill.params import DrillParamError
from erp_backup.fail_fast import fail_fast, failing_fast, unfixable
from erp_backup.kill_alert import armed, killed_text, webhook_url
from erp_backup.offsite import OffsiteError
from erp_backup.plan import PlanError
from erp_backup.services.base import ConnectionMissing
from tests.fixtures.polling import poll

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


def raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("error", [
    ConnectionMissing("connection 'erp_redis' (redis source) is not defined"),
    PlanError("plan.yaml: plan.services.redis.backups.rdb.schedule: invalid cron expression"),
    DrillParamError("service 'mongodb' is not an enabled, drillable service"),
    raised_from(OffsiteError("offsite s3://b: Airflow connection 'backup_offsite' is not defined"),
                AirflowNotFoundException("The conn_id `backup_offsite` isn't defined")),
])
def test_unfixable_errors_fail_at_once(error):
    assert unfixable(error)
    with pytest.raises(AirflowFailException, match=f"^{type(error).__name__}: ") as caught:
        with failing_fast():
            raise error
    assert caught.value.__cause__ is error


@pytest.mark.parametrize("error", [
    OffsiteError("offsite s3://b (endpoint http://127.0.0.1:9): checking the bucket failed: connection refused"),
    RuntimeError("pg_dump: server closed the connection unexpectedly"),
    raised_from(RuntimeError("retry me"), TimeoutError("slow")),
])
def test_errors_a_retry_may_fix_are_raised_unchanged(error):
    assert not unfixable(error)
    with pytest.raises(type(error)) as caught:
        fail_fast(lambda: (_ for _ in ()).throw(error))
    assert caught.value is error


def test_callers_can_add_their_own_unfixable_classes():
    class ChecksumMismatch(RuntimeError):
        pass

    assert fail_fast(lambda: 42) == 42
    with pytest.raises(AirflowFailException, match="ChecksumMismatch: bad byte"):
        fail_fast(lambda: (_ for _ in ()).throw(ChecksumMismatch("bad byte")), also=(ChecksumMismatch,))


# --- the kill alert ---------------------------------------------------------------------------------


def test_webhook_url_is_built_as_the_slack_provider_builds_it():
    conn = SimpleNamespace(conn_id="s", password="http://127.0.0.1:1/services/x", host=None, schema=None)
    assert webhook_url(conn) == "http://127.0.0.1:1/services/x"
    conn = SimpleNamespace(conn_id="s", password="EXAMPLE-TEAM/EXAMPLE-BOT/not-a-token", host=None, schema=None)
    assert webhook_url(conn) == "https://hooks.slack.com/services/EXAMPLE-TEAM/EXAMPLE-BOT/not-a-token"
    with pytest.raises(ValueError, match="no webhook URL"):
        webhook_url(SimpleNamespace(conn_id="s", password="", host=None, schema=None))


def test_killed_text_names_dag_task_run_try_and_log():
    ti = SimpleNamespace(dag_id="backup_redis_rdb", task_id="backup", run_id="scheduled__x", try_number=1,
                         task=SimpleNamespace(retries=2), log_url="http://airflow.test:8080/dags/backup_redis_rdb")
    text = killed_text({"ti": ti})
    assert text.startswith(":skull: *Killed* `backup_redis_rdb` task `backup`")
    assert "run `scheduled__x`, try 1/3" in text and "SIGKILL" in text and "http://airflow.test:8080/dags/" in text


TASK_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {plugins!r})
    from erp_backup.kill_alert import armed

    conn = type("Conn", (), {{"conn_id": "slack", "password": {url!r}, "host": None, "schema": None}})()
    with armed("slack", context={{}}, get_connection=lambda conn_id: conn):
        print(os.getpid(), flush=True)
        how = sys.argv[1]
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "raise":
            raise RuntimeError("an ordinary failure: the task's own callback alerts")
""")


def run_task(slack_receiver, how: str) -> subprocess.CompletedProcess[str]:
    script = TASK_SCRIPT.format(plugins=str(PLUGINS), url=slack_receiver.url)
    return subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True, timeout=60)


def watchers() -> list[tuple[str, str]]:
    """(pid, command line) of the kill-alert watchers this test process started and that still run."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if "kill_alert.py" in cmdline and str(PLUGINS) in cmdline and parent == os.getpid():
                found.append((proc.name, cmdline))
    return found


def wait_for(condition, timeout: float = 20.0) -> bool:
    return bool(poll(condition, timeout, interval=0.1))


def test_a_task_process_killed_with_sigkill_gets_one_alert(slack_receiver):
    done = run_task(slack_receiver, "sigkill")

    assert done.returncode == -9, done.stderr
    assert wait_for(lambda: slack_receiver.messages), "no alert after SIGKILL"
    assert wait_for(lambda: not watchers())
    assert len(slack_receiver.messages) == 1 and "*Killed*" in slack_receiver.texts()[0]


@pytest.mark.parametrize("how", ["return", "raise"])
def test_a_task_that_ends_on_its_own_gets_no_kill_alert(slack_receiver, how):
    done = run_task(slack_receiver, how)

    assert done.returncode == (0 if how == "return" else 1), done.stderr
    assert wait_for(lambda: not watchers())
    time.sleep(0.5)
    assert slack_receiver.messages == []


def test_the_webhook_url_never_reaches_the_watchers_argv_or_environment(slack_receiver, monkeypatch, caplog):
    from erp_backup import kill_alert

    started: list[subprocess.Popen[bytes]] = []
    real_start = kill_alert.start_watcher

    def start_and_keep(url: str, text: str) -> subprocess.Popen[bytes]:
        started.append(real_start(url, text))
        return started[-1]

    monkeypatch.setattr(kill_alert, "start_watcher", start_and_keep)
    conn = SimpleNamespace(conn_id="slack", password=slack_receiver.url, host=None, schema=None)
    with armed("slack", context={}, get_connection=lambda conn_id: conn):
        assert len(started) == 1, caplog.text  # the watcher runs while the block does
        watcher = Path(f"/proc/{started[0].pid}")

        def cmdline() -> str:
            return (watcher / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")

        # /proc shows the new program's argv a moment after Popen returns on a loaded machine.
        assert wait_for(lambda: "kill_alert.py" in cmdline()), cmdline()
        environ = (watcher / "environ").read_bytes().decode(errors="replace")
        assert slack_receiver.url not in cmdline()
        assert slack_receiver.url not in environ
    assert wait_for(lambda: started[0].poll() is not None)
    assert slack_receiver.messages == []


def test_without_a_usable_slack_connection_the_task_runs_unwatched(caplog):
    def missing(conn_id: str):
        raise AirflowNotFoundException(f"The conn_id `{conn_id}` isn't defined")

    ran = []
    with armed("slack_missing", context={}, get_connection=missing):
        assert watchers() == []
        ran.append(True)
    assert ran == [True]
    assert any("no kill alert for this task" in r.getMessage() and "slack_missing" in r.getMessage()
               for r in caplog.records)
