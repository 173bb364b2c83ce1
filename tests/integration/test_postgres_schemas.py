"""One-schema restores and schema-grant verification for schema names that need quoting.

A database on the shared server 127.0.0.1:5432 holds tenant schemas named in Korean,
in upper case, with a hyphen and with an embedded double quote (plus a decoy whose
name extends the quoted one), owned by a role whose name needs quoting too, with
grants, comments, default privileges and table grants. It is backed up with
`backup(ctx)`; each schema is restored alone into a scratch cluster and must come
back exactly, and a changed grant on the target must be a named problem.
"""

from __future__ import annotations

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
from erp_backup.services.base import CheckContext, RunInfo
from erp_backup.services.postgres import schemas as pg_schemas
from tests.fixtures.factories import make_backup_context, make_manifest

pytestmark = pytest.mark.integration

SHARED = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
SCHEMAS = ("고객사", "Tenant_Upper", "tenant-hyphen", 'ten"ant')
DECOY = 'ten"ant x'  # its TOC line starts like the SCHEMA line of 'ten"ant'


@dataclass(frozen=True)
class QuotedEstate:
    dbname: str
    owner: str
    reader: str
    set_dir: Path
    manifest: Manifest


def _admin() -> psycopg.Connection:
    return psycopg.connect(**SHARED, dbname="postgres", autocommit=True)


def _fill(dbname: str, owner: str, reader: str) -> None:
    ident = sql.Identifier
    with psycopg.connect(**SHARED, dbname=dbname, autocommit=True) as conn:
        for index, name in enumerate((*SCHEMAS, DECOY)):
            schema = ident(name)
            conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(schema, ident(owner)))
            conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(schema, sql.Literal(f"tenant {name} 고객")))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, ident(reader)))
            conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {}")
                         .format(ident(owner), schema, ident(reader)))
            conn.execute(sql.SQL("SET ROLE {}").format(ident(owner)))
            conn.execute(sql.SQL("CREATE TABLE {}.{} (id int PRIMARY KEY, label text)").format(schema, ident("주문")))
            conn.execute(sql.SQL("INSERT INTO {}.{} SELECT g, 'row ' || g FROM generate_series(1, {}) g")
                         .format(schema, ident("주문"), sql.Literal(10 + index)))
            conn.execute(sql.SQL("GRANT UPDATE ON {}.{} TO {} WITH GRANT OPTION")
                         .format(schema, ident("주문"), ident(reader)))
            conn.execute("RESET ROLE")


def _backup(root: Path, dbname: str) -> tuple[Path, Manifest]:
    from airflow.sdk import Connection

    job = BackupJob(
        service="postgres", backup_type="full", schedule="0 2 * * *", timezone="Asia/Seoul",
        retention=timedelta(days=30), method="pg_dump", rpo=timedelta(hours=6), rto=timedelta(hours=2),
        connections={"source": "erp_postgres"}, enabled=True,
        options={"exec_mode": "network", "compress_level": 3, "databases": [dbname]},
    )
    connection = Connection(conn_id="erp_postgres", conn_type="postgres", host=SHARED["host"], port=SHARED["port"],
                            login=SHARED["user"], schema="postgres")
    run = RunInfo(dag_id="backup_postgres_full", run_id="manual__20260301T020000Z", run_after=datetime.now(timezone.utc))
    ctx = make_backup_context(root, job=job, run=run, backup_id="20260301T020000Z", connection=connection)
    started = datetime.now(timezone.utc)
    outcome = postgres.backup(ctx)
    manifest = make_manifest(context=ctx, outcome=outcome, captured_started_at=started,
                             captured_finished_at=datetime.now(timezone.utc))
    write_manifest(ctx.set_dir, manifest)
    return ctx.set_dir, Manifest.read(ctx.set_dir / MANIFEST_NAME)


@pytest.fixture(scope="module")
def quoted_estate(tmp_path_factory) -> Iterator[QuotedEstate]:
    suffix = uuid.uuid4().hex[:8]
    dbname, owner, reader = f"erp_quoted_{suffix}", f'Tenant "Owner" {suffix}', f"읽기-{suffix}"
    with _admin() as conn:
        for role in (owner, reader):
            conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        _fill(dbname, owner, reader)
        set_dir, manifest = _backup(tmp_path_factory.mktemp("pg-quoted"), dbname)
        yield QuotedEstate(dbname, owner, reader, set_dir, manifest)
    finally:
        with _admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
            for role in (owner, reader):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def source_schemas(estate: QuotedEstate) -> dict[str, pg_schemas.SchemaMeta]:
    with psycopg.connect(**SHARED, dbname=estate.dbname) as conn:
        return {s.name: s for s in pg_schemas.read_schemas(conn)}


def no_production(host: str, port: int) -> None:
    assert port != SHARED["port"], f"the check connected to the shared server {host}:{port}"


def test_the_manifest_records_each_schemas_owner_grants_comment_and_default_privileges(quoted_estate: QuotedEstate):
    recorded = {s.name: s for s in pg_schemas.recorded(quoted_estate.manifest.details["databases"][quoted_estate.dbname])}
    owner, reader = quoted_estate.owner, quoted_estate.reader

    assert set(recorded) == {*SCHEMAS, DECOY, "public"}
    assert recorded == source_schemas(quoted_estate)
    acme = recorded["고객사"]
    assert (acme.owner, acme.comment) == (owner, "tenant 고객사 고객")
    assert acme.acl == sorted([f"{owner}=CREATE", f"{owner}=USAGE", f"{reader}=USAGE"])
    assert acme.default_acl == [f"{owner} r {reader}=SELECT"]
    assert f"{reader}=UPDATE*" in acme.table_acls["주문"] and f"{owner}=SELECT" in acme.table_acls["주문"]


def test_each_quoted_schema_restores_alone_with_its_grants(quoted_estate: QuotedEstate, scratch_pg):
    target, db = scratch_pg.conninfo(), quoted_estate.dbname
    expected = source_schemas(quoted_estate)

    for index, name in enumerate(SCHEMAS):
        report = postgres.restore(quoted_estate.set_dir, quoted_estate.manifest, target,
                                  options={"schema": name, "apply_globals": index == 0})
        assert report.problems == [], name
        assert report.checks[-1] == (f"{db}.{name}: 1 tables, {10 + SCHEMAS.index(name)} rows: row counts and content "
                                     "hashes match; 1 schemas: owner, grants, comment, default privileges and table "
                                     "grants match")

    with psycopg.connect(scratch_pg.conninfo(db)) as conn:
        restored = {s.name: s for s in pg_schemas.read_schemas(conn)}
        assert set(restored) == {*SCHEMAS, "public"}  # not the decoy, whose TOC line looks alike
        for name in SCHEMAS:
            assert restored[name] == expected[name]
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(quoted_estate.reader)))
            rows = conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(name), sql.Identifier("주문")))
            assert rows.fetchone() == (10 + SCHEMAS.index(name),)
            conn.execute("RESET ROLE")


def test_a_changed_schema_grant_on_the_target_is_a_named_problem(quoted_estate: QuotedEstate, scratch_pg):
    target, db, name = scratch_pg.conninfo(), quoted_estate.dbname, 'ten"ant'
    report = postgres.restore(quoted_estate.set_dir, quoted_estate.manifest, target)
    assert report.problems == []
    ctx = CheckContext(guard=no_production)
    assert postgres.check_restored(target, quoted_estate.set_dir, quoted_estate.manifest, report, ctx).problems == []

    with psycopg.connect(scratch_pg.conninfo(db), autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE USAGE ON SCHEMA {} FROM {}").format(sql.Identifier(name),
                                                                            sql.Identifier(quoted_estate.reader)))
        conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS NULL").format(sql.Identifier("Tenant_Upper")))
        conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} REVOKE SELECT ON TABLES FROM {}")
                     .format(sql.Identifier(quoted_estate.owner), sql.Identifier("tenant-hyphen"),
                             sql.Identifier(quoted_estate.reader)))
        conn.execute(sql.SQL("REVOKE UPDATE ON {}.{} FROM {} CASCADE").format(
            sql.Identifier("고객사"), sql.Identifier("주문"), sql.Identifier(quoted_estate.reader)))

    found = postgres.check_restored(target, quoted_estate.set_dir, quoted_estate.manifest, report, ctx)

    wanted = [f"{db}.{name}: schema grants ", f"{db}.Tenant_Upper: schema comment None, expected 'tenant Tenant_Upper 고객'",
              f"{db}.tenant-hyphen: default privileges [], expected [", f"{db}.고객사.주문: grants "]
    assert len(found.problems) == len(wanted)
    assert all(any(problem.startswith(prefix) for problem in found.problems) for prefix in wanted), found.problems
    assert found.checks == []
