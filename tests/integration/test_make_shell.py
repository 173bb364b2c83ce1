"""`make shell`'s environment (include/scripts/local_env.sh, shared with `make run`): the README's commands work in it.

The estate directory and AIRFLOW_HOME point at this test's temporary directory, never at the checkout's .estate.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHELL = ROOT / "include" / "scripts" / "shell.sh"


def in_shell(tmp_path: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "ERP_"))}
    env.update(ERP_ESTATE_DIR=str(tmp_path / "estate"), AIRFLOW_HOME=str(tmp_path / "airflow"), PYTHONPATH="")
    return subprocess.run([str(SHELL), *argv], env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_run_local_and_the_shell_share_one_environment_file() -> None:
    assert "source include/scripts/local_env.sh" in (ROOT / "include/scripts/run_local.sh").read_text()
    assert "export" not in (ROOT / "include/scripts/run_local.sh").read_text()


def test_erp_restore_and_the_module_reach_the_local_estate(tmp_path: Path) -> None:
    (tmp_path / "estate" / "backup").mkdir(parents=True)

    listed = in_shell(tmp_path, "erp-restore", "list", "postgres", "full")
    assert listed.returncode == 0, listed.stderr
    assert f"no backup sets of postgres/full in {tmp_path / 'estate' / 'backup'}" in listed.stdout + listed.stderr

    module = in_shell(tmp_path, "python", "-m", "erp_backup", "drill-report")
    assert module.returncode == 1 and f"no DR drill ledger at {tmp_path / 'estate/backup/drills/ledger.jsonl'}" in module.stderr


def test_airflow_finds_the_projects_dags(tmp_path: Path) -> None:
    migrated = in_shell(tmp_path, "airflow", "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-2000:]

    parsed = in_shell(tmp_path, "airflow", "dags", "reserialize")  # what the dag processor of `make run` does
    assert parsed.returncode == 0, parsed.stderr[-2000:]
    listed = in_shell(tmp_path, "airflow", "dags", "list", "-o", "plain")

    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "dr_drill" in listed.stdout and "backup_watchdog" in listed.stdout and "backup_gitlab_full" not in listed.stdout
