"""Two deployments sharing one backup root: two real processes back up the same window at once.

The first takes the job's lock and writes; the second fails at once with "locked by <pid>@<host>
since <time> (run <run_id>)" and touches nothing; the first's set verifies. A later retry of the
second finds the complete set and leaves it alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erp_backup.sets import BackupSet, SetState
from tests.fixtures.pg_estate import PgEstate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MOMENT = "2026-03-01T17:00:00+00:00"
BACKUP_ID = "20260301T170000Z"
RUN_ID = f"scheduled__{MOMENT}"
DEPLOYMENT = """
import dataclasses, json, sys, time
from datetime import datetime
from pathlib import Path
from airflow.sdk import Connection
from erp_backup import steps
from erp_backup.plan import load_plan
from erp_backup.services.base import RunInfo

moment, started_file, hold, port, dbname = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def get_connection(conn_id):
    started_file.write_text("writing")  # called inside the backup, with the lock held and the set created
    time.sleep(hold)
    return Connection(conn_id=conn_id, conn_type="postgres", host="127.0.0.1", port=port, login="postgres",
                      schema="postgres")

plan = load_plan()
job = plan.job("postgres", "full")
job = dataclasses.replace(job, options={**job.options, "databases": [dbname]})
when = datetime.fromisoformat(moment)
run = RunInfo(dag_id=job.dag_id, run_id=f"scheduled__{moment}", run_after=when, logical_date=when)
try:
    backup_id = steps.backup(plan, job, run, get_connection)
    steps.checksum(plan, job, backup_id)
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    sys.exit(1)
print(json.dumps({"backup_id": backup_id}))
"""


def deployment(root: Path, estate: PgEstate, started_file: Path, hold: float) -> subprocess.Popen:
    env = {**os.environ, "ERP_BACKUP_ROOT": str(root), "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT}"}
    return subprocess.Popen(
        [sys.executable, "-c", DEPLOYMENT, MOMENT, str(started_file), str(hold), str(estate.port), estate.dbname],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def result(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, dict]:
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no result line (exit {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}"
    return proc.returncode, json.loads(lines[-1])


def test_two_processes_on_one_root_give_one_good_set_and_one_clear_locked_failure(tmp_path: Path, pg_estate: PgEstate):
    root = tmp_path / "shared-root"
    first = deployment(root, pg_estate, tmp_path / "first-writing", hold=6)
    deadline = time.monotonic() + 120
    while not (tmp_path / "first-writing").exists():
        assert first.poll() is None, result(first)
        assert time.monotonic() < deadline, "the first deployment never started writing"
        time.sleep(0.05)
    set_dir = BackupSet(root, "postgres", "full", BACKUP_ID).path
    assert set_dir.is_dir() and (set_dir / ".writer.json").is_file()

    second = deployment(root, pg_estate, tmp_path / "second-writing", hold=0)
    code, failure = result(second)
    assert first.poll() is None, "the first deployment must still be writing when the second is refused"
    assert code == 1 and failure["error"] == "LockBusy", failure
    message = failure["message"]
    assert f"backup postgres/full under {root} is locked by {first.pid}@{socket.gethostname()} since " in message
    assert f"(run {RUN_ID})" in message
    assert not (tmp_path / "second-writing").exists()  # it never reached the source

    code, done = result(first)
    assert code == 0 and done == {"backup_id": BACKUP_ID}
    backup_set = BackupSet(root, "postgres", "full", BACKUP_ID)
    assert backup_set.state is SetState.VERIFIED
    assert not (set_dir / ".writer.json").exists()
    files = {p: p.read_bytes() for p in set_dir.rglob("*") if p.is_file()}

    # The second deployment's retry, once the first is done: the set is complete, nothing is retaken.
    code, retry = result(deployment(root, pg_estate, tmp_path / "retry-writing", hold=0))
    assert code == 0 and retry == {"backup_id": BACKUP_ID}
    assert {p: p.read_bytes() for p in set_dir.rglob("*") if p.is_file()} == files
    assert not (tmp_path / "retry-writing").exists()
