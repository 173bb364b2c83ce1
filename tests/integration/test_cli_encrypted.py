"""The restore CLI on sealed sets, with Airflow down: --identity, wrong and missing keys, and key rotation.

Two real PostgreSQL full backups go through `steps.backup` → `checksum` → `offsite_upload`
to a moto bucket: the first sealed for key A, then the recipients connection is rotated
to key B and the second is sealed for B. Each is restored by `python -m erp_backup` from
offsite into its own scratch cluster with an identity file holding B then A.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from erp_backup import steps
from erp_backup.crypto import fingerprint
from erp_backup.plan import load_plan
from erp_backup.scratch.postgres import ScratchPostgres
from erp_backup.services.base import RunInfo
from erp_backup.sets import BackupSet, SetState
from tests.fixtures.keys import AgeKeys
from tests.fixtures.pg_estate import SAMPLE_SQL
from tests.fixtures.s3 import S3Endpoint
from tests.integration.dagrun import write_plan
from tests.integration.test_cli import UNREACHABLE_AIRFLOW_DB, inventory_of

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DB = "erp"
PREFIX = "erp"
BEFORE = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)
AFTER = datetime(2026, 3, 2, 2, 0, tzinfo=timezone.utc)
BEFORE_ID, AFTER_ID = "20260301T020000Z", "20260302T020000Z"


@dataclass
class Rotated:
    root: Path
    plan: Path
    s3: S3Endpoint
    source: ScratchPostgres
    old: AgeKeys
    new: AgeKeys
    snapshots: dict[str, list]  # backup id -> the source's inventory when it was taken


def take(plan_path: Path, moment: datetime, keys: AgeKeys, env: pytest.MonkeyPatch) -> str:
    env.setenv("AIRFLOW_CONN_BACKUP_AGE_RECIPIENTS", keys.recipients_conn_json())
    plan = load_plan(plan_path)
    job = plan.job("postgres", "full")
    run = RunInfo(dag_id=job.dag_id, run_id=f"scheduled__{moment.isoformat()}", run_after=moment, logical_date=moment)
    backup_id = steps.backup(plan, job, run)
    steps.checksum(plan, job, backup_id)
    steps.offsite_upload(plan, job, backup_id)
    return backup_id


@pytest.fixture(scope="module")
def rotated(s3_endpoint: S3Endpoint, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("cli-rotation")
    root = base / "staging"
    root.mkdir()
    source = ScratchPostgres.new("cli-rot-source", owner="pytest")
    old, new = AgeKeys.generate(), AgeKeys.generate()
    try:
        source.create()
        source.start()
        with psycopg.connect(source.conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DB}")
        subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"app_role=erp_app_{uuid.uuid4().hex[:8]}",
                        "-d", source.conninfo(DB), "-f", str(SAMPLE_SQL)], check=True, capture_output=True, timeout=300)
        bucket = f"cli-rot-{uuid.uuid4().hex[:8]}"
        s3_endpoint.client().create_bucket(Bucket=bucket)
        plan_path = write_plan(base / "plan.yaml", bucket=bucket, prefix=PREFIX)
        snapshots = {}
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ERP_BACKUP_ROOT", str(root))
            env.setenv("AIRFLOW_CONN_ERP_POSTGRES", json.dumps({
                "conn_type": "postgres", "host": "127.0.0.1", "port": source.port, "login": "postgres",
                "schema": "postgres"}))
            env.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", s3_endpoint.conn_json())
            snapshots[take(plan_path, BEFORE, old, env)] = inventory_of(source.conninfo(DB))
            with psycopg.connect(source.conninfo(DB), autocommit=True) as conn:  # the data moves on between the two
                conn.execute("UPDATE tenant_acme.customers SET name = name || ' (renamed)' WHERE id <= 3")
            snapshots[take(plan_path, AFTER, new, env)] = inventory_of(source.conninfo(DB))
        yield Rotated(root, plan_path, s3_endpoint, source, old, new, snapshots)
    finally:
        source.destroy()


def cli(rotated: Rotated, home: Path, *argv: str) -> subprocess.CompletedProcess:
    """The CLI in a clean environment: the offsite connection only, no identity connection, no Airflow DB."""
    environment = {
        "PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT / "plugins"),
        "AIRFLOW_HOME": str(home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": UNREACHABLE_AIRFLOW_DB,
        "ERP_BACKUP_ROOT": str(rotated.root), "ERP_BACKUP_PLAN": str(rotated.plan),
        "AIRFLOW_CONN_BACKUP_OFFSITE": rotated.s3.conn_json(),
    }
    return subprocess.run([sys.executable, "-m", "erp_backup", *argv], env=environment, capture_output=True,
                          text=True, timeout=600, cwd=home)


def identity_file(path: Path, *keys: AgeKeys) -> Path:
    path.write_text("".join(f"# {key.recipient}\n{key.identity}\n" for key in keys))
    path.chmod(0o600)
    return path


def test_both_sets_are_sealed_for_the_key_in_force_when_they_were_taken(rotated: Rotated):
    for backup_id, keys in ((BEFORE_ID, rotated.old), (AFTER_ID, rotated.new)):
        backup_set = BackupSet(rotated.root, "postgres", "full", backup_id)
        assert backup_set.state is SetState.OFFSITE
        assert backup_set.manifest().encryption["recipients"] == [keys.recipient]
        assert backup_set.manifest().encryption["fingerprints"] == [fingerprint(keys.recipient)]


@pytest.mark.parametrize("backup_id", [BEFORE_ID, AFTER_ID])
def test_after_rotation_one_identity_file_restores_sets_from_before_and_after(
        rotated: Rotated, backup_id: str, tmp_path: Path, scratch_pg_factory):
    target = scratch_pg_factory(name=f"cli-rot-{backup_id[:8]}")
    keys = identity_file(tmp_path / "keys.txt", rotated.new, rotated.old)
    work = tmp_path / "work"
    work.mkdir()

    done = cli(rotated, tmp_path, "restore", "postgres", "full", backup_id, "--from", "offsite", "--identity", str(keys),
               "--target", target.conninfo(), "--work-dir", str(work))

    assert done.returncode == 0, done.stderr
    assert f"OK: restored postgres/full/{backup_id} into " in done.stdout
    assert inventory_of(target.conninfo(DB)) == rotated.snapshots[backup_id]
    assert list(work.iterdir()) == []  # the decrypted copy is gone


def test_a_wrong_identity_is_one_clear_error_naming_the_set_and_the_recipient(rotated: Rotated, tmp_path: Path,
                                                                              scratch_pg_factory):
    target = scratch_pg_factory(name="cli-rot-wrong")
    only_new = identity_file(tmp_path / "new.txt", rotated.new)

    done = cli(rotated, tmp_path, "restore", "postgres", "full", BEFORE_ID, "--from", "offsite", "--identity",
               str(only_new), "--target", target.conninfo())

    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert f"backup postgres/full/{BEFORE_ID}" in line and fingerprint(rotated.old.recipient) in line
    assert fingerprint(rotated.new.recipient) in line and "Traceback" not in done.stderr
    assert rotated.new.identity not in done.stderr + done.stdout


def test_a_missing_identity_is_one_clear_error_and_a_local_sealed_set_restores_with_it(
        rotated: Rotated, tmp_path: Path, scratch_pg_factory):
    target = scratch_pg_factory(name="cli-rot-local")
    missing = cli(rotated, tmp_path, "restore", "postgres", "full", AFTER_ID, "--target", target.conninfo())
    assert missing.returncode == 1
    assert f"backup postgres/full/{AFTER_ID} is encrypted for recipient(s) {fingerprint(rotated.new.recipient)}" \
        in missing.stderr and "--identity FILE" in missing.stderr

    done = cli(rotated, tmp_path, "restore", "postgres", "full", AFTER_ID, "--identity",
               str(identity_file(tmp_path / "k.txt", rotated.new)), "--target", target.conninfo())
    assert done.returncode == 0, done.stderr
    assert inventory_of(target.conninfo(DB)) == rotated.snapshots[AFTER_ID]
