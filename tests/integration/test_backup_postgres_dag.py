"""`backup_postgres_full` end to end with dag.test(): real PostgreSQL, moto S3, a local Slack receiver.

Restores the artifact with standard PostgreSQL tools only (zstd, psql, pg_restore) into a
fresh initdb cluster, and injects the faults the issue lists: source unreachable, source
killed mid-dump, S3 down during upload, a byte flipped before checksum.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from erp_backup import retention
from erp_backup.crypto import fingerprint
from erp_backup.manifest import Manifest
from erp_backup.plan import load_plan
from erp_backup.scratch.base import free_port
from erp_backup.services.postgres.content import TableContent, apply_session_settings, inventory
from erp_backup.sets import BackupSet, SetState
from tests.conftest import AGE_KEYS
from tests.fixtures.s3 import start_s3
from tests.integration.dagrun import run_dag, write_plan

pytestmark = pytest.mark.integration

DAG_ID = "backup_postgres_full"
SAMPLE_SQL = Path(__file__).resolve().parents[2] / "include" / "estate" / "erp_sample.sql"
RUN_DATE = datetime(2026, 3, 1, 17, 0, tzinfo=timezone.utc)  # 02:00 Asia/Seoul
BACKUP_ID = "20260301T170000Z"
PREFIX = "erp"


@pytest.fixture(scope="module")
def source(request):
    """A source cluster of its own, holding the sample ERP estate in database `erp`."""
    from erp_backup.scratch.postgres import ScratchPostgres

    cluster = ScratchPostgres.new("dagsrc", owner="pytest")
    cluster.create()
    cluster.start()
    request.addfinalizer(cluster.destroy)
    psql = str(cluster.bindir / "psql")
    subprocess.run([psql, "-X", "-q", "-d", cluster.conninfo(), "-c", "CREATE DATABASE erp"], check=True)
    subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", "app_role=erp_app", "-d", cluster.conninfo("erp"),
         "-f", str(SAMPLE_SQL)],
        check=True, capture_output=True,
    )
    return cluster


def pg_conn_json(port: int) -> str:
    return json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": port, "login": "postgres", "schema": "postgres"})


@pytest.fixture
def env(monkeypatch, tmp_path, source, s3_endpoint, s3_bucket, slack_receiver, airflow_db):
    """Point the plan, connections and backup root at this test's services."""
    bucket = s3_bucket("offsite")
    plan_path = write_plan(
        tmp_path / "plan.yaml", bucket=bucket, prefix=PREFIX,
        edit=lambda d: d["services"]["postgres"]["options"].update(databases=["erp"]),
    )
    root = tmp_path / "backup"
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(plan_path))
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(root))
    monkeypatch.setenv("AIRFLOW_CONN_ERP_POSTGRES", pg_conn_json(source.port))
    monkeypatch.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", s3_endpoint.conn_json())
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_BACKUP_ALERTS", slack_receiver.conn_json())

    class Env:
        pass

    e = Env()
    e.bucket, e.root, e.plan_path, e.s3, e.slack = bucket, root, plan_path, s3_endpoint, slack_receiver
    e.set = BackupSet(root, "postgres", "full", BACKUP_ID)
    return e


def asset_event(run_id: str):
    """The Asset event the run's offsite_upload emitted for `backup_postgres_full`."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        event = session.scalars(
            select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == "x-erp-backup://postgres/full", AssetEvent.source_run_id == run_id)
        ).one()
        session.expunge(event)
        return event


def offsite_keys(client, bucket: str) -> dict[str, str]:
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/")
    return {item["Key"]: item["ETag"] for item in listing.get("Contents", [])}


def assert_alert(slack, task_id: str, *fragments: str) -> str:
    matching = [text for text in slack.texts() if f"task `{task_id}`" in text]
    assert matching, f"no Slack alert for {task_id}: {slack.texts()}"
    text = matching[-1]
    assert f"`{DAG_ID}`" in text and "http://airflow.test:8080/dags/backup_postgres_full/runs/" in text
    for fragment in fragments:
        assert fragment in text, text
    return text


def staging_state(env) -> dict[str, SetState]:
    return {record.backup_id: record.state for record in retention.staging_records(env.root, "postgres", "full")}


def pipe(command: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """A shell pipeline, as the runbook writes it (pipefail: any stage failing fails it)."""
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, check=True, capture_output=True, **kwargs)


def restore_with_standard_tools(client, bucket: str, workdir: Path, target, identity: Path) -> Manifest:
    """Download the sealed set from S3 and restore it with age, zstd, psql and pg_restore only (docs/runbook.md)."""
    base = f"{PREFIX}/postgres/full/{BACKUP_ID}/"
    for item in client.list_objects_v2(Bucket=bucket, Prefix=base)["Contents"]:
        path = workdir / item["Key"][len(base):]
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, item["Key"], str(path))
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=workdir, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    sealed = json.loads(pipe(f"age -d -i {identity} sealed/manifest.age", workdir).stdout)
    manifest = Manifest.from_json(json.dumps(sealed["manifest"]))
    stored = sealed["stored"]  # clear path -> stored object
    bindir = target.bindir
    # Globals recreate roles; the bootstrap superuser already exists on a fresh cluster.
    globals_sql = "\n".join(
        line for line in pipe(f"age -d -i {identity} {stored['globals.sql.zst']} | zstd -d", workdir, text=True)
        .stdout.splitlines() if line != "CREATE ROLE postgres;"
    )
    subprocess.run([str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target.conninfo()],
                   input=globals_sql, text=True, check=True, capture_output=True)
    pipe(f"age -d -i {identity} {stored['databases/erp.dump.zst']} | zstd -d | "
         f"{bindir / 'pg_restore'} --create -d '{target.conninfo()}'", workdir)
    return manifest


def test_full_backup_end_to_end_restores_with_standard_tools(env, scratch_pg, dagbag, tmp_path):
    dag_run, states = run_dag(dagbag, DAG_ID, RUN_DATE)
    assert states == dict.fromkeys(("backup", "checksum", "offsite_upload", "retention_prune"), "success"), states
    assert env.set.state is SetState.OFFSITE
    assert env.slack.messages == []
    manifest = env.set.manifest()  # the clear part of the sealed manifest: no names, no tools, no source
    assert manifest.run["logical_date"].startswith("2026-03-01T17:00:00")
    assert manifest.captured_finished_at > RUN_DATE  # a backfilled run records the real capture time
    assert manifest.source == {} and manifest.tools == {} and "databases" not in manifest.details
    assert manifest.encryption["fingerprints"] == [fingerprint(AGE_KEYS.recipient)]
    for path in [env.set.path, *env.set.path.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path

    event = asset_event(dag_run.run_id)
    assert event.source_task_id == "offsite_upload"
    assert event.extra == {"backup_id": BACKUP_ID, "size": manifest.total_size,
                           "captured_at": manifest.captured_finished_at.isoformat()}

    client = env.s3.client()
    keys = offsite_keys(client, env.bucket)
    assert f"{PREFIX}/postgres/full/{BACKUP_ID}/manifest.json" in keys
    assert {f"{PREFIX}/postgres/full/{BACKUP_ID}/{entry.path}" for entry in manifest.files} <= set(keys)

    workdir = tmp_path / "download"
    workdir.mkdir()
    identity = tmp_path / "key.txt"
    identity.write_text(AGE_KEYS.identity + "\n")
    restored_manifest = restore_with_standard_tools(client, env.bucket, workdir, scratch_pg, identity)
    assert restored_manifest.source["conn_id"] == "erp_postgres"
    assert restored_manifest.tools and "pg_dump" in json.dumps(restored_manifest.tools)
    expected = [TableContent.from_dict(t) for t in restored_manifest.details["databases"]["erp"]["tables"]]
    assert len(expected) >= 10
    with psycopg.connect(scratch_pg.conninfo("erp")) as conn:
        apply_session_settings(conn)
        actual = inventory(conn)
        roles = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
        grants = conn.execute(
            "SELECT has_schema_privilege('erp_app', 'tenant_acme', 'USAGE')").fetchone()[0]
    assert {t.qualified: (t.rows, t.content_hash) for t in actual} == {
        t.qualified: (t.rows, t.content_hash) for t in expected
    }
    assert {"tenant_acme", "tenant_globex", "tenant_initech"} <= {t.schema for t in actual}
    assert "erp_app" in roles and grants is True

    # A rerun of the same run is idempotent: same set, nothing re-uploaded.
    _, states = run_dag(dagbag, DAG_ID, RUN_DATE)
    assert set(states.values()) == {"success"}
    assert env.set.manifest() == manifest
    assert offsite_keys(client, env.bucket) == keys
    assert sorted(p.name for p in (env.root / "postgres" / "full").iterdir()) == [BACKUP_ID]


def test_unreachable_source_fails_alerts_and_leaves_no_set(env, dagbag, monkeypatch):
    closed_port = free_port()
    monkeypatch.setenv("AIRFLOW_CONN_ERP_POSTGRES", pg_conn_json(closed_port))
    _, states = run_dag(dagbag, DAG_ID, RUN_DATE)
    assert states["backup"] == "failed"
    assert states["checksum"] == states["offsite_upload"] == states["retention_prune"] == "upstream_failed"
    assert_alert(env.slack, "backup", "erp_postgres", f"127.0.0.1:{closed_port}")
    assert not env.set.path.exists()
    assert offsite_keys(env.s3.client(), env.bucket) == {}


def test_source_killed_mid_dump_fails_and_rerun_succeeds(env, dagbag, source):
    """pg_dump waits on a lock we hold; we terminate its backend while it is connected and dumping."""
    locker = psycopg.connect(source.conninfo("erp"))
    locker.execute("LOCK TABLE tenant_acme.products IN ACCESS EXCLUSIVE MODE")
    killed: list[int] = []

    def kill_pg_dump() -> None:
        with psycopg.connect(source.conninfo(), autocommit=True) as admin:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                pids = [row[0] for row in admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_dump' AND wait_event_type = 'Lock'")]
                for pid in pids:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    killed.append(pid)
                time.sleep(0.05)
        locker.rollback()

    killer = threading.Thread(target=kill_pg_dump)
    killer.start()
    try:
        _, states = run_dag(dagbag, DAG_ID, RUN_DATE)
    finally:
        killer.join()
        locker.close()
    assert killed, "pg_dump never blocked on the lock"
    assert states["backup"] == "failed"
    assert_alert(env.slack, "backup", "pg_dump")
    assert env.set.state is SetState.INCOMPLETE and not env.set.path.exists()

    _, states = run_dag(dagbag, DAG_ID, RUN_DATE)
    assert set(states.values()) == {"success"}
    assert env.set.state is SetState.OFFSITE


def test_s3_down_during_upload_fails_then_rerun_uploads(env, dagbag, monkeypatch, tmp_path):
    down = start_s3()
    try:
        bucket = "offsite-outage"
        down.client().create_bucket(Bucket=bucket)
        write_plan(env.plan_path, bucket=bucket, prefix=PREFIX,
                   edit=lambda d: d["services"]["postgres"]["options"].update(databases=["erp"]))
        monkeypatch.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", down.conn_json())
        down.stop()
        _, states = run_dag(dagbag, DAG_ID, RUN_DATE)
        assert states["backup"] == states["checksum"] == "success"
        assert states["offsite_upload"] == "failed"
        assert states["retention_prune"] == "upstream_failed"
        assert_alert(env.slack, "offsite_upload", bucket)
        # Verified locally but not offsite: visible as such to retention, the drill and the watchdog.
        assert staging_state(env) == {BACKUP_ID: SetState.VERIFIED}

        down.restart()
        down.client().create_bucket(Bucket=bucket)
        _, states = run_dag(dagbag, DAG_ID, RUN_DATE)
        assert set(states.values()) == {"success"}, states
        assert env.set.state is SetState.OFFSITE
        assert f"{PREFIX}/postgres/full/{BACKUP_ID}/manifest.json" in offsite_keys(down.client(), bucket)
    finally:
        down.stop()


def test_byte_flipped_before_checksum_fails_and_rerun_retakes(env, dagbag, monkeypatch):
    from erp_backup.services import postgres

    real_backup = postgres.backup

    def backup_then_corrupt(ctx):
        outcome = real_backup(ctx)
        damaged = ctx.set_dir / "databases" / "erp.dump.zst"
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0x01
        damaged.write_bytes(bytes(data))
        return outcome

    monkeypatch.setattr(postgres, "backup", backup_then_corrupt)
    _, states = run_dag(dagbag, DAG_ID, RUN_DATE)
    assert states["backup"] == "success" and states["checksum"] == "failed"
    assert states["offsite_upload"] == "upstream_failed"
    assert_alert(env.slack, "checksum", "databases/erp.dump.zst")
    assert env.set.state is SetState.CORRUPT
    records = retention.staging_records(env.root, "postgres", "full")
    assert retention.newest_good_id(records) is None  # never counted as a good backup
    assert offsite_keys(env.s3.client(), env.bucket) == {}

    monkeypatch.setattr(postgres, "backup", real_backup)
    _, states = run_dag(dagbag, DAG_ID, RUN_DATE)
    assert set(states.values()) == {"success"}
    assert env.set.state is SetState.OFFSITE


def test_plan_is_reloaded_at_run_time(env):
    assert load_plan().offsite.bucket == env.bucket
