"""`backup_postgres_snapshot` and `backup_postgres_wal` as DAGs, then PITR from what they shipped offsite.

A real archiving cluster (archive_wal.sh), moto S3 offsite, a local Slack receiver.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import psycopg
import pytest

from erp_backup.offsite import offsite_from_plan
from erp_backup.plan import load_plan
from erp_backup.services.postgres.pitr import restore_to_time
from erp_backup.sets import SetState, list_sets
from tests.fixtures.pitr import ARCHIVE_SUBDIR
from tests.integration.dagrun import run_dag, write_plan
from tests.integration.test_backup_postgres_dag import pg_conn_json

pytestmark = pytest.mark.integration


def now_s() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture
def wal_env(request, monkeypatch, tmp_path, archiving_pg_factory, s3_endpoint, s3_bucket, slack_receiver, airflow_db):
    """A clear archive, or a sealed one when the test is parametrized with wal_env=["sealed"] (indirect)."""
    pg = archiving_pg_factory(name="waldag", sealed=getattr(request, "param", "clear") == "sealed")
    bucket = s3_bucket("wal")
    pg.bucket, pg.s3 = bucket, s3_endpoint.client()  # for the checks of what went offsite
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(write_plan(tmp_path / "plan.yaml", bucket=bucket, prefix="erp")))
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(pg.root))
    monkeypatch.setenv("ERP_WAL_ARCHIVE_DIR", str(pg.root / ARCHIVE_SUBDIR))
    monkeypatch.setenv("AIRFLOW_CONN_ERP_POSTGRES", pg_conn_json(pg.cluster.port))
    monkeypatch.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", s3_endpoint.conn_json())
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_BACKUP_ALERTS", slack_receiver.conn_json())
    return pg


MARKER = "tenant-acme-payroll-2026"  # row data: in clear it shows in the WAL bytes


@pytest.mark.parametrize("wal_env", ["clear", "sealed"], indirect=True)
def test_snapshot_and_wal_dags_then_pitr_from_offsite(wal_env, dagbag, slack_receiver, scratch_cluster):
    pg = wal_env
    pg.sql("CREATE TABLE ledger (id bigserial PRIMARY KEY, phase text NOT NULL)")
    _, states = run_dag(dagbag, "backup_postgres_snapshot", now_s())
    assert set(states.values()) == {"success"}, states

    window_start = now_s()
    pg.sql("INSERT INTO ledger (phase) SELECT %s FROM generate_series(1, 10)", (f"t1 {MARKER}",))
    pg.switch_wal()
    target = pg.sql("SELECT clock_timestamp()")[0][0]
    pg.sql("INSERT INTO ledger (phase) SELECT 't2' FROM generate_series(1, 10)")
    pg.switch_wal()
    time.sleep(1.1)  # run dates have whole seconds; the window must end after the last archived file
    window_end = now_s()
    assert (window_end - window_start).total_seconds() < 6 * 3600

    _, states = run_dag(dagbag, "backup_postgres_wal", window_end)
    assert set(states.values()) == {"success"}, states
    assert slack_receiver.messages == []
    wal_sets = list_sets(pg.root, "postgres", "wal")
    assert [s.state for s in wal_sets] == [SetState.OFFSITE]
    manifest = wal_sets[0].manifest()
    assert manifest.details["first_segment"] <= manifest.details["last_segment"]
    # Offsite, every set is sealed: no object shows the row. On the backup disk, only a clear archive does.
    objects = pg.s3.list_objects_v2(Bucket=pg.bucket)["Contents"]
    assert len(objects) > 4
    assert [o["Key"] for o in objects if MARKER.encode() in pg.s3.get_object(Bucket=pg.bucket, Key=o["Key"])["Body"].read()] == []
    holding = [p.relative_to(pg.root) for p in pg.root.rglob("*") if p.is_file() and MARKER.encode() in p.read_bytes()]
    if pg.sealed:
        assert {bool(r.get("sealed")) for r in manifest.details["wal"] if r["kind"] == "segment"} == {True}
        assert holding == []
    else:
        assert holding and all(p.parts[0] == ARCHIVE_SUBDIR for p in holding), holding
    assert manifest.run["data_interval_start"] is not None  # a real 6 h window, not start == end

    # Rerunning the window changes nothing offsite.
    client_keys = sorted(offsite_from_plan(load_plan()).list_backup_ids("postgres", "wal"))
    _, states = run_dag(dagbag, "backup_postgres_wal", window_end)
    assert set(states.values()) == {"success"}
    assert sorted(offsite_from_plan(load_plan()).list_backup_ids("postgres", "wal")) == client_keys

    cluster = scratch_cluster("waldag-pitr")
    report = restore_to_time(target, root=pg.root, cluster=cluster, offsite=offsite_from_plan(load_plan()),
                             use_local_archive=False)
    with psycopg.connect(cluster.conninfo(), autocommit=True) as db:
        phases = dict(db.execute("SELECT phase, count(*) FROM ledger GROUP BY phase").fetchall())
    assert phases == {f"t1 {MARKER}": 10}
    assert report["wal_bytes_replayed"] > 0


def test_missing_segment_fails_the_wal_dag_with_a_gap_alert(wal_env, dagbag, slack_receiver):
    pg = wal_env
    pg.sql("CREATE TABLE filler (payload text)")
    names = []
    for _ in range(4):
        pg.sql("INSERT INTO filler SELECT repeat('x', 100) FROM generate_series(1, 100)")
        names.append(pg.switch_wal())
    lost = names[1]
    (pg.root / ARCHIVE_SUBDIR / lost).unlink()

    time.sleep(1.1)
    _, states = run_dag(dagbag, "backup_postgres_wal", now_s())
    assert states["backup"] == "failed", states
    alerts = [text for text in slack_receiver.texts() if "`backup_postgres_wal`" in text and "task `backup`" in text]
    assert alerts and lost in alerts[-1], slack_receiver.texts()


def test_archive_failure_that_recovered_is_announced_once_in_slack(wal_env, dagbag, slack_receiver):
    """failed_count grew since the last WAL backup but archiving recovered: the run passes and Slack hears it."""
    pg = wal_env
    pg.switch_wal()
    time.sleep(1.1)
    _, states = run_dag(dagbag, "backup_postgres_wal", now_s())
    assert set(states.values()) == {"success"}, states

    pg.sql("CREATE TABLE t AS SELECT 1 AS x")
    current = pg.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]
    squatter = pg.root / ARCHIVE_SUBDIR / current
    squatter.write_bytes(b"not this segment")  # archive_wal.sh refuses to overwrite different content
    pg.sql("SELECT pg_switch_wal()")
    deadline = time.monotonic() + 60
    while pg.sql("SELECT failed_count FROM pg_stat_archiver")[0][0] == 0:
        assert time.monotonic() < deadline, "the archiver never reported the failure"
        time.sleep(0.1)
    squatter.unlink()
    pg.sql("SELECT pg_reload_conf()")
    pg.wait_archived(current)
    time.sleep(1.1)

    moment = now_s()
    _, states = run_dag(dagbag, "backup_postgres_wal", moment)
    assert set(states.values()) == {"success"}, states
    warnings = [text for text in slack_receiver.texts() if text.startswith(":warning:")]
    assert len(warnings) == 1 and "backup_postgres_wal" in warnings[0] and "failed_count grew" in warnings[0]
    _, states = run_dag(dagbag, "backup_postgres_wal", moment)  # a rerun of the same run: no second alert
    assert set(states.values()) == {"success"}
    assert len([text for text in slack_receiver.texts() if text.startswith(":warning:")]) == 1
