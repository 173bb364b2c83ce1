"""PostgreSQL full backup round trips on real servers.

The sample estate (include/estate/erp_sample.sql) is loaded into a unique database
on the shared server 127.0.0.1:5432, backed up with `backup(ctx)`, and restored
into fresh scratch clusters; row counts and content hashes must match.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from erp_backup.manifest import MANIFEST_NAME, Manifest, write_manifest
from erp_backup.plan import BackupJob
from erp_backup.runner import LocalExecutor
from erp_backup.scratch.base import free_port
from erp_backup.services import postgres
from erp_backup.services.base import BackupContext, BackupOutcome, RunInfo, SourceUnavailable
from erp_backup.services.postgres import content as pg_content
from erp_backup.services.postgres import dump
from erp_backup.services.postgres.commands import read_zst_text
from erp_backup.sets import BackupSet
from tests.fixtures.factories import make_backup_context, make_manifest
from tests.fixtures.pg_estate import TENANTS, PgEstate

pytestmark = pytest.mark.integration

SECRET = "never-in-argv-or-manifest"
TABLES_PER_TENANT = 8  # customers, products, orders (+4 partitions), AuditLog


def make_context(root: Path, estate: PgEstate, backup_id: str, **options) -> BackupContext:
    job = BackupJob(
        service="postgres", backup_type="full", schedule="0 2 * * *", timezone="Asia/Seoul",
        retention=timedelta(days=30), method="pg_dump", rpo=timedelta(hours=6), rto=timedelta(hours=2),
        connections={"source": "erp_postgres"}, enabled=True,
        options={"exec_mode": "network", "container": "erp-postgres", "compress_level": 3,
                 "databases": [estate.dbname], **options},
    )
    connection = estate.connection()
    connection.password = SECRET  # the shared server trusts 127.0.0.1: accepted and ignored
    run = RunInfo(dag_id="backup_postgres_full", run_id=f"manual__{backup_id}", run_after=datetime.now(timezone.utc))
    return make_backup_context(root, job=job, run=run, backup_id=backup_id, connection=connection)


def write_manifest_for(ctx: BackupContext, outcome: BackupOutcome, started: datetime) -> Manifest:
    manifest = make_manifest(context=ctx, outcome=outcome, captured_started_at=started,
                             captured_finished_at=datetime.now(timezone.utc))
    write_manifest(ctx.set_dir, manifest)
    return Manifest.read(ctx.set_dir / MANIFEST_NAME)


@dataclass
class EstateBackup:
    ctx: BackupContext
    manifest: Manifest
    seconds: float


@pytest.fixture(scope="module")
def estate_backup(pg_estate: PgEstate, tmp_path_factory) -> EstateBackup:
    ctx = make_context(tmp_path_factory.mktemp("pg-sets"), pg_estate, "20260301T020000Z")
    started = datetime.now(timezone.utc)
    clock = time.monotonic()
    outcome = postgres.backup(ctx)
    seconds = time.monotonic() - clock
    return EstateBackup(ctx, write_manifest_for(ctx, outcome, started), seconds)


def inventory_of(conninfo: str, schema: str | None = None) -> list[pg_content.TableContent]:
    with psycopg.connect(conninfo) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        pg_content.apply_session_settings(conn)
        return pg_content.inventory(conn, schema)


def query(conninfo: str, statement: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute(statement, params).fetchall()


def test_backup_files_manifest_and_inventory(estate_backup: EstateBackup, pg_estate: PgEstate):
    manifest, set_dir = estate_backup.manifest, estate_backup.ctx.set_dir
    dump_file = f"databases/{pg_estate.dbname}.dump.zst"
    assert sorted(entry.path for entry in manifest.files) == [dump_file, "globals.sql.zst"]
    for entry in manifest.files:
        data = (set_dir / entry.path).read_bytes()
        assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())

    database = manifest.details["databases"][pg_estate.dbname]
    assert database["file"] == dump_file and database["encoding"] == "UTF8"
    tables = {(t["schema"], t["name"]): t for t in database["tables"]}
    assert len(tables) == 3 * TABLES_PER_TENANT
    source = pg_estate.conninfo()
    for tenant in TENANTS:
        for name in ("customers", "orders_2025", "AuditLog"):
            (count,) = query(source, f'SELECT count(*) FROM {tenant}."{name}"')[0]
            assert tables[(tenant, name)]["rows"] == count > 0
        leaves = [t for (schema, name), t in tables.items() if schema == tenant and name.startswith("orders_")]
        parent = tables[(tenant, "orders")]
        assert parent["kind"] == "p"
        assert parent["rows"] == sum(t["rows"] for t in leaves)
        assert int(parent["content_hash"]) == sum(int(t["content_hash"]) for t in leaves)
    assert tables[("tenant_acme", "customers")]["rows"] == 3000
    assert tables[("tenant_acme", "customers")]["content_hash"] != tables[("tenant_globex", "customers")]["content_hash"]

    assert manifest.details["server_version"].startswith("15")
    assert pg_estate.app_role in manifest.details["roles"]
    assert f"CREATE ROLE {pg_estate.app_role};" in read_zst_text(set_dir / "globals.sql.zst")
    assert manifest.tools["pg_dump"].startswith("pg_dump (PostgreSQL)")
    assert manifest.tools["pg_dumpall"].startswith("pg_dumpall (PostgreSQL)")
    assert manifest.source["conn_id"] == "erp_postgres" and manifest.source["port"] == 5432
    assert SECRET not in (set_dir / MANIFEST_NAME).read_text()
    assert postgres.verify(BackupSet(set_dir.parents[2], "postgres", "full", manifest.backup_id), manifest) == []


def test_inventory_matches_an_independent_recount(estate_backup: EstateBackup, pg_estate: PgEstate):
    """Hashes recomputed now (nothing changed since) equal the ones taken inside the dump's snapshot."""
    recorded = [pg_content.TableContent.from_dict(t)
                for t in estate_backup.manifest.details["databases"][pg_estate.dbname]["tables"]]
    assert inventory_of(pg_estate.conninfo()) == recorded


def test_content_hash_ignores_row_order_and_client_settings(estate_backup: EstateBackup, pg_estate: PgEstate):
    recorded = next(t for t in estate_backup.manifest.details["databases"][pg_estate.dbname]["tables"]
                    if (t["schema"], t["name"]) == ("tenant_acme", "customers"))
    with psycopg.connect(pg_estate.conninfo()) as conn:
        conn.execute("SET TimeZone = 'Asia/Seoul'")
        conn.execute("SET DateStyle = 'SQL, DMY'")
        conn.execute("SET extra_float_digits = 0")
        conn.execute("SET bytea_output = 'escape'")
        conn.execute("CREATE TEMP TABLE forward AS SELECT * FROM tenant_acme.customers ORDER BY id")
        conn.execute("CREATE TEMP TABLE backward AS SELECT * FROM tenant_acme.customers ORDER BY id DESC")
        (temp_schema,) = conn.execute("SELECT pg_my_temp_schema()::regnamespace::text").fetchone()
        pg_content.apply_session_settings(conn)

        expected = (recorded["rows"], int(recorded["content_hash"]))
        assert pg_content.hash_table(conn, temp_schema, "forward") == expected
        assert pg_content.hash_table(conn, temp_schema, "backward") == expected
        conn.execute(f"UPDATE {temp_schema}.backward SET rating = rating + 0.0001 WHERE id = 1234")
        rows, changed = pg_content.hash_table(conn, temp_schema, "backward")
        assert rows == recorded["rows"] and changed != expected[1]
        conn.rollback()


def test_full_restore_into_scratch_cluster(estate_backup: EstateBackup, pg_estate: PgEstate, scratch_pg):
    set_dir, manifest, db = estate_backup.ctx.set_dir, estate_backup.manifest, pg_estate.dbname
    target = scratch_pg.conninfo()

    dry = postgres.restore(set_dir, manifest, target, dry_run=True)
    assert dry.dry_run and any(f"{db}: create database and restore" in action for action in dry.actions)
    assert query(target, "SELECT count(*) FROM pg_database WHERE datname = %s", (db,)) == [(0,)]
    assert query(target, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (pg_estate.app_role,)) == [(0,)]

    report = postgres.restore(set_dir, manifest, target, options={"jobs": 2})

    assert report.problems == []
    assert report.details["tables_checked"] == 3 * TABLES_PER_TENANT
    assert report.details["rows_checked"] == (3000 + 9000 + 300 + 1500) + (2000 + 6000 + 300 + 1000) + (1500 + 4000 + 300 + 750)
    assert set(report.details["durations"]) == {"globals", "decompress", "restore", "verify"}
    assert report.details["bytes"]["restored"] == manifest.details["databases"][db]["raw_bytes"] == report.restored_bytes
    restored = scratch_pg.conninfo(db)
    assert inventory_of(restored) == inventory_of(pg_estate.conninfo())
    assert query(restored, "SELECT pg_has_role(%s, 'USAGE') IS NOT NULL, has_schema_privilege(%s, 'tenant_acme', 'USAGE'),"
                 " has_schema_privilege(%s, 'tenant_globex', 'USAGE')",
                 (pg_estate.app_role,) * 3) == [(True, True, False)]
    missing_roles = set(manifest.details["roles"]) - {r for (r,) in query(target, "SELECT rolname FROM pg_roles")}
    assert missing_roles <= set(report.details["globals"]["roles_not_in_globals"])
    # Identity and sequences continue where the source stopped.
    next_ids = "SELECT nextval('tenant_acme.order_number_seq'), (SELECT max(id) FROM tenant_acme.orders)"
    assert query(restored, next_ids) == [(100000 + 9000, 100000 + 8999)]

    with pytest.raises(postgres.RestoreConflict, match=f"database '{db}' already has 24 of the tables"):
        postgres.restore(set_dir, manifest, target)


def test_single_schema_restore(estate_backup: EstateBackup, pg_estate: PgEstate, scratch_pg):
    set_dir, manifest, db = estate_backup.ctx.set_dir, estate_backup.manifest, pg_estate.dbname
    target, restored = scratch_pg.conninfo(), scratch_pg.conninfo(db)

    report = postgres.restore(set_dir, manifest, target, options={"schema": "tenant_globex"})

    assert report.problems == []
    assert report.details["tables_checked"] == TABLES_PER_TENANT
    schemas = {schema for schema, _ in query(restored, "SELECT table_schema, table_name FROM information_schema.tables"
                                             " WHERE table_schema LIKE 'tenant%%'")}
    assert schemas == {"tenant_globex"}
    assert inventory_of(restored, "tenant_globex") == inventory_of(pg_estate.conninfo(), "tenant_globex")

    # A second tenant into the now existing database brings its schema's comment and grants.
    second = postgres.restore(set_dir, manifest, target, options={"databases": [db], "schema": "tenant_acme",
                                                                  "apply_globals": False})
    assert second.problems == [] and "globals" not in second.details
    assert {s for (s,) in query(restored, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant%%'")} == {
        "tenant_globex", "tenant_acme"}
    assert query(restored, "SELECT obj_description('tenant_acme'::regnamespace),"
                 " has_schema_privilege(%s, 'tenant_acme', 'USAGE')", (pg_estate.app_role,)) == [
        ("ACME Corp. (sample tenant)", True)]
    assert inventory_of(restored, "tenant_acme") == inventory_of(pg_estate.conninfo(), "tenant_acme")


def test_verify_reports_a_corrupted_dump(estate_backup: EstateBackup, pg_estate: PgEstate, tmp_path: Path):
    copy = BackupSet(tmp_path, "postgres", "full", estate_backup.manifest.backup_id)
    shutil.copytree(estate_backup.ctx.set_dir, copy.path)
    dump = copy.path / f"databases/{pg_estate.dbname}.dump.zst"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))

    problems = postgres.verify(copy, estate_backup.manifest)

    assert len(problems) == 1
    assert problems[0].startswith(f"databases/{pg_estate.dbname}.dump.zst: does not decompress")


def test_unreachable_source_names_connection_and_address(pg_estate: PgEstate, tmp_path: Path):
    port = free_port()
    ctx = make_context(tmp_path, pg_estate, "20260301T020000Z")
    connection = ctx.get_connection("erp_postgres")
    connection.port = port

    with pytest.raises(SourceUnavailable) as failure:
        postgres.backup(ctx)

    assert "'erp_postgres'" in str(failure.value) and f"127.0.0.1:{port}" in str(failure.value)
    assert list(ctx.set_dir.iterdir()) == []


class PausingExecutor(LocalExecutor):
    """The real local executor, holding pg_dump's output after its first chunk until told to go on."""

    def __init__(self):
        super().__init__()
        self.paused, self.resume = threading.Event(), threading.Event()

    def stream(self, command) -> Iterator[bytes]:
        for index, chunk in enumerate(super().stream(command)):
            yield chunk
            if index == 0 and command.argv[0] == "pg_dump":
                self.paused.set()
                assert self.resume.wait(120), "the test never resumed the dump"


def test_source_killed_mid_dump_fails_without_partial_file(pg_estate: PgEstate, tmp_path: Path, monkeypatch):
    executor = PausingExecutor()
    monkeypatch.setattr(dump, "executor_for", lambda options, source: executor)
    ctx = make_context(tmp_path, pg_estate, "20260301T020000Z")
    terminated: list[int] = []

    def kill_pg_dump_backend() -> None:
        try:
            if executor.paused.wait(120):  # pg_dump is blocked mid-stream, its backend mid-COPY
                admin = pg_estate.conninfo("postgres")
                pids = [pid for (pid,) in query(
                    admin, "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'pg_dump'",
                    (pg_estate.dbname,))]
                for pid in pids:  # one by one: only that backend, never a filter evaluated per row
                    if query(admin, "SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]:
                        terminated.append(pid)
        finally:
            executor.resume.set()

    killer = threading.Thread(target=kill_pg_dump_backend)
    killer.start()
    try:
        with pytest.raises(postgres.PostgresBackupError) as failure:
            postgres.backup(ctx)
    finally:
        executor.resume.set()
        killer.join()

    assert len(terminated) == 1
    message = str(failure.value)
    assert f"pg_dump of database '{pg_estate.dbname}'" in message and "'erp_postgres' (127.0.0.1:5432)" in message
    assert "exit 1" in message and f"partial file databases/{pg_estate.dbname}.dump.zst removed" in message
    assert not (ctx.set_dir / "databases" / f"{pg_estate.dbname}.dump.zst").exists()
    assert list((ctx.set_dir / "databases").iterdir()) == []


class LocalContainerAPI:
    """A docker.APIClient double whose "container" is this machine.

    Records every call and runs exec commands locally, where PostgreSQL listens on
    /var/run/postgresql like inside the erp-postgres container. With
    `failing_dump`, `pg_dump` (not `--version`) prints a little and exits 1 instead.
    """

    def __init__(self, failing_dump: bool = False):
        self.failing_dump = failing_dump
        self.calls: list[tuple] = []
        self.execs: dict[str, dict] = {}

    def inspect_container(self, container: str) -> dict:
        self.calls.append(("inspect_container", container))
        return {"State": {"Running": True}}

    def exec_create(self, container, cmd, environment=None, user="", stdin=False, **kwargs) -> dict:
        exec_id = f"exec-{len(self.execs) + 1}"
        self.calls.append(("exec_create", container, tuple(cmd), dict(environment or {})))
        self.execs[exec_id] = {"cmd": list(cmd), "env": {**os.environ, **(environment or {})}, "exit": None}
        return {"Id": exec_id}

    def exec_start(self, exec_id, stream=False, demux=False, **kwargs):
        self.calls.append(("exec_start", exec_id, stream, demux))
        chunks = self._run(self.execs[exec_id])
        if stream:
            return chunks
        pairs = list(chunks)
        return b"".join(o for o, _ in pairs if o), b"".join(e for _, e in pairs if e)

    def _run(self, execution: dict) -> Iterator[tuple[bytes | None, bytes | None]]:
        cmd = execution["cmd"]
        if self.failing_dump and cmd[0] == "pg_dump" and "--version" not in cmd:
            yield b"PGDMP partial output", None
            yield None, b"pg_dump: error: server closed the connection unexpectedly"
            execution["exit"] = 1
            return
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=execution["env"])
        while chunk := proc.stdout.read(1 << 16):
            yield chunk, None
        err = proc.stderr.read()
        execution["exit"] = proc.wait()
        if err:
            yield None, err

    def exec_inspect(self, exec_id) -> dict:
        self.calls.append(("exec_inspect", exec_id))
        return {"ExitCode": self.execs[exec_id]["exit"]}


def test_docker_mode_backup_through_the_api(estate_backup: EstateBackup, pg_estate: PgEstate, tmp_path: Path,
                                            monkeypatch, caplog):
    api = LocalContainerAPI()
    monkeypatch.setattr(dump, "docker_api", lambda conn_id=None, base_url=None: api)
    ctx = make_context(tmp_path, pg_estate, "20260302T020000Z", exec_mode="docker")
    caplog.set_level("INFO")

    outcome = postgres.backup(ctx)

    creates = [call for call in api.calls if call[0] == "exec_create"]
    assert all(call[1] == "erp-postgres" and call[3] == {"PGPASSWORD": SECRET} for call in creates[2:])
    assert [call[2][0] for call in creates] == ["pg_dump", "pg_dumpall", "pg_dumpall", "pg_dump"]
    assert creates[2][2] == ("pg_dumpall", "--no-password", "--globals-only", "--dbname=user=postgres dbname=postgres")
    dump_argv = creates[3][2]
    assert dump_argv[:4] == ("pg_dump", "--no-password", "--format=custom", "--compress=0")
    assert dump_argv[4].startswith("--snapshot=") and dump_argv[5] == f"--dbname=user=postgres dbname={pg_estate.dbname}"
    assert not any(SECRET in arg for call in creates for arg in call[2])
    assert outcome.source["exec_mode"] == "docker" and outcome.source["container"] == "erp-postgres"
    same_data = estate_backup.manifest.details["databases"][pg_estate.dbname]["tables"]
    assert outcome.details["databases"][pg_estate.dbname]["tables"] == same_data
    manifest = write_manifest_for(ctx, outcome, datetime.now(timezone.utc))
    assert postgres.verify(ctx.backup_set, manifest) == []
    assert f"pg_dump {pg_estate.dbname} (127.0.0.1:5432): wrote databases/{pg_estate.dbname}.dump.zst" in caplog.text
    assert SECRET not in caplog.text


def test_docker_mode_nonzero_exit_fails_the_backup(pg_estate: PgEstate, tmp_path: Path, monkeypatch):
    api = LocalContainerAPI(failing_dump=True)
    monkeypatch.setattr(dump, "docker_api", lambda conn_id=None, base_url=None: api)
    ctx = make_context(tmp_path, pg_estate, "20260302T020000Z", exec_mode="docker")

    with pytest.raises(postgres.PostgresBackupError) as failure:
        postgres.backup(ctx)

    assert "docker exec erp-postgres, exit 1" in str(failure.value)
    assert "server closed the connection unexpectedly" in str(failure.value)
    assert list((ctx.set_dir / "databases").iterdir()) == []
    assert ("exec_inspect", "exec-4") in api.calls


def test_measure_against_pg_dumpall_gzip(estate_backup: EstateBackup, pg_estate: PgEstate, tmp_path: Path,
                                         capsys):
    """Not timed assertions: prints our full backup next to a plain SQL dump piped through gzip."""
    plain = tmp_path / "plain.sql.gz"
    conninfo = pg_estate.conninfo("postgres")
    # pg_dumpall cannot select one database on a shared server; this is exactly its output for it.
    script = (
        f"set -o pipefail; {{ pg_dumpall --globals-only --dbname='{conninfo}' &&"
        f" pg_dump --create --format=plain --dbname='{pg_estate.conninfo()}'; }} | gzip > {plain}"
    )
    clock = time.monotonic()
    subprocess.run(["bash", "-c", script], check=True)
    plain_seconds = time.monotonic() - clock
    ours = estate_backup.manifest
    raw = ours.details["raw_bytes"]
    with capsys.disabled():
        print(
            f"\n[pg full vs plain] estate {pg_estate.dbname}: ours {ours.total_size / 1e6:.2f} MB "
            f"(raw {raw / 1e6:.2f} MB, zstd-3, +inventory) in {estate_backup.seconds:.2f} s; "
            f"pg_dumpall-style SQL | gzip -6: {plain.stat().st_size / 1e6:.2f} MB in {plain_seconds:.2f} s"
        )
    assert plain.stat().st_size > 0 and ours.total_size > 0
