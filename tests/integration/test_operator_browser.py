"""What an operator sees, in a real browser: Playwright driving Debian's chromium against `airflow standalone`.

One standalone (PostgreSQL metadata DB, NAS-style offsite, a Slack receiver) serves every test
here. PostgreSQL and Redis are enabled; a Redis set on the NAS was captured just before its last
scheduled run, which is more than an hour overdue, so the Backups page shows Redis "late". DAGs
are unpaused only where a test needs its runs to execute (dr_drill); backup_postgres_full stays
paused, so its form's run is created (queued) without backing up the machine's server.
Screenshots go to docs/screenshots/.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from airflow.sdk import Connection
from croniter import croniter

from erp_backup.checksum import verify_and_seal
from erp_backup.manifest import write_manifest
from erp_backup.offsite import FilesystemOffsite
from erp_backup.plan import load_plan
from erp_backup.scratch.base import free_port
from erp_backup.scratch.redis import ScratchRedis
from erp_backup.services import get_service
from erp_backup.services.base import RunInfo
from erp_backup.sets import backup_id_for
from tests.fixtures.factories import make_backup_context, make_manifest
from tests.fixtures.polling import poll
from tests.fixtures.slack import SlackReceiver, start_receiver
from tests.integration.dagrun import write_plan
from tests.integration.test_backfill import ROOT, Standalone, standalone_env

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "docs" / "screenshots"
DISABLED = "gitlab,rabbitmq,minio,milvus,files"


def late_capture(schedule: str, tz: str, now: datetime) -> datetime:
    """A capture one minute before the job's last fire that is over 1 h 10 min past: overdue, within a 48 h RPO."""
    last_fire = croniter(schedule, (now - timedelta(hours=1, minutes=10)).astimezone(ZoneInfo(tz))).get_prev(datetime)
    return last_fire.astimezone(UTC) - timedelta(minutes=1)


def create_metadata_db() -> tuple[str, str]:
    import psycopg

    name = f"airflow_browser_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_metadata_db(name: str) -> None:
    import psycopg

    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_standalone(work: Path, slack: SlackReceiver, metadata_db: str) -> Standalone:
    home = work / "airflow"
    home.mkdir(parents=True)
    (work / "nas").mkdir()
    plan_path = write_plan(work / "plan.yaml", kind="filesystem", path=str(work / "nas"),
                           edit=lambda d: d["services"]["redis"].update(rpo="48h"))
    port = free_port()
    passwords = home / "passwords.json"  # admin's password, known before start: the drill's airflow_api connection uses it
    passwords.write_text(json.dumps({"admin": secrets.token_urlsafe(16)}))
    passwords.chmod(0o600)
    env = {
        **standalone_env(home, port, metadata_db, plan_path, work / "backup"),
        "ERP_BACKUP_DISABLE": DISABLED,
        "AIRFLOW_CONN_ERP_POSTGRES": json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": 9,
                                                 "login": "postgres", "schema": "postgres"}),
        "AIRFLOW_CONN_ERP_REDIS": json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": 9}),
        "AIRFLOW_CONN_SLACK_BACKUP_ALERTS": slack.conn_json(),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW_CONN_AIRFLOW_API": json.dumps({"conn_type": "http", "host": f"http://127.0.0.1:{port}", "login": "admin",
                                                "password": json.loads(passwords.read_text())["admin"]}),
    }
    server = Standalone(env, home, port)
    server.backup_root, server.nas, server.plan_path = work / "backup", work / "nas", plan_path  # type: ignore[attr-defined]
    return server


def seed_late_redis_set(server: Standalone, work: Path) -> str:
    """A real Redis backup (of a scratch redis-server), verified and on the NAS, dated just before the job's
    last (now overdue) run: the drill can restore it, and the Backups page shows Redis late."""
    plan = load_plan(server.plan_path)  # type: ignore[attr-defined]
    job = plan.job("redis", "rdb")
    captured = late_capture(job.schedule, job.timezone, datetime.now(UTC))
    started = captured - timedelta(minutes=5)
    source = ScratchRedis(work / "redis-source").start()
    try:
        for command in (["CONFIG", "SET", "repl-diskless-sync-delay", "0"], ["SET", "order:0001", "total=7"]):
            subprocess.run(["redis-cli", "-p", str(source.port), *command], check=True, capture_output=True)
        connection = Connection(conn_id="erp_redis", conn_type="redis", host="127.0.0.1", port=source.port)
        ctx = make_backup_context(server.backup_root, service="redis", backup_type="rdb",  # type: ignore[attr-defined]
                                  run=RunInfo("backup_redis_rdb", "manual", started),
                                  backup_id=backup_id_for(started), connection=connection)
        outcome = get_service("redis").backup(ctx)
    finally:
        source.stop()
    write_manifest(ctx.backup_set.path, make_manifest(context=ctx, outcome=outcome, captured_started_at=started,
                                                      captured_finished_at=captured))
    verify_and_seal(ctx.backup_set)
    FilesystemOffsite(server.nas).upload_set(ctx.backup_set)  # type: ignore[attr-defined]
    return ctx.backup_set.backup_id


@pytest.fixture(scope="session")
def slack() -> Iterator[SlackReceiver]:
    receiver, http = start_receiver()
    yield receiver
    http.shutdown()


@pytest.fixture(scope="session")
def airflow(tmp_path_factory: pytest.TempPathFactory, slack: SlackReceiver) -> Iterator[Standalone]:
    name, url = create_metadata_db()
    server = start_standalone(tmp_path_factory.mktemp("browser"), slack, url)
    server.db_name = name  # type: ignore[attr-defined]
    try:
        server.wait_healthy()
        wait_for_dags(server, "dr_drill", "backup_postgres_full")
        server.redis_set = seed_late_redis_set(server, tmp_path_factory.mktemp("redis"))  # type: ignore[attr-defined]
        server.cli("dags", "unpause", "dr_drill")
        yield server
    finally:
        server.stop()
        drop_metadata_db(name)


def wait_for_dags(server: Standalone, *dag_ids: str, timeout: float = 300) -> None:
    def all_listed() -> bool:
        listed = server.cli("dags", "list", "-o", "plain")
        return all(dag_id in listed for dag_id in dag_ids)

    if not poll(all_listed, timeout, interval=3):
        raise AssertionError(f"DAGs {dag_ids} not parsed in {timeout}s:\n{server.tail()}")


def admin_password(server: Standalone) -> str:
    return json.loads((server.home / "passwords.json").read_text())["admin"]


# --- the browser --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def ui(browser, airflow: Standalone):
    """A page logged in as admin through Airflow's own login form."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)  # 2 shared cores: the UI's first loads can be slow
    page.goto(f"http://127.0.0.1:{airflow.port}/")
    page.wait_for_url("**/auth/login**")
    page.locator("input[name=username]").fill("admin")
    page.locator("input[name=password]").fill(admin_password(airflow))
    page.locator("button[type=submit]").click()
    page.wait_for_url(lambda url: "/auth/login" not in url, timeout=60_000)
    yield page
    page.close()


def query(server: Standalone, sql: str, *args: object) -> list[tuple]:
    """Read Airflow's metadata DB (the CLI's list-runs has no conf)."""
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={server.db_name}") as db:  # type: ignore[attr-defined]
        return db.execute(sql, args).fetchall()


def dag_runs(server: Standalone, dag_id: str) -> dict[str, dict]:
    rows = query(server, "SELECT run_id, state, conf FROM dag_run WHERE dag_id = %s", dag_id)
    return {run_id: {"run_id": run_id, "state": state, "conf": conf} for run_id, state, conf in rows}


def task_states(server: Standalone, dag_id: str, run_id: str) -> dict[str, str]:
    rows = query(server, "SELECT task_id, state FROM task_instance WHERE dag_id = %s AND run_id = %s", dag_id, run_id)
    return dict(rows)


def open_trigger_form(ui, server: Standalone, dag_id: str):
    ui.goto(f"http://127.0.0.1:{server.port}/dags/{dag_id}")
    ui.get_by_role("button", name="Trigger Dag").click()
    dialog = ui.get_by_role("dialog")
    dialog.get_by_text("Run Parameters").wait_for()
    return dialog


def choose(dialog, param: str, value: str) -> None:
    """Pick a value in an enum param's select box (react-select), found by its hidden input."""
    field = dialog.locator(f"input[type=hidden][name=element_{param}]").locator("xpath=..")
    field.get_by_role("combobox").fill(value)
    field.get_by_role("combobox").press("Enter")
    assert dialog.locator(f"input[type=hidden][name=element_{param}]").input_value() == value


def submit(dialog, server: Standalone, dag_id: str, timeout: float = 60) -> dict:
    """Click Trigger (it must be enabled) and return the run it created."""
    before = set(dag_runs(server, dag_id))
    button = dialog.get_by_test_id("trigger-dag-submit")
    assert button.is_enabled()
    button.click()
    new = poll(lambda: [run for run_id, run in dag_runs(server, dag_id).items() if run_id not in before],
               timeout, interval=2)
    if not new:
        raise AssertionError(f"no {dag_id} run appeared after Trigger\n{server.tail()}")
    return new[0]


def wait_run(server: Standalone, dag_id: str, run_id: str, states: tuple[str, ...], timeout: float = 900) -> dict:
    def ended() -> dict | None:
        run = dag_runs(server, dag_id)[run_id]
        return run if run["state"] in states else None

    run = poll(ended, timeout, interval=3)
    if run is None:
        raise AssertionError(f"{dag_id} {run_id} never reached {states}: {dag_runs(server, dag_id)[run_id]}\n{server.tail()}")
    return run


def end_run(server: Standalone, dag_id: str, run_id: str) -> None:
    """Mark a run the test only needed started as failed through the REST API, so the next run of this
    max_active_runs=1 DAG starts now instead of after a whole drill. A run that already ended is left as it is."""
    if dag_runs(server, dag_id)[run_id]["state"] not in ("queued", "running"):
        return
    password = json.loads((server.home / "passwords.json").read_text())["admin"]
    login = urllib.request.Request(f"http://127.0.0.1:{server.port}/auth/token", method="POST",
                                   data=json.dumps({"username": "admin", "password": password}).encode(),
                                   headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(login, timeout=30) as response:
        token = json.load(response)["access_token"]
    patch = urllib.request.Request(f"http://127.0.0.1:{server.port}/api/v2/dags/{dag_id}/dagRuns/{run_id}",
                                   method="PATCH", data=json.dumps({"state": "failed"}).encode(),
                                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(patch, timeout=30):
        pass  # its body may still show the old state (the API session's cached row): read the DB instead
    wait_run(server, dag_id, run_id, ("failed", "success"), timeout=60)  # success: it ended meanwhile


def end_earlier_runs(server: Standalone, dag_id: str) -> None:
    """Runs left queued or running (the scheduled one on unpause, earlier tests'): ended, so this test's run starts."""
    for run_id, run in dag_runs(server, dag_id).items():
        if run["state"] in ("queued", "running"):
            end_run(server, dag_id, run_id)


def conf_of(run: dict) -> dict:
    conf = run.get("conf")
    return json.loads(conf) if isinstance(conf, str) else conf or {}


def test_login_shows_the_dags(ui, airflow) -> None:
    ui.goto(f"http://127.0.0.1:{airflow.port}/dags")
    ui.get_by_role("link", name="dr_drill").first.wait_for()
    assert ui.get_by_role("link", name="backup_postgres_full").count() >= 1


def test_the_drill_runs_with_the_forms_defaults(ui, airflow) -> None:
    dialog = open_trigger_form(ui, airflow, "dr_drill")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ui.screenshot(path=str(SCREENSHOTS / "drill-form.png"))

    end_earlier_runs(airflow, "dr_drill")
    run = submit(dialog, airflow, "dr_drill")

    assert conf_of(run)["service"] == "all" and conf_of(run).get("backup_id") is None
    assert wait_run(airflow, "dr_drill", run["run_id"], ("running", "success", "failed"))["state"]
    end_run(airflow, "dr_drill", run["run_id"])  # started is what this test shows; a whole drill is test_drill's


def test_the_drill_runs_with_service_and_backup_id_filled(ui, airflow) -> None:
    dialog = open_trigger_form(ui, airflow, "dr_drill")
    choose(dialog, "service", "redis")
    dialog.locator("input[name=element_backup_id]").fill(airflow.redis_set)

    end_earlier_runs(airflow, "dr_drill")
    run = submit(dialog, airflow, "dr_drill")

    assert (conf_of(run)["service"], conf_of(run)["backup_id"]) == ("redis", airflow.redis_set)
    wait_run(airflow, "dr_drill", run["run_id"], ("running", "success", "failed"))
    end_run(airflow, "dr_drill", run["run_id"])


def test_an_invalid_backup_id_fails_at_pick_with_one_clear_message(ui, airflow, slack) -> None:
    dialog = open_trigger_form(ui, airflow, "dr_drill")
    choose(dialog, "service", "redis")
    dialog.locator("input[name=element_backup_id]").fill("20200101T000000Z")

    end_earlier_runs(airflow, "dr_drill")
    run = submit(dialog, airflow, "dr_drill")
    wait_run(airflow, "dr_drill", run["run_id"], ("success", "failed"))

    assert dag_runs(airflow, "dr_drill")[run["run_id"]]["state"] == "failed"
    states = task_states(airflow, "dr_drill", run["run_id"])
    assert states["pick"] == "failed" and states["report"] == "failed", states
    about = [text for text in slack.texts() if run["run_id"] in text]
    assert len(about) == 1, about
    assert "DR drill FAILED" in about[0] and "no backup redis/20200101T000000Z" in about[0] and "None" not in about[0]


def test_the_postgres_full_form_creates_a_run(ui, airflow) -> None:
    dialog = open_trigger_form(ui, airflow, "backup_postgres_full")

    run = submit(dialog, airflow, "backup_postgres_full")

    assert conf_of(run) == {"prune_dry_run": False}  # the DAG stays paused: the run is queued, nothing is dumped


def test_the_backups_page_shows_the_late_service_late(ui, airflow) -> None:
    ui.goto(f"http://127.0.0.1:{airflow.port}/plugin/backups")
    page = ui.frame_locator("iframe").first
    row = page.locator('tr[data-job="redis/rdb"]')
    row.wait_for()
    assert row.locator("[data-freshness]").get_attribute("data-freshness") == "late"
    assert "late" in row.inner_text() and airflow.redis_set in row.inner_text()
    assert "Times in Asia/Seoul" in page.locator("body").inner_text()
    ui.screenshot(path=str(SCREENSHOTS / "backups-page.png"), full_page=True)


def test_a_drill_runs_report_is_its_note_linking_the_backups_page(ui, airflow) -> None:
    dialog = open_trigger_form(ui, airflow, "dr_drill")
    choose(dialog, "service", "redis")
    dialog.locator("input[name=element_backup_id]").fill("20200102T000000Z")
    end_earlier_runs(airflow, "dr_drill")
    run = submit(dialog, airflow, "dr_drill")
    wait_run(airflow, "dr_drill", run["run_id"], ("success", "failed"))

    ui.goto(f"http://127.0.0.1:{airflow.port}/dags/dr_drill/runs/{run['run_id']}")
    ui.get_by_text("DR drill: FAILED").first.wait_for()  # the run header shows the note's first line
    ui.get_by_role("button", name="Edit note").first.click()  # the header's pencil opens the whole note, rendered
    note_dialog = ui.get_by_role("dialog")
    link = note_dialog.get_by_role("link", name="Backups page")
    link.wait_for()
    shown = note_dialog.inner_text()
    assert "Dag Run Note" in shown and "DR drill: FAILED" in shown and "**" not in shown  # rendered, not raw
    assert link.get_attribute("href") == f"http://127.0.0.1:{airflow.port}/plugin/backups"
    ui.screenshot(path=str(SCREENSHOTS / "drill-run-note.png"), full_page=True)
    with ui.context.expect_page() as opened:  # the UI opens Markdown links in a new tab
        link.click()
    backups = opened.value
    backups.wait_for_url(f"http://127.0.0.1:{airflow.port}/plugin/backups")
    backups.frame_locator("iframe").first.locator('tr[data-job="redis/rdb"]').wait_for()
    backups.close()
    ui.keyboard.press("Escape")
    ((note,),) = query(airflow, "SELECT n.content FROM dag_run_note n JOIN dag_run r ON r.id = n.dag_run_id "
                                "WHERE r.dag_id = 'dr_drill' AND r.run_id = %s", run["run_id"])
    assert note.startswith("**DR drill: FAILED**\n\nError: DrillParamError: no backup redis/20200102T000000Z")
    assert f"[Backups page](http://127.0.0.1:{airflow.port}/plugin/backups)" in note and len(note) <= 1000
