"""Both dump layouts in one set: pg_dump -Fd -j2 above the plan's threshold, the -Fc stream below it.

Two databases on the shared server 127.0.0.1:5432; the threshold is set between
their sizes. The set must verify, restore (pg_restore -j2) with matching content and large objects, pass the drill's checks, and restore one tenant from the directory dump.
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
from erp_backup.runner import CommandError
from erp_backup.services.postgres.commands import PgEndpoint
from erp_backup.services.postgres.dump import verify_full
from erp_backup.services.postgres.parallel import dump_directory
from erp_backup.sets import BackupSet
from tests.fixtures.factories import make_backup_context, make_manifest

pytestmark = pytest.mark.integration

SHARED = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
TENANTS = {"tenant_a": 3000, "Tenant-B": 2000}
BLOB = b"large object " * 1000


@dataclass(frozen=True)
class TwoLayoutSet:
    big: str
    small: str
    set_dir: Path
    manifest: Manifest
    blob_oid: int


def _admin(dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(**SHARED, dbname=dbname, autocommit=True)


def _fill_big(dbname: str) -> int:
    with _admin(dbname) as conn:
        for schema, rows in TENANTS.items():
            ident = sql.Identifier(schema)
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
            conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS 'tenant'").format(ident))
            for table in ("orders", "lines", "notes"):
                conn.execute(sql.SQL("CREATE TABLE {}.{} (id int PRIMARY KEY, body text, amount numeric)")
                             .format(ident, sql.Identifier(table)))
                conn.execute(sql.SQL("INSERT INTO {}.{} SELECT g, repeat(md5(g::text), 8), g * 0.01 "
                                     "FROM generate_series(1, {}) g").format(ident, sql.Identifier(table),
                                                                             sql.Literal(rows)))
        row = conn.execute("SELECT lo_from_bytea(0, %s)", (BLOB,)).fetchone()
        assert row is not None
        return int(row[0])


def _backup(root: Path, databases: tuple[str, str], threshold_mb: float) -> tuple[Path, Manifest]:
    from airflow.sdk import Connection

    job = BackupJob(
        service="postgres", backup_type="full", schedule="0 2 * * *", timezone="Asia/Seoul",
        retention=timedelta(days=30), method="pg_dump", rpo=timedelta(hours=6), rto=timedelta(hours=2),
        connections={"source": "erp_postgres"}, enabled=True,
        options={"exec_mode": "network", "compress_level": 3, "databases": list(databases),
                 "parallel_dump_min_mb": threshold_mb, "dump_jobs": 2},
    )
    connection = Connection(conn_id="erp_postgres", conn_type="postgres", host=SHARED["host"], port=SHARED["port"],
                            login=SHARED["user"], schema="postgres")
    run = RunInfo(dag_id="backup_postgres_full", run_id="manual__20260301T020000Z", run_after=datetime.now(timezone.utc))
    ctx = make_backup_context(root, job=job, run=run, backup_id="20260301T020000Z", connection=connection)
    started = datetime.now(timezone.utc)
    outcome = postgres.backup(ctx)
    write_manifest(ctx.set_dir, make_manifest(context=ctx, outcome=outcome, captured_started_at=started,
                                              captured_finished_at=datetime.now(timezone.utc)))
    return ctx.set_dir, Manifest.read(ctx.set_dir / MANIFEST_NAME)


@pytest.fixture(scope="module")
def two_layouts(tmp_path_factory) -> Iterator[TwoLayoutSet]:
    suffix = uuid.uuid4().hex[:8]
    big, small = f"erp_par_big_{suffix}", f"erp_par_small_{suffix}"
    with _admin() as conn:
        for name in (big, small):
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        blob_oid = _fill_big(big)
        with _admin(small) as conn:
            conn.execute("CREATE TABLE items AS SELECT g AS id, 'item ' || g AS label FROM generate_series(1, 500) g")
            sizes = [conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0] for name in (big, small)]
        assert sizes[0] > sizes[1] * 1.2
        set_dir, manifest = _backup(tmp_path_factory.mktemp("pg-par"), (big, small), sum(sizes) / 2 / 2**20)
        yield TwoLayoutSet(big, small, set_dir, manifest, blob_oid)
    finally:
        with _admin() as conn:
            for name in (big, small):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def no_production(host: str, port: int) -> None:
    assert port != SHARED["port"], f"the check connected to the shared server {host}:{port}"


def test_the_set_holds_both_layouts_and_verifies(two_layouts: TwoLayoutSet):
    databases = two_layouts.manifest.details["databases"]
    big, small = databases[two_layouts.big], databases[two_layouts.small]

    assert (big["format"], big["file"], big["dump_jobs"]) == ("directory", f"databases/{two_layouts.big}.dir", 2)
    names = {Path(f).name for f in big["files"]}
    assert {"toc.dat.zst", "blobs.toc.zst", f"blob_{two_layouts.blob_oid}.dat.zst"} <= names
    assert len([n for n in names if n[0].isdigit()]) == 3 * len(TENANTS)  # one data file per table
    assert (small["format"], small["file"]) == ("custom", f"databases/{two_layouts.small}.dump.zst")
    assert {f.path for f in two_layouts.manifest.files} == {"globals.sql.zst", small["file"], *big["files"]}
    assert sorted(p.name for p in two_layouts.set_dir.iterdir()) == ["databases", "globals.sql.zst", MANIFEST_NAME]
    backup_set = BackupSet(two_layouts.set_dir.parents[2], "postgres", "full", "20260301T020000Z")
    assert verify_full(backup_set, two_layouts.manifest) == []

    broken = two_layouts.set_dir / big["file"] / "toc.dat.zst"
    original = broken.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    broken.write_bytes(bytes(flipped))
    try:
        problems = verify_full(backup_set, two_layouts.manifest)
    finally:
        broken.write_bytes(original)
    assert [p.split(":")[0] for p in problems] == [f"{big['file']}/toc.dat.zst"] and "does not decompress" in problems[0]


def test_both_layouts_restore_with_parallel_jobs_and_pass_the_drill_checks(two_layouts: TwoLayoutSet, scratch_pg,
                                                                          tmp_path):
    target = scratch_pg.conninfo()
    work = tmp_path / "work"
    work.mkdir()

    report = postgres.restore(two_layouts.set_dir, two_layouts.manifest, target,
                              options={"jobs": 2, "work_dir": str(work)})

    assert report.problems == []
    assert report.details["tables_checked"] == 3 * len(TENANTS) + 1
    big = report.details["databases"][two_layouts.big]
    assert big["format"] == "directory"
    assert big["restored_bytes"] >= two_layouts.manifest.details["databases"][two_layouts.big]["raw_bytes"] - 4096
    assert list(work.iterdir()) == []
    with psycopg.connect(scratch_pg.conninfo(two_layouts.big)) as conn:
        assert conn.execute("SELECT lo_get(%s)", (two_layouts.blob_oid,)).fetchone() == (BLOB,)
    found = postgres.check_restored(target, two_layouts.set_dir, two_layouts.manifest, report,
                                    CheckContext(guard=no_production))
    assert found.problems == [] and len(found.checks) == 2


def test_one_tenant_from_the_directory_layout(two_layouts: TwoLayoutSet, scratch_pg):
    report = postgres.restore(two_layouts.set_dir, two_layouts.manifest, scratch_pg.conninfo(),
                              options={"jobs": 2, "schema": "Tenant-B", "databases": [two_layouts.big]})

    assert report.problems == []
    assert report.details["tables_checked"] == 3 and report.details["rows_checked"] == 3 * TENANTS["Tenant-B"]
    with psycopg.connect(scratch_pg.conninfo(two_layouts.big)) as conn:
        schemas = conn.execute("SELECT nspname, obj_description(oid) FROM pg_namespace WHERE nspname ILIKE 'tenant%'")
        assert schemas.fetchall() == [("Tenant-B", "tenant")]


def test_a_failing_directory_dump_leaves_neither_files_nor_spool(tmp_path):
    """pg_dump stands in as a script that finishes one item, then fails: nothing of it stays in the set."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "pg_dump"
    script.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in --file=*) out="${a#--file=}";; esac; done\n'
                      'mkdir -p "$out" && head -c 100000 /dev/urandom > "$out/3001.dat"\n'
                      'echo "pg_dump: finished item 3001 TABLE DATA orders" >&2\n'
                      'head -c 100000 /dev/urandom > "$out/3002.dat"\n'
                      'echo "pg_dump: error: Dumping the contents of table \\"lines\\" failed" >&2\nexit 1\n')
    script.chmod(0o755)
    set_dir = tmp_path / "set"
    set_dir.mkdir()

    with pytest.raises(CommandError, match='(?s)exit 1.*contents of table "lines" failed'):
        dump_directory(PgEndpoint({"host": "127.0.0.1"}), "erp", "00000003-1", set_dir, jobs=2, level=1,
                       bindir=str(bindir), label="pg_dump erp")
    assert [p.relative_to(set_dir) for p in set_dir.rglob("*")] in ([], [Path("databases")])  # no spool, no .dir
