"""The PostgreSQL service contract on real servers: a content mismatch in one database is a problem, not a stop.

Two small databases on the shared server 127.0.0.1:5432 are backed up with `backup(ctx)`;
one table hash of the manifest is then tampered with, and the set restored into a
scratch cluster: the tampered database is reported, and both databases are restored.
"""

from __future__ import annotations

import copy
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
from erp_backup.services.base import CheckContext, RestoreReport, RunInfo
from tests.fixtures.factories import make_backup_context, make_manifest

pytestmark = pytest.mark.integration

SHARED = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
ROWS = {"items": 500, "notes": 40}
PUBLIC_ONLY = "; 1 schemas: owner, grants, comment, default privileges and table grants match"


@dataclass(frozen=True)
class TwoDatabaseSet:
    databases: tuple[str, str]
    set_dir: Path
    manifest: Manifest


def _admin() -> psycopg.Connection:
    return psycopg.connect(**SHARED, dbname="postgres", autocommit=True)


def _fill(dbname: str) -> None:
    with psycopg.connect(**SHARED, dbname=dbname, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL, price numeric(10, 2))")
        conn.execute("INSERT INTO items SELECT g, 'item ' || g, g * 1.25 FROM generate_series(1, %s) g", (ROWS["items"],))
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body jsonb)")
        conn.execute("INSERT INTO notes SELECT g, jsonb_build_object('n', g) FROM generate_series(1, %s) g",
                     (ROWS["notes"],))


def _backup(root: Path, databases: tuple[str, str]) -> tuple[Path, Manifest]:
    from airflow.sdk import Connection

    job = BackupJob(
        service="postgres", backup_type="full", schedule="0 2 * * *", timezone="Asia/Seoul",
        retention=timedelta(days=30), method="pg_dump", rpo=timedelta(hours=6), rto=timedelta(hours=2),
        connections={"source": "erp_postgres"}, enabled=True,
        options={"exec_mode": "network", "compress_level": 3, "databases": list(databases)},
    )
    connection = Connection(conn_id="erp_postgres", conn_type="postgres", host=SHARED["host"], port=SHARED["port"],
                            login=SHARED["user"], schema="postgres")
    run = RunInfo(dag_id="backup_postgres_full", run_id="manual__20260301T020000Z", run_after=datetime.now(timezone.utc))
    ctx = make_backup_context(root, job=job, run=run, backup_id="20260301T020000Z", connection=connection)
    backup_set = ctx.backup_set
    started = datetime.now(timezone.utc)
    outcome = postgres.backup(ctx)
    manifest = make_manifest(context=ctx, outcome=outcome, captured_started_at=started,
                             captured_finished_at=datetime.now(timezone.utc))
    write_manifest(backup_set.path, manifest)
    return backup_set.path, Manifest.read(backup_set.path / MANIFEST_NAME)


@pytest.fixture(scope="module")
def two_databases(tmp_path_factory) -> Iterator[TwoDatabaseSet]:
    suffix = uuid.uuid4().hex[:10]
    names = (f"erp_contract_a_{suffix}", f"erp_contract_b_{suffix}")
    with _admin() as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        for name in names:
            _fill(name)
        set_dir, manifest = _backup(tmp_path_factory.mktemp("pg-contract"), names)
        yield TwoDatabaseSet(names, set_dir, manifest)
    finally:
        with _admin() as conn:
            for name in names:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def tampered(manifest: Manifest, dbname: str, table: str) -> Manifest:
    """The manifest with one table's recorded content hash changed (the data itself is untouched)."""
    changed = copy.deepcopy(manifest)
    (entry,) = [t for t in changed.details["databases"][dbname]["tables"] if t["name"] == table]
    entry["content_hash"] = str(int(entry["content_hash"]) + 1)
    return changed


def count_rows(conninfo: str, dbname: str) -> dict[str, int]:
    with psycopg.connect(conninfo, dbname=dbname) as conn:
        return {table: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0]
                for table in ROWS}


def no_production(host: str, port: int) -> None:
    assert port != SHARED["port"], f"the check connected to the shared server {host}:{port}"


def test_a_tampered_table_hash_is_a_problem_of_its_database_and_the_others_are_restored(two_databases, scratch_pg):
    first, second = two_databases.databases
    manifest = tampered(two_databases.manifest, first, "items")
    target = scratch_pg.conninfo()

    report = postgres.restore(two_databases.set_dir, manifest, target)

    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{first}.public.items: content hash ") and "(same row count)" in report.problems[0]
    assert report.details["databases"][first]["content_matches"] is False
    assert report.details["databases"][second]["content_matches"] is True
    assert f"{second}: 2 tables, {sum(ROWS.values())} rows: row counts and content hashes match{PUBLIC_ONLY}" in report.checks
    assert not any(check.startswith(f"{first}:") for check in report.checks)
    assert count_rows(target, first) == ROWS and count_rows(target, second) == ROWS  # both restored
    assert report.restored_bytes == sum(two_databases.manifest.details["databases"][db]["raw_bytes"] for db in (first, second))

    ctx = CheckContext(guard=no_production)
    assert postgres.check_restored(target, two_databases.set_dir, two_databases.manifest, report, ctx).problems == []
    found = postgres.check_restored(target, two_databases.set_dir, manifest, report, ctx)
    assert [p.split(":")[0] for p in found.problems] == [f"{first}.public.items"]
    assert len(found.checks) == 1 and found.checks[0].startswith(f"{second}: 2 tables")


def test_dry_run_lists_every_database_and_changes_nothing(two_databases, scratch_pg):
    first, second = two_databases.databases
    target = scratch_pg.conninfo()

    report = postgres.restore(two_databases.set_dir, two_databases.manifest, target, dry_run=True,
                              options={"jobs": 3})

    assert report.dry_run and report.restored_bytes == 0 and report.problems == []
    assert report.actions[0].startswith("apply globals to ")
    assert report.actions[1:] == [
        f"{name}: create database and restore from databases/{name}.dump.zst with pg_restore --jobs=3 (2 tables to verify)"
        for name in (first, second)
    ]
    with psycopg.connect(target) as conn:
        present = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert not present & {first, second}


def test_check_restored_names_a_database_the_target_lacks(two_databases, scratch_pg):
    first, second = two_databases.databases
    target = scratch_pg.conninfo()
    postgres.restore(two_databases.set_dir, two_databases.manifest, target, options={"databases": [second]})

    found = postgres.check_restored(target, two_databases.set_dir, two_databases.manifest, RestoreReport(),
                                    CheckContext(guard=no_production))

    assert len(found.problems) == 1 and found.problems[0].startswith(f"database {first!r}: cannot be read")
    assert found.checks == [f"{second}: 2 tables, {sum(ROWS.values())} rows: row counts and content hashes match{PUBLIC_ONLY}"]


def test_the_production_guard_is_asked_before_the_check_connects(two_databases):
    asked: list[tuple[str, int]] = []

    def refuse(host: str, port: int) -> None:
        asked.append((host, port))
        raise RuntimeError(f"{host}:{port} is production")

    with pytest.raises(RuntimeError, match="127.0.0.1:5432 is production"):
        postgres.check_restored("host=127.0.0.1 port=5432 user=postgres", two_databases.set_dir, two_databases.manifest,
                                RestoreReport(), CheckContext(guard=refuse))
    assert asked == [("127.0.0.1", 5432)]
