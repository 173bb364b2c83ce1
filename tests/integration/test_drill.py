"""The dr_drill DAG end to end on real services (local backend): PostgreSQL backup → offsite (moto S3) → drill.

One real backup is taken once per module from a scratch cluster loaded with
include/estate/erp_sample.sql, checked, and uploaded to a fresh bucket per test,
so each test can damage its own offsite copy. The drill runs with `dag.test()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pyrage import x25519

from erp_backup import steps
from erp_backup.crypto import decrypt_bytes, encrypt_bytes, fingerprint
from erp_backup.drill import ledger, records, runner
from erp_backup.drill.params import DrillParamError
from erp_backup.drill.pick import derive_seed
from erp_backup.drill.targets import drill_scratch_root
from erp_backup.manifest import Manifest
from erp_backup.plan import Plan, load_plan
from erp_backup.scratch.local import PG_PREFIX
from erp_backup.scratch.postgres import ScratchPostgres
from erp_backup.services import get_service
from erp_backup.sealing import SEALED_NAME
from erp_backup.services.base import RunInfo
from tests.conftest import AGE_KEYS
from tests.fixtures.keys import IDENTITY_ENV, AgeKeys
from tests.fixtures.s3 import S3Endpoint
from tests.fixtures.slack import SlackReceiver
from tests.integration.dagrun import run_dag, write_plan

pytestmark = pytest.mark.integration

SAMPLE_SQL = Path(__file__).resolve().parents[2] / "include" / "estate" / "erp_sample.sql"
DB = "erp_estate"
BACKUP_MOMENT = datetime(2026, 11, 28, 17, 0, tzinfo=timezone.utc)
PREFIX = "erp"


def only_services(*names: str, extra: Callable[[dict], None] | None = None) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        for name, service in data["services"].items():
            service["enabled"] = name in names
        data["services"]["postgres"]["backups"]["full"]["enabled"] = True
        if extra:
            extra(data)
    return edit


def pg_conn_json(cluster: ScratchPostgres) -> str:
    return json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": cluster.port, "login": "postgres",
                       "schema": "postgres"})


@dataclass
class PgBackup:
    cluster: ScratchPostgres
    staging: Path
    backup_id: str
    manifest: Manifest  # as stored: the clear part of the sealed manifest
    app_role: str

    @property
    def sealed(self) -> dict[str, Any]:
        """The sealed part, decrypted with the test identity: the whole manifest and the stored name of each file."""
        data = (self.staging / "postgres" / "full" / self.backup_id / SEALED_NAME).read_bytes()
        return json.loads(decrypt_bytes(data, [x25519.Identity.from_str(AGE_KEYS.identity)]))

    @property
    def full(self) -> Manifest:
        return Manifest.from_json(json.dumps(self.sealed["manifest"]))

    def table_rows(self) -> int:
        return sum(t["rows"] for t in self.full.details["databases"][DB]["tables"] if t["kind"] == "r")


@pytest.fixture(scope="module")
def pg_backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgBackup]:
    """A real full backup (pg_dump via the backup step) of the ERP sample, checksummed on staging."""
    cluster = ScratchPostgres.new("drill-src", owner="pytest")
    cluster.create()
    cluster.start()
    try:
        app_role = f"erp_app_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DB}")
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"app_role={app_role}", "-d", cluster.conninfo(DB),
             "-f", str(SAMPLE_SQL)],
            check=True, capture_output=True, timeout=300,
        )
        staging = tmp_path_factory.mktemp("drill-staging")
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ERP_BACKUP_ROOT", str(staging))
            plan = load_plan(write_plan(staging / "plan.yaml", edit=only_services("postgres"), bucket="unused", prefix=PREFIX))
            job = plan.job("postgres", "full")
            from airflow.sdk import Connection

            source = Connection(conn_id="erp_postgres", conn_type="postgres", host="127.0.0.1", port=cluster.port,
                                login="postgres", schema="postgres")
            run = RunInfo(dag_id=job.dag_id, run_id=f"scheduled__{BACKUP_MOMENT.isoformat()}", run_after=BACKUP_MOMENT,
                          logical_date=BACKUP_MOMENT)
            backup_id = steps.backup(plan, job, run, get_connection=lambda conn_id: source)
            steps.checksum(plan, job, backup_id)
            manifest = Manifest.read(staging / "postgres" / "full" / backup_id / "manifest.json")
        yield PgBackup(cluster, staging, backup_id, manifest, app_role)
    finally:
        cluster.destroy()


@dataclass
class Drill:
    plan: Plan
    root: Path
    bucket: str
    s3: S3Endpoint
    backup: PgBackup

    def key(self, relative: str, backup_type: str = "full", backup_id: str | None = None) -> str:
        return f"{PREFIX}/postgres/{backup_type}/{backup_id or self.backup.backup_id}/{relative}"

    def read_object(self, key: str) -> bytes:
        return self.s3.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put_object(self, key: str, data: bytes) -> None:
        self.s3.client().put_object(Bucket=self.bucket, Key=key, Body=data)

    def edit_offsite_manifest(self, edit: Callable[[dict], None]) -> None:
        """Replace the sealed manifest with an edited one, sealed and stored as the uploader stores it (the clear
        manifest listing its new SHA-256, with its own as metadata), so it passes the offsite trust check and the drill
        reaches the step under test: a manifest that was wrong at upload, not one changed afterwards
        (tests/integration/test_offsite_trust_stores.py)."""
        sealed = self.backup.sealed
        edit(sealed["manifest"])
        sealed_body = encrypt_bytes(json.dumps(sealed).encode(), [AGE_KEYS.recipient])
        self.put_object(self.key(SEALED_NAME), sealed_body)
        data = json.loads(self.read_object(self.key("manifest.json")))
        (entry,) = [entry for entry in data["files"] if entry["path"] == SEALED_NAME]
        entry.update(size=len(sealed_body), sha256=hashlib.sha256(sealed_body).hexdigest())
        body = json.dumps(data, indent=2).encode()
        self.s3.client().put_object(Bucket=self.bucket, Key=self.key("manifest.json"), Body=body,
                                    Metadata={"sha256": hashlib.sha256(body).hexdigest()})

    def run_record(self, run_id: str) -> Path:
        return records.run_dir(self.plan, run_id)

    def report(self, run_id: str) -> dict[str, Any]:
        return json.loads((self.run_record(run_id) / "report.json").read_text())


@pytest.fixture
def drill(pg_backup: PgBackup, s3_endpoint: S3Endpoint, s3_bucket, slack_receiver: SlackReceiver, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Drill]:
    """A plan whose offsite is a fresh bucket holding the module's backup; env connections to the source and Slack."""
    bucket = s3_bucket("drill")
    monkeypatch.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", s3_endpoint.conn_json())
    monkeypatch.setenv("AIRFLOW_CONN_ERP_POSTGRES", pg_conn_json(pg_backup.cluster))
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_BACKUP_ALERTS", slack_receiver.conn_json())
    plan_path = write_plan(tmp_path / "plan.yaml", edit=only_services("postgres"), bucket=bucket, prefix=PREFIX)
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(plan_path))
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(pg_backup.staging))
    staging_plan = load_plan(plan_path)
    steps.offsite_upload(staging_plan, staging_plan.job("postgres", "full"), pg_backup.backup_id)
    root = tmp_path / "backup"
    root.mkdir()
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(root))
    plan = load_plan(plan_path)
    yield Drill(plan, root, bucket, s3_endpoint, pg_backup)
    remove_scratch_root(plan)


def scratch_left(plan: Plan) -> list[str]:
    """Scratch dirs under the drill's scratch root, and processes whose command line names one."""
    root = drill_scratch_root(plan)
    dirs = [str(path) for path in root.iterdir()]
    processes = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(root) in cmdline:
                processes.append(cmdline)
    return dirs + processes


def remove_scratch_root(plan: Plan) -> None:
    """The drill's (empty) scratch root under /tmp; a test that left something there already failed."""
    root = drill_scratch_root(plan)
    if not any(root.iterdir()):
        root.rmdir()


def soon(minutes: int) -> datetime:
    """A distinct logical date just after now: sets captured by the tests are never after the drill's moment."""
    return (datetime.now(timezone.utc) + timedelta(minutes=minutes)).replace(second=0, microsecond=0)


def conf(**overrides: Any) -> dict[str, Any]:
    """A complete run conf: dag.test() keeps the last run's conf as the DAG's param values."""
    return {"service": "postgres", "backup_id": "", "source": "offsite", "target_time": "", "keep_scratch": False,
            "seed": None, "backend": "local", **overrides}


def task_states(dag_run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances()}


# ───────────── the DAG ─────────────


def test_dag_follows_the_plan_and_policy():
    from airflow.dag_processing.dagbag import DagBag

    dagbag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags" / "dr_drill.py"))  # run_dag changes retries
    plan = load_plan()
    dag = dagbag.dags["dr_drill"]
    assert dagbag.import_errors == {}
    assert dag.timetable.expression == plan.drill.schedule == "0 6 * * 0"
    assert str(getattr(dag.timetable.timezone, "name", dag.timetable.timezone)) == plan.drill.timezone
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert {"drill", "dr"} <= set(dag.tags) and "idempotent" in dag.doc_md
    for task in dag.tasks:
        assert task.retries >= 2 and task.retry_exponential_backoff, task.task_id
        assert task.on_failure_callback, f"{task.task_id} has no Slack failure callback"
        assert task.owner != "airflow"
    assert dag.get_task("drill.start_target").is_setup
    teardown = dag.get_task("drill.teardown")
    assert teardown.is_teardown and teardown.trigger_rule == "all_done"
    assert dag.get_task("report").trigger_rule == "all_done"
    assert {"clean_leftovers", "drill.start_target", "drill.fetch"} <= dag.get_task("pick").downstream_task_ids
    assert {"drill.start_target", "drill.fetch"} <= dag.get_task("drill.restore").upstream_task_ids
    assert {"drill.verify", "drill.start_target"} <= teardown.upstream_task_ids
    assert "clean_leftovers" in dag.get_task("drill.start_target").upstream_task_ids
    params = dag.params
    assert set(params.keys()) == {"service", "backup_id", "source", "target_time", "keep_scratch", "seed", "backend"}
    assert all(params.get_param(name).description for name in params.keys())


def test_unknown_service_is_refused_with_the_valid_ones(dagbag, airflow_db, drill: Drill):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=r"'mysql' is not one of \['all', 'random', .*'postgres'"):
        dagbag.dags["dr_drill"].test(logical_date=soon(10), run_conf=conf(service="mysql"))
    run = RunInfo(dag_id="dr_drill", run_id="manual__x", run_after=datetime.now(timezone.utc))
    with pytest.raises(DrillParamError, match="valid: all, random, postgres$"):
        runner.pick(drill.plan, {"service": "mysql"}, run)


def test_drill_restores_the_real_postgres_backup_and_reports_plausible_numbers(dagbag, airflow_db, drill: Drill, slack_receiver):
    moment = soon(1)
    dag_run, _ = run_dag(dagbag, "dr_drill", moment, retries=0, conf=conf())

    states = task_states(dag_run)
    assert states == {"pick": "success", "clean_leftovers": "success", "drill.start_target": "success",
                      "drill.fetch": "success", "drill.restore": "success", "drill.verify": "success",
                      "drill.teardown": "success", "report": "success"}, states
    assert dag_run.state == "success"
    report = drill.report(dag_run.run_id)
    assert report["status"] == "passed" and report["request"]["seed"] == derive_seed(dag_run.run_id)
    (result,) = report["services"]
    assert (result["service"], result["backup_type"], result["backup_id"]) == ("postgres", "full", drill.backup.backup_id)
    assert result["source_description"] == f"s3://{drill.bucket}/{PREFIX}"
    assert result["sizes"]["set_bytes"] == result["sizes"]["fetched_bytes"] == drill.backup.manifest.total_size
    assert result["sizes"]["restored_bytes"] > result["sizes"]["set_bytes"]  # the dumps are stored compressed
    assert result["restore_summary"]["rows_checked"] == drill.backup.table_rows() > 1000
    durations, rto = result["durations_s"], result["rto"]
    assert all(durations[step] > 0 for step in ("start_target", "fetch", "restore", "verify", "teardown"))
    assert rto["measured_s"] == pytest.approx(durations["fetch"] + durations["restore"] + durations["verify"], abs=0.01)
    assert rto["scale"] == 1.0 and rto["extrapolated_s"] == pytest.approx(rto["measured_s"])  # the newest set was drilled
    assert rto["target_s"] == 7200 and rto["within_target"] is True
    assert result["throughput_mb_s"]["fetch"] > 0 and result["throughput_mb_s"]["restore"] > 0
    assert any(f"{DB}: " in check and "content hashes match" in check for check in result["checks"])
    assert result["choice"]["candidates"] == 1 and result["choice"]["last_drilled"] is None

    markdown = (drill.run_record(dag_run.run_id) / "report.md").read_text()
    assert f"postgres | full/{drill.backup.backup_id} | passed" in markdown and "RTO formula" in markdown
    local = ledger.parse(records.ledger_path(drill.plan).read_text())
    offsite = ledger.parse(drill.read_object(f"{PREFIX}/drills/ledger.jsonl").decode())
    assert local == offsite and len(local) == 1
    assert local[0].status == "passed" and local[0].backup_id == drill.backup.backup_id
    assert local[0].rto_measured_s == rto["measured_s"] and local[0].rto_target_s == 7200 and local[0].rto_met is True
    assert [text for text in slack_receiver.texts() if "DR drill passed" in text and drill.backup.backup_id in text]
    assert scratch_left(drill.plan) == []
    assert not records.work_dir(drill.plan, dag_run.run_id).exists()

    # A rerun of the report step appends nothing twice.
    from erp_backup.drill.report import finish

    finish(drill.plan, dag_run.run_id, notify=False)
    assert len(records.ledger_path(drill.plan).read_text().splitlines()) == 1


def test_a_flipped_byte_offsite_fails_the_fetch_and_slack_names_the_file(dagbag, airflow_db, drill: Drill, slack_receiver):
    dump = drill.backup.sealed["stored"][drill.backup.full.details["databases"][DB]["file"]]  # its opaque name offsite
    data = bytearray(drill.read_object(drill.key(dump)))
    data[len(data) // 2] ^= 0x01
    drill.put_object(drill.key(dump), bytes(data))

    dag_run, _ = run_dag(dagbag, "dr_drill", soon(2), retries=0,
                         conf=conf())
    states = task_states(dag_run)
    assert states["drill.fetch"] == "failed" and states["drill.restore"] == "upstream_failed"
    assert states["drill.teardown"] == "success" and states["report"] == "failed" and dag_run.state == "failed"
    (result,) = drill.report(dag_run.run_id)["services"]
    assert result["failed_step"] == "fetch" and "ChecksumMismatch" in result["error"] and dump in result["error"]
    naming = [text for text in slack_receiver.texts() if dump in text]
    assert any("DR drill FAILED" in text for text in naming), slack_receiver.texts()
    assert scratch_left(drill.plan) == []


def test_a_wrong_identity_fails_the_fetch_naming_the_set_and_the_recipient(dagbag, airflow_db, drill: Drill,
                                                                          slack_receiver, monkeypatch):
    monkeypatch.setenv(IDENTITY_ENV, AgeKeys.generate().identity_conn_json())
    dag_run, _ = run_dag(dagbag, "dr_drill", soon(6), retries=0, conf=conf())
    states = task_states(dag_run)
    assert states["drill.fetch"] == "failed" and states["drill.restore"] == "upstream_failed"
    assert states["drill.teardown"] == "success" and dag_run.state == "failed"
    (result,) = drill.report(dag_run.run_id)["services"]
    assert result["failed_step"] == "fetch" and "EncryptionError" in result["error"]
    assert f"backup postgres/full/{drill.backup.backup_id}" in result["error"]
    assert fingerprint(AGE_KEYS.recipient) in result["error"]
    assert any("DR drill FAILED" in text and fingerprint(AGE_KEYS.recipient) in text for text in slack_receiver.texts())
    assert scratch_left(drill.plan) == []
    assert not any(p.is_file() for p in records.work_dir(drill.plan, dag_run.run_id).rglob("*"))


def test_a_table_hash_that_no_longer_matches_fails_at_verify(dagbag, airflow_db, drill: Drill):
    tables = drill.backup.full.details["databases"][DB]["tables"]
    victim = next(t for t in tables if t["kind"] == "r" and t["rows"] > 0)

    def tamper(data: dict) -> None:
        for table in data["details"]["databases"][DB]["tables"]:
            if (table["schema"], table["name"]) == (victim["schema"], victim["name"]):
                table["content_hash"] = str(int(table["content_hash"]) + 1)

    drill.edit_offsite_manifest(tamper)
    dag_run, _ = run_dag(dagbag, "dr_drill", soon(3), retries=0,
                         conf=conf(backup_id=drill.backup.backup_id))
    states = task_states(dag_run)
    assert states["drill.fetch"] == "success" and states["drill.restore"] == "success"
    assert states["drill.verify"] == "failed" and states["drill.teardown"] == "success" and dag_run.state == "failed"
    (result,) = drill.report(dag_run.run_id)["services"]
    assert result["failed_step"] == "verify"
    assert f"{DB}.{victim['schema']}.{victim['name']}: content hash" in result["error"]
    assert scratch_left(drill.plan) == []


def test_a_backup_id_of_an_incomplete_set_is_rejected_at_pick(dagbag, airflow_db, drill: Drill, slack_receiver):
    incomplete = "20261127T170000Z"
    drill.put_object(drill.key("globals.sql.zst", backup_id=incomplete), b"partial upload")
    dag_run, _ = run_dag(dagbag, "dr_drill", soon(4), retries=0,
                         conf=conf(backup_id=incomplete))
    states = task_states(dag_run)
    assert states["pick"] == "failed" and states["report"] == "failed" and dag_run.state == "failed"
    report = drill.report(dag_run.run_id)
    assert f"backup postgres/full/{incomplete}" in report["error"] and "is incomplete" in report["error"]
    assert f"complete sets: full/{drill.backup.backup_id}" in report["error"]
    (alert,) = slack_receiver.texts()  # one alert for the failed run: the report's summary
    assert "DR drill FAILED" in alert and f"backup postgres/full/{incomplete}" in alert and "None" not in alert

    run = RunInfo(dag_id="dr_drill", run_id="manual__y", run_after=datetime.now(timezone.utc))
    with pytest.raises(DrillParamError, match=f"no backup postgres/20260101T000000Z .* complete sets: full/{drill.backup.backup_id}"):
        runner.pick(drill.plan, {"service": "postgres", "backup_id": "20260101T000000Z"}, run)


def test_teardown_runs_after_a_failed_restore_and_leaves_nothing(dagbag, airflow_db, drill: Drill):
    def point_dump_at_globals(data: dict) -> None:
        data["details"]["databases"][DB]["file"] = data["details"]["globals"]["file"]  # pg_restore gets plain SQL

    drill.edit_offsite_manifest(point_dump_at_globals)
    dag_run, _ = run_dag(dagbag, "dr_drill", soon(5), retries=0,
                         conf=conf())
    states = task_states(dag_run)
    assert states["drill.start_target"] == "success" and states["drill.restore"] == "failed"
    assert states["drill.verify"] == "upstream_failed" and states["drill.teardown"] == "success"
    state = records.ServiceState(drill.plan, dag_run.run_id, "postgres")
    assert "pg_restore" in state.read("restore")["error"]
    target = state.target()
    assert target is not None and not Path(target.base_dir).exists()
    assert any("stopped PostgreSQL" in line for line in state.read("teardown")["done"])
    assert scratch_left(drill.plan) == []
    assert not records.work_dir(drill.plan, dag_run.run_id).exists()


# ───────────── the steps, called directly ─────────────


def test_local_source_verifies_staging_in_place_and_keep_scratch_keeps_the_target(drill: Drill, monkeypatch):
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(drill.backup.staging))
    plan = load_plan(drill.plan.path)
    run = RunInfo(dag_id="dr_drill", run_id="manual__local", run_after=datetime.now(timezone.utc))
    (chosen,) = runner.pick(plan, {"service": "postgres", "source": "local", "keep_scratch": True}, run)
    assert chosen["source_description"] == f"staging {drill.backup.staging}"
    try:
        runner.start_target(plan, chosen)
        fetched = runner.fetch(plan, chosen)
        assert fetched["bytes"] == drill.backup.manifest.total_size
        runner.restore(plan, chosen)
        runner.verify(plan, chosen)
        runner.teardown(plan, chosen)
        target = records.ServiceState(plan, run.run_id, "postgres").target()
        with psycopg.connect(target.pg_conninfo.replace("dbname=postgres", f"dbname={DB}")) as conn:  # kept, restored
            assert conn.execute("SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname = %s",
                                (drill.backup.app_role,)).fetchone()[0] == 1
        assert (drill.backup.staging / "postgres" / "full" / drill.backup.backup_id / "manifest.json").is_file()
    finally:
        removed = runner.clean_leftovers(plan, "manual__next", "local")  # the next drill removes kept targets
    assert any(PG_PREFIX in item for item in removed)
    assert scratch_left(plan) == []
    remove_scratch_root(plan)


def test_leftovers_of_a_crashed_drill_are_cleaned_by_the_next(drill: Drill):
    from erp_backup.drill.targets import LocalBackend, ProductionGuard

    local = LocalBackend(drill_scratch_root(drill.plan), ProductionGuard([]))
    crashed = local.start(get_service("postgres").scratch_spec("full", {}), "postgres", "full", "drill:scheduled__crashed")
    redis_dir = local.start(get_service("redis").scratch_spec("rdb", {}), "redis", "rdb", "drill:scheduled__crashed")
    from erp_backup.scratch.redis import ScratchRedis

    server = ScratchRedis(dir=Path(redis_dir.base_dir) / "data", port=redis_dir.port).start()
    stray_work = records.work_dir(drill.plan, "scheduled__crashed", "postgres")
    stray_work.mkdir(parents=True)
    mine = local.start(get_service("redis").scratch_spec("rdb", {}), "redis", "rdb", "drill:manual__current")
    assert ScratchPostgres(Path(crashed.base_dir), port=crashed.port).is_running() and server.is_running()

    removed = runner.clean_leftovers(drill.plan, "manual__current", "local")
    assert len(removed) == 3 and not stray_work.exists()
    assert not Path(crashed.base_dir).exists() and not Path(redis_dir.base_dir).exists()
    assert not os.path.exists(f"/proc/{server.pid}") or "redis-server" not in Path(f"/proc/{server.pid}/cmdline").read_text()
    assert Path(mine.base_dir).exists()  # the current run's target is kept
    local.stop(mine)
    assert scratch_left(drill.plan) == []


def test_target_time_outside_the_archive_is_refused_listing_the_coverage(drill: Drill):
    run = RunInfo(dag_id="dr_drill", run_id="manual__pitr", run_after=datetime.now(timezone.utc))
    with pytest.raises(DrillParamError, match=r"target_time 2026-11-26T10:15:00\+09:00: .*outside what the backups cover: nothing"):
        runner.pick(drill.plan, {"service": "postgres", "target_time": "2026-11-26T10:15:00+09:00"}, run)


def test_the_weekly_run_drills_one_set_of_every_enabled_service_as_mapped_tasks(dagbag, airflow_db, drill: Drill,
                                                                                 tmp_path: Path, monkeypatch):
    import dataclasses

    from tests.integration.test_gitlab_local import StandinHost

    plan_path = write_plan(tmp_path / "weekly.yaml", edit=only_services("postgres", "gitlab"), bucket=drill.bucket,
                           prefix=PREFIX)
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(plan_path))
    plan = load_plan(plan_path)
    host = StandinHost(tmp_path)
    staging = dataclasses.replace(plan, backup_root=tmp_path / "gitlab-staging")
    job = dataclasses.replace(plan.job("gitlab", "full"), options=host.options())
    moment = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    gitlab_id = steps.backup(staging, job, RunInfo(job.dag_id, "scheduled__gl", moment, logical_date=moment),
                             get_connection=lambda conn_id: pytest.fail("local mode needs no connection"))
    steps.checksum(staging, job, gitlab_id)
    steps.offsite_upload(staging, job, gitlab_id)

    dag_run, _ = run_dag(dagbag, "dr_drill", soon(6), retries=0, conf=conf(service="all"))
    states = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
    for step in ("start_target", "fetch", "restore", "verify", "teardown"):
        assert states[(f"drill.{step}", 0)] == states[(f"drill.{step}", 1)] == "success", states
    assert dag_run.state == "success"
    report = drill.report(dag_run.run_id)
    assert [(r["service"], r["status"]) for r in report["services"]] == [("gitlab", "prepared"), ("postgres", "passed")]
    assert report["status"] == "passed"
    markdown = (drill.run_record(dag_run.run_id) / "report.md").read_text()
    assert "| gitlab | full/" in markdown and "| postgres | full/" in markdown
    assert scratch_left(plan) == []
