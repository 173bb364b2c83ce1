"""Bad input at the backup step: a full disk and a missing connection give clear errors and lose nothing."""

from __future__ import annotations

import dataclasses
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from erp_backup import staging, steps
from erp_backup.plan import load_plan
from erp_backup.services.base import ConnectionMissing, RunInfo
from erp_backup.sets import BackupSet, SetState
from tests.fixtures.pg_estate import PgEstate
from tests.integration.dagrun import write_plan

pytestmark = pytest.mark.integration


def run_at(moment: datetime) -> RunInfo:
    return RunInfo(dag_id="backup_postgres_full", run_id=f"scheduled__{moment.isoformat()}", run_after=moment,
                   logical_date=moment)


def full_job(estate: PgEstate):
    job = load_plan().job("postgres", "full")
    return dataclasses.replace(job, options={**job.options, "databases": [estate.dbname]})


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 1 MiB tmpfs as the backup root: the sample estate's dump does not fit twice."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def plan_with_free_space_factor(tmp_path: Path, factor: float):
    """The committed plan with `staging.free_space_factor` changed."""
    return load_plan(write_plan(tmp_path / "plan.yaml", edit=lambda d: d["staging"].update(free_space_factor=factor)))


def test_full_disk_fails_clearly_and_keeps_the_earlier_backup(small_disk, pg_estate, monkeypatch, tmp_path):
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(small_disk))
    plan = plan_with_free_space_factor(tmp_path, 0.1)  # let the free-space check pass: the disk fills mid-write
    job = full_job(pg_estate)
    connection = pg_estate.connection()
    first = steps.backup(plan, job, run_at(datetime(2026, 3, 1, 17, tzinfo=timezone.utc)), lambda cid: connection)
    earlier = BackupSet(small_disk, "postgres", "full", first)
    assert earlier.state is SetState.UNVERIFIED
    before = {p: p.read_bytes() for p in earlier.path.rglob("*") if p.is_file()}

    with pytest.raises(steps.BackupFailed) as caught:
        steps.backup(plan, job, run_at(datetime(2026, 3, 2, 17, tzinfo=timezone.utc)), lambda cid: connection)
    message = str(caught.value)
    assert f"disk full under {small_disk}" in message and "postgres/full/20260302T170000Z" in message
    assert "no earlier backup was touched" in message
    assert f"disk full: writing databases/{pg_estate.dbname}.dump.zst of set postgres/full/20260302T170000Z" in message
    assert not (small_disk / "postgres" / "full" / "20260302T170000Z").exists()
    assert {p: p.read_bytes() for p in earlier.path.rglob("*") if p.is_file()} == before


def test_too_little_space_for_a_set_like_the_last_is_refused_before_writing(small_disk, pg_estate, monkeypatch):
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(small_disk))
    plan = load_plan()
    job = full_job(pg_estate)
    connection = pg_estate.connection()
    first = steps.backup(plan, job, run_at(datetime(2026, 3, 1, 17, tzinfo=timezone.utc)), lambda cid: connection)
    earlier = BackupSet(small_disk, "postgres", "full", first)
    before = {p: p.read_bytes() for p in earlier.path.rglob("*") if p.is_file()}
    needed = int(earlier.manifest().total_size * staging.limits(plan).free_factor)

    with pytest.raises(staging.StagingFull) as caught:
        steps.backup(plan, job, run_at(datetime(2026, 3, 2, 17, tzinfo=timezone.utc)), lambda cid: connection)
    message = str(caught.value)
    free = int(message.split(": ")[1].split(" bytes free")[0])
    assert f"not enough free space under {small_disk} for postgres/full/20260302T170000Z: {free} bytes free, " \
           f"{needed} bytes needed" in message and free < needed
    assert "nothing was written" in message
    assert not (small_disk / "postgres" / "full" / "20260302T170000Z").exists()
    assert {p: p.read_bytes() for p in earlier.path.rglob("*") if p.is_file()} == before


def test_missing_connection_names_the_id_and_how_to_define_it(tmp_path, pg_estate, monkeypatch):
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tmp_path))
    monkeypatch.delenv("AIRFLOW_CONN_ERP_POSTGRES", raising=False)
    plan = load_plan()
    with pytest.raises(ConnectionMissing) as caught:
        steps.backup(plan, full_job(pg_estate), run_at(datetime(2026, 3, 1, 17, tzinfo=timezone.utc)))
    message = str(caught.value)
    assert "connection 'erp_postgres'" in message and "AIRFLOW_CONN_ERP_POSTGRES" in message
    assert not (tmp_path / "postgres" / "full" / "20260301T170000Z").exists()
