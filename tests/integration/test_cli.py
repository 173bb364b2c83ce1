"""The restore CLI as an operator runs it, with Airflow down: `python -m erp_backup` in a subprocess.

One real PostgreSQL full backup is made per module (the sample estate in a scratch
cluster, through `steps.backup` → `steps.checksum` → `steps.offsite_upload` to a
moto S3 bucket), then listed, verified and restored into other scratch clusters.

Every CLI run gets a fresh empty AIRFLOW_HOME and a metadata DB URL that cannot be
opened (a SQLite file in a directory that does not exist): no Airflow DB, scheduler
or API server exists, and any attempt to use one would fail. Connections come only
from AIRFLOW_CONN_* variables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from erp_backup import steps
from erp_backup.drill import ledger
from erp_backup.drill.ledger import LEDGER_KEY
from erp_backup.manifest import Manifest
from erp_backup.plan import load_plan
from erp_backup.scratch.postgres import ScratchPostgres
from erp_backup.services.base import RunInfo
from erp_backup.services.postgres import content as pg_content
from erp_backup.sets import FAILED_NAME, BackupSet, SetState
from tests.fixtures.factories import drill_entry
from tests.fixtures.pg_estate import SAMPLE_SQL
from tests.fixtures.s3 import S3Endpoint
from tests.integration.dagrun import write_plan
from tests.unit.test_offsite_fs import flip_byte

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DB = "erp"
CAPTURED = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)
BACKUP_ID = "20260301T020000Z"
INCOMPLETE_ID = "20260302T020000Z"
PREFIX = "erp"
TABLES_PER_TENANT = 8
UNREACHABLE_AIRFLOW_DB = "sqlite:////nonexistent-airflow-db-dir/airflow.db"


@dataclass
class Estate:
    root: Path
    plan: Path
    bucket: str
    s3: S3Endpoint
    source: ScratchPostgres
    app_role: str
    manifest: Manifest


def query(conninfo: str, statement: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute(statement, params).fetchall()


def inventory_of(conninfo: str, schema: str | None = None) -> list[pg_content.TableContent]:
    with psycopg.connect(conninfo) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        pg_content.apply_session_settings(conn)
        return pg_content.inventory(conn, schema)


@pytest.fixture(scope="module")
def estate(s3_endpoint: S3Endpoint, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("cli")
    root = base / "staging"
    root.mkdir()
    app_role = f"erp_app_{uuid.uuid4().hex[:8]}"
    source = ScratchPostgres.new("cli-source", owner="pytest")
    try:
        source.create()
        source.start()
        with psycopg.connect(source.conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DB}")
        subprocess.run(
            ["psql", "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1", f"--set=app_role={app_role}",
             f"--dbname={source.conninfo(DB)}", f"--file={SAMPLE_SQL}"],
            check=True, capture_output=True, timeout=300,
        )
        bucket = f"cli-offsite-{uuid.uuid4().hex[:8]}"
        s3_endpoint.client().create_bucket(Bucket=bucket)
        # This module covers the clear layout (`encrypt: false`, a per-service choice the plan allows):
        # every file under its own name, plain zstd. Sealed sets: tests/integration/test_cli_encrypted.py.
        plan_path = write_plan(base / "plan.yaml", bucket=bucket, prefix=PREFIX,
                               edit=lambda d: d["services"]["postgres"].update(encrypt=False))
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ERP_BACKUP_PLAN", str(plan_path))
            env.setenv("ERP_BACKUP_ROOT", str(root))
            env.setenv("AIRFLOW_CONN_ERP_POSTGRES", json.dumps({
                "conn_type": "postgres", "host": "127.0.0.1", "port": source.port, "login": "postgres",
                "schema": "postgres"}))
            env.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", s3_endpoint.conn_json())
            plan = load_plan()
            job = plan.job("postgres", "full")
            run = RunInfo(dag_id=job.dag_id, run_id=f"scheduled__{CAPTURED.isoformat()}", run_after=CAPTURED,
                          logical_date=CAPTURED)
            assert steps.backup(plan, job, run) == BACKUP_ID
            steps.checksum(plan, job, BACKUP_ID)
            steps.offsite_upload(plan, job, BACKUP_ID)
        backup_set = BackupSet(root, "postgres", "full", BACKUP_ID)
        assert backup_set.state is SetState.OFFSITE
        # A crashed run's leftovers, locally and offsite: data but no manifest.
        incomplete = BackupSet(root, "postgres", "full", INCOMPLETE_ID)
        incomplete.create_dir()
        shutil.copy(backup_set.path / "globals.sql.zst", incomplete.path)
        s3_endpoint.client().put_object(
            Bucket=bucket, Key=f"{PREFIX}/postgres/full/{INCOMPLETE_ID}/globals.sql.zst", Body=b"partial")
        yield Estate(root, plan_path, bucket, s3_endpoint, source, app_role, backup_set.manifest())
    finally:
        source.destroy()


@pytest.fixture
def airflow_home(tmp_path: Path) -> Path:
    home = tmp_path / "airflow-home"
    home.mkdir()
    yield home
    assert not list(home.rglob("*.db")), "the CLI created an Airflow metadata DB"


def cli(estate: Estate, home: Path, *argv: str, offsite: bool = False, command: list[str] | None = None,
        **env: str) -> subprocess.CompletedProcess:
    """Run the CLI in a clean environment: no Airflow DB, connections only from AIRFLOW_CONN_*."""
    environment = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT / "plugins"), "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": UNREACHABLE_AIRFLOW_DB,
        "ERP_BACKUP_ROOT": str(estate.root), "ERP_BACKUP_PLAN": str(estate.plan), **env,
    }
    if offsite:
        environment["AIRFLOW_CONN_BACKUP_OFFSITE"] = estate.s3.conn_json()
    return subprocess.run(
        (command or [sys.executable, "-m", "erp_backup"]) + list(argv),
        env=environment, capture_output=True, text=True, timeout=600, cwd=home,
    )


# --- list ------------------------------------------------------------------------------------------


def test_list_local(estate: Estate, airflow_home: Path) -> None:
    done = cli(estate, airflow_home, "list", "postgres", "--json")

    assert done.returncode == 0, done.stderr
    rows = {row["backup_id"]: row for row in json.loads(done.stdout)}
    assert {i: (r["backup_type"], r["state"]) for i, r in rows.items()} == {
        BACKUP_ID: ("full", "offsite"), INCOMPLETE_ID: ("full", "incomplete")}
    assert rows[BACKUP_ID]["size"] == estate.manifest.total_size
    assert rows[BACKUP_ID]["files"] == 3  # globals + the postgres and erp databases
    assert rows[BACKUP_ID]["captured_at"] == estate.manifest.captured_finished_at.isoformat()

    table = cli(estate, airflow_home, "list")
    assert table.returncode == 0
    assert [line.split()[:4] for line in table.stdout.splitlines()[1:]] == [
        ["postgres", "full", BACKUP_ID, "offsite"], ["postgres", "full", INCOMPLETE_ID, "incomplete"]]


def test_list_offsite_with_the_connection_from_the_environment(estate: Estate, airflow_home: Path) -> None:
    done = cli(estate, airflow_home, "list", "postgres", "full", "--from", "offsite", "--json", offsite=True)

    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)  # stdout is only our JSON: Airflow's own logging stays off it
    assert [(r["backup_id"], r["state"]) for r in rows] == [(BACKUP_ID, "offsite"), (INCOMPLETE_ID, "incomplete")]
    assert rows[0]["size"] == estate.manifest.total_size
    assert rows[0]["location"] == f"s3://{estate.bucket}/{PREFIX}/postgres/full/{BACKUP_ID}"

    without_connection = cli(estate, airflow_home, "list", "--from", "offsite")
    assert without_connection.returncode == 1
    assert "Airflow connection 'backup_offsite' is not defined" in without_connection.stderr
    assert "no AIRFLOW_CONN_BACKUP_OFFSITE in the environment" in without_connection.stderr


# --- verify ----------------------------------------------------------------------------------------


def test_verify_local_and_offsite_deep(estate: Estate, airflow_home: Path) -> None:
    local = cli(estate, airflow_home, "verify", "postgres", "full", BACKUP_ID, "--deep")
    assert local.returncode == 0, local.stderr
    assert f"OK: backup postgres/full/{BACKUP_ID} in {estate.root}: 3 files" in local.stdout

    remote = cli(estate, airflow_home, "verify", "postgres", "full", BACKUP_ID, "--from", "offsite", "--deep",
                 "--json", "--work-dir", str(airflow_home), offsite=True)
    assert remote.returncode == 0, remote.stderr
    report = json.loads(remote.stdout)
    assert report["ok"] is True and report["files"] == 3 and report["problems"] == []
    assert "fetched, re-hashed and the postgres checks" in report["checked"]
    assert [p for p in airflow_home.iterdir() if p.name.startswith("erp-verify-")] == []


def test_verify_with_a_flipped_byte_names_the_file(estate: Estate, airflow_home: Path, tmp_path: Path) -> None:
    copy_root = tmp_path / "copy"
    shutil.copytree(estate.root, copy_root)
    copy = BackupSet(copy_root, "postgres", "full", BACKUP_ID)
    flip_byte(copy.path / f"databases/{DB}.dump.zst", 100)

    done = cli(estate, airflow_home, "verify", "postgres", "full", BACKUP_ID, "--root", str(copy_root))

    assert done.returncode == 1
    assert f"FAILED: backup postgres/full/{BACKUP_ID} in {copy_root} does not verify (1 problem(s))" in done.stderr
    assert f"  databases/{DB}.dump.zst: sha256 " in done.stderr
    assert copy.state is SetState.OFFSITE and not (copy.path / FAILED_NAME).exists()  # nothing marked


# --- restore ---------------------------------------------------------------------------------------


def test_restore_full_into_another_cluster(estate: Estate, airflow_home: Path, scratch_pg_factory) -> None:
    target = scratch_pg_factory(name="cli-target")

    done = cli(estate, airflow_home, "restore", "postgres", "full", BACKUP_ID, "--target", target.conninfo(),
               "--jobs", "2")

    assert done.returncode == 0, done.stderr
    assert f"OK: restored postgres/full/{BACKUP_ID} into " in done.stdout
    assert f"tables_checked: {3 * TABLES_PER_TENANT}" in done.stdout
    assert inventory_of(target.conninfo(DB)) == inventory_of(estate.source.conninfo(DB))
    assert query(target.conninfo(), "SELECT count(*) FROM pg_roles WHERE rolname = %s", (estate.app_role,)) == [(1,)]


def test_restore_one_tenant_from_offsite(estate: Estate, airflow_home: Path, scratch_pg_factory, tmp_path: Path) -> None:
    target = scratch_pg_factory(name="cli-tenant")
    work = tmp_path / "work"
    work.mkdir()

    done = cli(estate, airflow_home, "restore", "postgres", "full", BACKUP_ID, "--from", "offsite",
               "--target", target.conninfo(), "--schema", "tenant_acme", "--database", DB, "--work-dir", str(work),
               offsite=True)

    assert done.returncode == 0, done.stderr
    assert f"fetching postgres/full/{BACKUP_ID} (3 files" in done.stderr
    assert f"tables_checked: {TABLES_PER_TENANT}" in done.stdout
    schemas = query(target.conninfo(DB), "SELECT DISTINCT table_schema FROM information_schema.tables "
                                         "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')")
    assert schemas == [("tenant_acme",)]
    assert inventory_of(target.conninfo(DB), "tenant_acme") == inventory_of(estate.source.conninfo(DB), "tenant_acme")
    assert list(work.iterdir()) == []  # the fetched copy is gone


def test_dry_run_changes_nothing_and_never_prints_passwords(estate: Estate, airflow_home: Path, scratch_pg_factory) -> None:
    target = scratch_pg_factory(name="cli-dry")
    before = query(target.conninfo(), "SELECT datname FROM pg_database ORDER BY 1")
    inline, environment = "inline-pw-never-shown", "env-pw-never-shown"
    url = f"postgresql://postgres:{inline}@127.0.0.1:{target.port}/postgres"

    done = cli(estate, airflow_home, "restore", "postgres", "full", BACKUP_ID, "--target", url, "--dry-run",
               PGPASSWORD=environment)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"DRY RUN: nothing was changed. Restoring postgres/full/{BACKUP_ID} into "
                                  f"postgresql://postgres@127.0.0.1:{target.port}/postgres would:")
    assert f"  - {DB}: create database and restore from databases/{DB}.dump.zst" in done.stdout
    assert "apply globals to" in done.stdout
    assert "--target contains a password" in done.stderr
    assert inline not in done.stdout + done.stderr and environment not in done.stdout + done.stderr
    assert query(target.conninfo(), "SELECT datname FROM pg_database ORDER BY 1") == before
    assert query(target.conninfo(), "SELECT count(*) FROM pg_roles WHERE rolname = %s", (estate.app_role,)) == [(0,)]


def test_unknown_backup_id_lists_the_valid_ones(estate: Estate, airflow_home: Path) -> None:
    done = cli(estate, airflow_home, "restore", "postgres", "full", "20990101T000000Z", "--target", "host=127.0.0.1")

    assert done.returncode == 2
    assert (f"no backup '20990101T000000Z' of postgres/full in {estate.root}. Valid backup ids, newest first: "
            f"{INCOMPLETE_ID} (incomplete), {BACKUP_ID} (offsite)") in done.stderr


def test_incomplete_sets_are_refused(estate: Estate, airflow_home: Path) -> None:
    nowhere = "host=127.0.0.1 port=1 user=postgres"  # refused before any connection

    local = cli(estate, airflow_home, "restore", "postgres", "full", INCOMPLETE_ID, "--target", nowhere)
    assert local.returncode == 1
    assert f"backup postgres/full/{INCOMPLETE_ID} in {estate.root} is incomplete: it has no manifest.json" in local.stderr

    remote = cli(estate, airflow_home, "restore", "postgres", "full", INCOMPLETE_ID, "--from", "offsite",
                 "--target", nowhere, offsite=True)
    assert remote.returncode == 1
    assert f"backup postgres/full/{INCOMPLETE_ID} at s3://{estate.bucket}/{PREFIX} is incomplete" in remote.stderr


# --- drill-report ----------------------------------------------------------------------------------


def test_drill_report_local_and_offsite(estate: Estate, airflow_home: Path, tmp_path: Path) -> None:
    entries = [
        drill_entry("postgres", backup_type="full", backup_id=BACKUP_ID, rto_measured_s=95.0, rto_extrapolated_s=95.0,
                    rto_target_s=7200, finished_at=datetime.fromisoformat("2026-03-01T06:10:00+09:00")),
        drill_entry("redis", "failed", backup_type="rdb", backup_id=BACKUP_ID, failed_step="verify",
                    rto_measured_s=4000, rto_extrapolated_s=4000, rto_target_s=3600,
                    finished_at=datetime.fromisoformat("2026-03-08T06:10:00+09:00")),
    ]
    ledger_root = tmp_path / "ledger-root"
    written = ledger_root / LEDGER_KEY
    ledger.append(written, entries)
    estate.s3.client().put_object(Bucket=estate.bucket, Key=f"{PREFIX}/{LEDGER_KEY}", Body=written.read_bytes())

    local = cli(estate, airflow_home, "drill-report", "--root", str(ledger_root))
    assert local.returncode == 0, local.stderr
    lines = local.stdout.splitlines()
    assert lines[1].split() == ["2026-03-01T06:10:00+09:00", "postgres", "full", BACKUP_ID, "passed",
                                "95.0s", "/", "95.0s", "/", "2h00m", "yes"]
    assert lines[2].split() == ["2026-03-08T06:10:00+09:00", "redis", "rdb", BACKUP_ID, "failed", "at", "verify",
                                "1h06m", "/", "1h06m", "/", "1h00m", "NO"]

    remote = cli(estate, airflow_home, "drill-report", "--from", "offsite", "--last", "1", "--json", offsite=True)
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == [entries[-1].as_dict()]


# --- the wrapper script ----------------------------------------------------------------------------


def test_wrapper_script_sets_the_path_itself(estate: Estate, airflow_home: Path) -> None:
    done = cli(estate, airflow_home, "list", "postgres", "full", "--json",
               command=[str(ROOT / "include/scripts/erp-restore")], PYTHONPATH="")

    assert done.returncode == 0, done.stderr
    assert [row["backup_id"] for row in json.loads(done.stdout)] == [BACKUP_ID, INCOMPLETE_ID]
