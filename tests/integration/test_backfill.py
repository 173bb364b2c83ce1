"""A real backfill: `airflow backfill create` run by the scheduler of `airflow standalone`.

The README's backfill over nine past days of `backup_postgres_full`, with parallelism 4 and
the backfill's default max_active_runs, gives nine distinct verified sets, each recording the
real capture time: every task runs one window at a time (no two task instances of one task
overlap). Reprocessing completed runs adds nothing offsite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from erp_backup.manifest import Manifest
from erp_backup.scratch.base import free_port
from erp_backup.sets import SetState, list_sets
from tests.integration.dagrun import write_plan
from tests.integration.test_backup_postgres_dag import PREFIX, offsite_keys, pg_conn_json, source  # noqa: F401

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAG_ID = "backup_postgres_full"
EXPECTED_IDS = [f"202603{day:02d}T170000Z" for day in range(1, 10)]
TASK_IDS = ("backup", "checksum", "offsite_upload", "retention_prune")


def standalone_env(home: Path, port: int, metadata_db: str, plan: Path, backup_root: Path) -> dict[str, str]:
    """The environment of an `airflow standalone` over this checkout's DAGs and plugins, on 127.0.0.1:`port`."""
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_db,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "PYTHONPATH": str(ROOT / "plugins"),
        "ERP_BACKUP_PLAN": str(plan),
        "ERP_BACKUP_ROOT": str(backup_root),
    }


class Standalone:
    def __init__(self, env: dict[str, str], home: Path, port: int):
        self.env, self.home, self.port = env, home, port
        self.log = open(home / "standalone.log", "wb")
        self.proc = subprocess.Popen(
            [str(BIN / "airflow"), "standalone"], env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
            return json.load(response)

    def wait_healthy(self, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.tail()
            try:
                health = self.api("/api/v2/monitor/health")
                if all(health.get(part, {}).get("status") == "healthy" for part in ("scheduler", "dag_processor")):
                    return
            except OSError:
                pass
            time.sleep(2)
        raise AssertionError(f"standalone not healthy in {timeout}s:\n{self.tail()}")

    def cli(self, *args: str) -> str:
        done = subprocess.run([str(BIN / "airflow"), *args], env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def create_backfill_when_idle(self, *extra: str, to_date: str = "2026-03-04", timeout: float = 180) -> None:
        """The scheduler marks a backfill complete a little after its last run; only one may be active."""
        argv = [str(BIN / "airflow"), "backfill", "create", "--dag-id", DAG_ID,
                "--from-date", "2026-03-01", "--to-date", to_date, *extra]
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                return
            if "AlreadyRunningBackfill" not in done.stderr or time.monotonic() > deadline:
                raise AssertionError(done.stdout + done.stderr)
            time.sleep(3)

    def runs(self) -> list[dict]:
        out = self.cli("dags", "list-runs", DAG_ID, "-o", "json")
        lines = [line for line in out.splitlines() if line.startswith("[{") or line == "[]"]
        return json.loads(lines[-1]) if lines else []

    def wait_runs(self, count: int, timeout: float = 600) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = [run for run in self.runs() if run["run_id"].startswith("backfill__")]
            if len(runs) >= count and all(run["state"] in ("success", "failed") for run in runs):
                return runs
            time.sleep(3)
        raise AssertionError(f"backfill runs not finished: {self.runs()}\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return (self.home / "standalone.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


@pytest.fixture
def metadata_db():
    """A PostgreSQL metadata DB: scheduler, API server and CLI write concurrently, which SQLite locks."""
    import uuid

    import psycopg

    name = f"airflow_backfill_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def standalone(tmp_path, source, s3_endpoint, s3_bucket, metadata_db):  # noqa: F811
    home = tmp_path / "airflow"
    home.mkdir()
    port = free_port()
    bucket = s3_bucket("backfill")
    plan = write_plan(tmp_path / "plan.yaml", bucket=bucket, prefix=PREFIX,
                      edit=lambda d: d["services"]["postgres"]["options"].update(databases=["erp"]))
    env = {
        **standalone_env(home, port, metadata_db, plan, tmp_path / "backup"),
        "ERP_BACKUP_DISABLE": "gitlab,redis,rabbitmq,minio,milvus",
        "AIRFLOW_CONN_ERP_POSTGRES": pg_conn_json(source.port),
        "AIRFLOW_CONN_BACKUP_OFFSITE": s3_endpoint.conn_json(),
        "AIRFLOW_CONN_SLACK_BACKUP_ALERTS": '{"conn_type": "slackwebhook", "password": "http://127.0.0.1:9/x"}',
    }
    server = Standalone(env, home, port)
    server.bucket, server.backup_root, server.metadata_db = bucket, tmp_path / "backup", metadata_db
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def task_windows(metadata_db: str) -> dict[str, list[tuple[datetime, datetime, str]]]:
    """(start, end, run_id) of every backfilled task instance, by task id, in start order."""
    import psycopg

    name = metadata_db.rsplit("/", 1)[1]
    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={name}") as db:
        rows = db.execute(
            "SELECT task_id, start_date, end_date, run_id FROM task_instance "
            "WHERE dag_id = %s AND run_id LIKE 'backfill__%%' ORDER BY start_date", (DAG_ID,),
        ).fetchall()
    windows: dict[str, list[tuple[datetime, datetime, str]]] = {}
    for task_id, start, end, run_id in rows:
        windows.setdefault(task_id, []).append((start, end, run_id))
    return windows


def test_nine_day_backfill_runs_one_window_at_a_time_then_reprocess_adds_nothing_offsite(standalone, s3_endpoint):
    deadline = time.monotonic() + 300
    while DAG_ID not in standalone.cli("dags", "list", "-o", "plain") and time.monotonic() < deadline:
        time.sleep(3)
    standalone.cli("dags", "unpause", DAG_ID)
    started = datetime.now(timezone.utc)
    # The README's command over nine windows; the backfill's own max_active_runs (10) lets all start at once.
    standalone.cli("backfill", "create", "--dag-id", DAG_ID, "--from-date", "2026-03-01", "--to-date", "2026-03-10")
    runs = standalone.wait_runs(9)
    assert [run["state"] for run in runs] == ["success"] * 9, (runs, standalone.tail())

    windows = task_windows(standalone.metadata_db)
    assert set(windows) == set(TASK_IDS)
    for task_id, spans in windows.items():
        assert len(spans) == 9, (task_id, spans)
        for (_, end, run_id), (start, _, next_run) in zip(spans, spans[1:]):
            assert end <= start, f"{task_id} of {run_id} and {next_run} overlapped"

    # Unpausing also lets the scheduler take the latest regular run; only the backfilled sets are checked.
    sets = [s for s in list_sets(standalone.backup_root, "postgres", "full") if s.backup_id < "20261101"]
    assert [s.backup_id for s in sets] == EXPECTED_IDS
    for backup_set in sets:
        assert backup_set.state is SetState.OFFSITE
        manifest = Manifest.read(backup_set.manifest_path)
        logical = datetime.fromisoformat(manifest.run["logical_date"])
        assert logical.strftime("%Y%m%dT%H%M%SZ") == backup_set.backup_id
        # The real capture happened now, not on the backfilled date.
        assert manifest.captured_started_at >= started > logical
        assert manifest.run["run_id"].startswith("backfill__")
    client = s3_endpoint.client()
    keys = {key: etag for key, etag in offsite_keys(client, standalone.bucket).items() if key.split("/")[3] in EXPECTED_IDS}
    assert {key.split("/")[3] for key in keys} == set(EXPECTED_IDS)

    first_done = datetime.now(timezone.utc)
    standalone.create_backfill_when_idle("--reprocess-behavior", "completed", to_date="2026-03-04")
    reprocessed = tuple(f"backfill__2026-03-{day:02d}T17:00" for day in (1, 2, 3))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        runs = [run for run in standalone.runs() if run["run_id"].startswith(reprocessed)]
        if len(runs) == 3 and all(
            run["state"] == "success" and run.get("start_date") and datetime.fromisoformat(run["start_date"]) > first_done
            for run in runs
        ):
            break
        time.sleep(3)
    else:
        raise AssertionError(f"reprocessed runs did not finish: {standalone.runs()}\n{standalone.tail()}")
    after = {key: etag for key, etag in offsite_keys(client, standalone.bucket).items() if key.split("/")[3] in EXPECTED_IDS}
    assert after == keys  # same objects, same ETags: no duplicates
    assert [s.backup_id for s in list_sets(standalone.backup_root, "postgres", "full")][:9] == EXPECTED_IDS
