"""The least-privilege backup role of docs/deployment.md, with real roles on the shared server.

`pg_read_all_data` does not cover large objects owned by other roles nor tables under
row-level security. The backup must fail before dumping anything, naming each of
them; once the role has what the document says, the backup and its restore succeed.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from erp_backup.manifest import MANIFEST_NAME, Manifest, write_manifest
from erp_backup.plan import BackupJob
from erp_backup.services import postgres
from erp_backup.services.base import RunInfo
from erp_backup.services.postgres.commands import PostgresBackupError
from tests.fixtures.factories import make_backup_context, make_manifest

pytestmark = pytest.mark.integration

SHARED = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@dataclass(frozen=True)
class LargeObjectEstate:
    dbname: str
    backup_role: str
    app_role: str
    other_role: str
    app_object: int
    other_object: int


def _admin(dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(**SHARED, dbname=dbname, autocommit=True)


def _large_object(conn: psycopg.Connection, owner: str, data: bytes) -> int:
    row = conn.execute("SELECT lo_from_bytea(0, %s)", (data,)).fetchone()
    assert row is not None
    conn.execute(sql.SQL("ALTER LARGE OBJECT {} OWNER TO {}").format(sql.Literal(row[0]), sql.Identifier(owner)))
    return int(row[0])


@pytest.fixture
def lo_estate() -> Iterator[LargeObjectEstate]:
    suffix = uuid.uuid4().hex[:8]
    dbname, backup, app, other = (f"erp_lo_{suffix}", f"erp_backup_{suffix}", f"erp_lo_app_{suffix}",
                                  f"erp_lo_other_{suffix}")
    ident = sql.Identifier
    with _admin() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION").format(ident(backup)))
        conn.execute(sql.SQL("GRANT pg_read_all_data, pg_monitor TO {}").format(ident(backup)))
        for role in (app, other):
            conn.execute(sql.SQL("CREATE ROLE {}").format(ident(role)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(ident(dbname), ident(app)))
    with _admin(dbname) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(ident(app)))
        conn.execute("CREATE TABLE documents (id int PRIMARY KEY, title text, body oid)")
        conn.execute("CREATE TABLE secrets (id int PRIMARY KEY, tenant text)")
        conn.execute("INSERT INTO secrets VALUES (1, 'acme')")
        conn.execute("ALTER TABLE secrets ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY")
        conn.execute("RESET ROLE")
        estate = LargeObjectEstate(dbname, backup, app, other, _large_object(conn, app, b"app-owned " * 100),
                                   _large_object(conn, other, b"other-owned " * 100))
        conn.execute("INSERT INTO documents VALUES (1, 'a', %s), (2, 'b', %s)", (estate.app_object, estate.other_object))
    try:
        yield estate
    finally:
        with _admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident(dbname)))
            for role in (backup, app, other):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident(role)))


def _backup(root: Path, estate: LargeObjectEstate, **options) -> Manifest:
    from airflow.sdk import Connection

    job = BackupJob(
        service="postgres", backup_type="full", schedule="0 2 * * *", timezone="Asia/Seoul",
        retention=timedelta(days=30), method="pg_dump", rpo=timedelta(hours=6), rto=timedelta(hours=2),
        connections={"source": "erp_postgres"}, enabled=True,
        options={"exec_mode": "network", "compress_level": 3, "databases": [estate.dbname], **options},
    )
    connection = Connection(conn_id="erp_postgres", conn_type="postgres", host=SHARED["host"], port=SHARED["port"],
                            login=estate.backup_role, schema="postgres")
    run = RunInfo(dag_id="backup_postgres_full", run_id="manual__20260301T020000Z", run_after=datetime.now(timezone.utc))
    ctx = make_backup_context(root, job=job, run=run, backup_id="20260301T020000Z", connection=connection)
    started = datetime.now(timezone.utc)
    outcome = postgres.backup(ctx)
    write_manifest(ctx.set_dir, make_manifest(context=ctx, outcome=outcome, captured_started_at=started,
                                              captured_finished_at=datetime.now(timezone.utc)))
    return Manifest.read(ctx.set_dir / MANIFEST_NAME)


def test_the_documented_backup_role_backs_up_large_objects_of_other_owners(lo_estate: LargeObjectEstate, tmp_path,
                                                                            scratch_pg):
    e = lo_estate
    with pytest.raises(PostgresBackupError) as refused:
        _backup(tmp_path / "refused", e)
    message = str(refused.value)
    assert f"the role {e.backup_role!r} of connection 'erp_postgres' (127.0.0.1:5432) cannot read 4 object(s)" in message
    for named in ("globals: role passwords (pg_authid", f"large object {e.app_object} (owner {e.app_role})",
                  f"large object {e.other_object} (owner {e.other_role})",
                  "table public.secrets (row-level security; needs BYPASSRLS)"):
        assert named in message
    assert [p for p in (tmp_path / "refused").rglob("*") if p.is_file()] == []  # nothing dumped
    plain = subprocess.run(["pg_dump", "--no-password", "--format=custom", "--file=/dev/null",
                            f"--dbname=host=127.0.0.1 port=5432 user={e.backup_role} dbname={e.dbname}"],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0  # what the check spares: pg_dump itself fails on the first of them

    # What docs/deployment.md gives the role: SELECT on one owner's large objects, membership of the other
    # owner, BYPASSRLS, and no_role_passwords in the plan.
    with _admin(e.dbname) as conn:
        conn.execute(sql.SQL("GRANT SELECT ON LARGE OBJECT {} TO {}").format(sql.Literal(e.other_object),
                                                                            sql.Identifier(e.backup_role)))
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(e.app_role), sql.Identifier(e.backup_role)))
        conn.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(e.backup_role)))
    manifest = _backup(tmp_path / "granted", e, no_role_passwords=True)

    report = postgres.restore(tmp_path / "granted" / "postgres/full/20260301T020000Z", manifest, scratch_pg.conninfo())
    assert report.problems == []
    with psycopg.connect(scratch_pg.conninfo(e.dbname)) as conn:
        restored = conn.execute("SELECT d.id, lo_get(d.body), pg_get_userbyid(m.lomowner) FROM documents d"
                                " JOIN pg_largeobject_metadata m ON m.oid = d.body ORDER BY d.id").fetchall()
        assert restored == [(1, b"app-owned " * 100, e.app_role), (2, b"other-owned " * 100, e.other_role)]
        assert conn.execute("SELECT tenant FROM secrets").fetchall() == [("acme",)]
