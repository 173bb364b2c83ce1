"""docs/runbook.md's by-hand PostgreSQL restore, pasted as it is into bash.

A set of two databases (one named with a space, so its dump file is percent-encoded;
one with a tenant schema named in Korean that has a comment and a grant, dumped in the
directory layout) is backed up
from the shared server, sealed and copied to a NAS-style offsite store. The runbook's
block then runs verbatim with bash against scratch clusters: the whole set, one
tenant into a fresh server, and one tenant whose manifest row count was altered,
which its check step must report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from erp_backup import crypto
from erp_backup.checksum import verify_and_seal
from erp_backup.manifest import MANIFEST_NAME, write_manifest
from erp_backup.offsite import FilesystemOffsite
from erp_backup.plan import BackupJob
from erp_backup.services import postgres
from erp_backup.services.base import RunInfo
from tests.conftest import AGE_KEYS
from tests.fixtures.factories import make_backup_context, make_manifest

pytestmark = pytest.mark.integration

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"
FIRST_LINE = "# PostgreSQL full restore by hand"
SHARED = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
BACKUP_ID = "20260301T020000Z"
TENANT = "고객사"


@dataclass(frozen=True)
class OffsiteSet:
    nas: Path
    databases: tuple[str, str]
    reader: str
    sealed_nas: Path  # the same databases in an encrypted, sealed set


def runbook_block() -> str:
    blocks = re.findall(r"^```bash\n(.*?)^```", RUNBOOK.read_text(), flags=re.DOTALL | re.MULTILINE)
    (block,) = [b for b in blocks if b.startswith(FIRST_LINE + "\n")]
    return block


def _fill(main: str, other: str, reader: str) -> None:
    ident = sql.Identifier
    with psycopg.connect(**SHARED, dbname=main, autocommit=True) as conn:
        for schema, rows in ((TENANT, 120), ("tenant_acme", 80)):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident(schema)))
            conn.execute(sql.SQL("CREATE TABLE {}.orders (id int PRIMARY KEY, total numeric)").format(ident(schema)))
            conn.execute(sql.SQL("INSERT INTO {}.orders SELECT g, g * 1.5 FROM generate_series(1, {}) g")
                         .format(ident(schema), sql.Literal(rows)))
        conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS '고객사 테넌트'").format(ident(TENANT)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(ident(TENANT), ident(reader)))
    with psycopg.connect(**SHARED, dbname=other, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 30) g")


def _threshold_between(main: str, other: str) -> float:
    """MB between the two databases' sizes: the main one is dumped in the directory layout, the other as one file."""
    with psycopg.connect(**SHARED, dbname="postgres") as conn:
        sizes = [conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0] for name in (main, other)]
    assert sizes[0] > sizes[1]
    return sum(sizes) / 2 / 2**20


def _backup_to_nas(root: Path, databases: tuple[str, str], recipients: tuple[str, ...] = ()) -> Path:
    from airflow.sdk import Connection

    job = BackupJob(
        service="postgres", backup_type="full", schedule="0 2 * * *", timezone="Asia/Seoul",
        retention=timedelta(days=30), method="pg_dump", rpo=timedelta(hours=6), rto=timedelta(hours=2),
        connections={"source": "erp_postgres"}, enabled=True,
        options={"exec_mode": "network", "compress_level": 3, "databases": list(databases),
                 "parallel_dump_min_mb": _threshold_between(*databases), "dump_jobs": 2},
    )
    connection = Connection(conn_id="erp_postgres", conn_type="postgres", host=SHARED["host"], port=SHARED["port"],
                            login=SHARED["user"], schema="postgres")
    run = RunInfo(dag_id="backup_postgres_full", run_id=f"manual__{BACKUP_ID}", run_after=datetime.now(timezone.utc))
    ctx = make_backup_context(root / "staging", job=job, run=run, backup_id=BACKUP_ID, connection=connection)
    if recipients:  # an encrypted set, as the backup step makes it when the plan says `encrypt: true`
        crypto.prepare_set(ctx.set_dir, recipients)
    started = datetime.now(timezone.utc)
    outcome = postgres.backup(ctx)
    write_manifest(ctx.set_dir, make_manifest(context=ctx, outcome=outcome, captured_started_at=started,
                                              captured_finished_at=datetime.now(timezone.utc)))
    verify_and_seal(ctx.backup_set)
    nas = root / "nas"
    nas.mkdir()
    FilesystemOffsite(nas).upload_set(ctx.backup_set)
    return nas


@pytest.fixture(scope="module")
def offsite_set(tmp_path_factory) -> Iterator[OffsiteSet]:
    suffix = uuid.uuid4().hex[:8]
    databases, reader = (f"erp_runbook_{suffix}", f"erp runbook {suffix}"), f"erp_runbook_reader_{suffix}"
    with psycopg.connect(**SHARED, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(reader)))
        for name in databases:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        _fill(*databases, reader)
        yield OffsiteSet(_backup_to_nas(tmp_path_factory.mktemp("runbook"), databases), databases, reader,
                         _backup_to_nas(tmp_path_factory.mktemp("runbook-sealed"), databases, (AGE_KEYS.recipient,)))
    finally:
        with psycopg.connect(**SHARED, dbname="postgres", autocommit=True) as conn:
            for name in databases:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(reader)))


def run_runbook(offsite: OffsiteSet, cluster, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    """The block as it stands in the document, with the variables the runbook says to export first."""
    tmp.mkdir(exist_ok=True)
    script = tmp.parent / f"{tmp.name}.sh"
    script.write_text(runbook_block())
    environment: dict[str, str] = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "TMPDIR": str(tmp),
                   "PGHOST": "127.0.0.1", "PGPORT": str(cluster.port), "PGUSER": "postgres",
                   "BACKUP_ID": BACKUP_ID, "OFFSITE": str(offsite.nas), "JOBS": "2"}
    environment.update(env)
    return subprocess.run(["bash", str(script)], env=environment, capture_output=True, text=True, timeout=300)


def count(cluster, dbname: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(cluster.conninfo(), dbname=dbname) as conn:
        return conn.execute(query, params).fetchall()


def test_the_runbook_restores_every_database_and_checks_row_counts(offsite_set: OffsiteSet, scratch_pg, tmp_path):
    main, other = offsite_set.databases
    manifest = json.loads((offsite_set.nas / f"postgres/full/{BACKUP_ID}" / MANIFEST_NAME).read_text())
    assert [manifest["details"]["databases"][name]["format"] for name in (main, other)] == ["directory", "custom"]

    done = run_runbook(offsite_set, scratch_pg, tmp_path / "tmp")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{other}: 1 tables: row counts match the manifest",
                                        f"{main}: 2 tables: row counts match the manifest"]
    assert count(scratch_pg, main, f'SELECT count(*) FROM "{TENANT}".orders UNION ALL '
                                            "SELECT count(*) FROM tenant_acme.orders") == [(120,), (80,)]
    assert count(scratch_pg, other, "SELECT count(*) FROM notes") == [(30,)]
    assert list((tmp_path / "tmp").iterdir()) == []  # its private temp directory is gone


def test_the_one_tenant_variant_on_a_fresh_server_and_its_check(offsite_set: OffsiteSet, scratch_pg, tmp_path):
    main = offsite_set.databases[0]

    done = run_runbook(offsite_set, scratch_pg, tmp_path / "tmp", TENANT=TENANT, DATABASE=main)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{main}: 1 tables: row counts match the manifest"]
    assert count(scratch_pg, main, "SELECT nspname FROM pg_namespace WHERE nspname IN (%s, 'tenant_acme')", (TENANT,)) == [
        (TENANT,)]
    assert count(scratch_pg, main, "SELECT obj_description(%s::regnamespace), has_schema_privilege(%s, %s, 'USAGE')",
                 (f'"{TENANT}"', offsite_set.reader, TENANT)) == [("고객사 테넌트", True)]

    # A second tenant into the now existing database, with the manifest's count altered: the check names it.
    manifest_file = offsite_set.nas / f"postgres/full/{BACKUP_ID}" / MANIFEST_NAME
    manifest = json.loads(manifest_file.read_text())
    original = manifest_file.read_text()
    (table,) = [t for t in manifest["details"]["databases"][main]["tables"] if t["schema"] == "tenant_acme"]
    table["rows"] = 81
    manifest_file.write_text(json.dumps(manifest))
    try:
        altered = run_runbook(offsite_set, scratch_pg, tmp_path / "tmp", TENANT="tenant_acme", DATABASE=main)
    finally:
        manifest_file.write_text(original)

    assert altered.returncode == 1
    assert altered.stderr.splitlines()[-2:] == [f"{main}: row counts differ from the manifest:",
                                                '"tenant_acme"."orders": 80 rows, manifest 81']
    assert count(scratch_pg, main, "SELECT count(*) FROM tenant_acme.orders") == [(80,)]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_an_encrypted_set_is_unsealed_with_the_age_identity_then_restored(offsite_set: OffsiteSet, scratch_pg, tmp_path):
    main, other = offsite_set.databases
    stored = offsite_set.sealed_nas / f"postgres/full/{BACKUP_ID}"
    assert (stored / "sealed/manifest.age").is_file()
    assert TENANT.encode() not in b"".join(path.read_bytes() for path in stored.rglob("*") if path.is_file())
    identity = tmp_path / "identity.txt"
    identity.write_text(AGE_KEYS.identity + "\n")
    identity.chmod(0o600)

    without = run_runbook(offsite_set, scratch_pg, tmp_path / "tmp", OFFSITE=str(offsite_set.sealed_nas))
    assert without.returncode != 0 and "set AGE_IDENTITY" in without.stderr

    done = run_runbook(offsite_set, scratch_pg, tmp_path / "tmp", OFFSITE=str(offsite_set.sealed_nas),
                       AGE_IDENTITY=str(identity))

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{other}: 1 tables: row counts match the manifest",
                                        f"{main}: 2 tables: row counts match the manifest"]
    assert count(scratch_pg, main, f'SELECT count(*) FROM "{TENANT}".orders') == [(120,)]
    assert list((tmp_path / "tmp").iterdir()) == []  # the decrypted dumps went with the private temp directory
