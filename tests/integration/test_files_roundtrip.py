"""Configuration files: a real tree backed up through the backup step, verified, restored and compared."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from airflow.sdk import Connection

from erp_backup import steps
from erp_backup.plan import BackupJob, Plan, load_plan
from erp_backup.runs import RunInfo
from erp_backup.services import files
from erp_backup.services.base import CheckContext, TargetUsageError
from erp_backup.sets import BackupSet, SetState
from tests.integration.test_drill_services import back_up, drill, make_env, passed  # noqa: F401 (make_env: fixture)

pytestmark = pytest.mark.integration

RUN = RunInfo("backup_files_full", "scheduled__2026-12-01T15:30:00+00:00", datetime(2026, 12, 1, 15, 30, tzinfo=timezone.utc),
              logical_date=datetime(2026, 12, 1, 15, 30, tzinfo=timezone.utc))


def clear_job(plan: Plan) -> BackupJob:
    """The plan's files job with `encrypt: false`: this module reads the archive as it lies on disk.

    Encrypted files sets are backed up, sealed and drilled in tests/integration/test_drill.py's weekly run.
    """
    return replace(plan.job("files", "full"), encrypt=False)


def write(path: Path, text: str, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


@pytest.fixture
def config_root(tmp_path: Path) -> Path:
    """The plan's four paths under a root, with the shapes real config trees have."""
    root = tmp_path / "host"
    write(root / "etc/gitlab/gitlab.rb", "external_url 'https://git.erp'\n", 0o600)
    write(root / "etc/gitlab/gitlab-secrets.json", json.dumps({"gitlab_rails": {"db_key_base": "k" * 64}}), 0o600)
    (root / "etc/gitlab/trusted-certs").mkdir(mode=0o700)
    os.chmod(root / "etc/gitlab/trusted-certs", 0o700)
    write(root / "etc/ssl/erp/erp.crt", "-----CERT-----\n", 0o644)
    key = write(root / "etc/ssl/erp/erp.key", "private key bytes\n", 0o600)
    os.chown(key, 0, 123) if os.geteuid() == 0 else None
    write(root / "opt/erp/.env", "ERP_DB_PASSWORD=not-in-logs\n", 0o640)
    write(root / "etc/nginx/sites-available/erp", "server { listen 443; }\n", 0o644)
    (root / "etc/nginx/sites-enabled").mkdir(parents=True)
    os.symlink("../sites-available/erp", root / "etc/nginx/sites-enabled/erp")
    write(root / "etc/nginx/conf.d/설정.conf", "# 한국어 이름\n", 0o644)
    os.link(root / "etc/nginx/sites-available/erp", root / "etc/nginx/erp.hardlink")
    os.mkfifo(root / "etc/nginx/control.fifo")
    return root


def fs_connection(root: Path):
    return lambda conn_id: Connection(conn_id=conn_id, conn_type="fs", extra=json.dumps({"path": str(root)}))


@pytest.fixture
def backed_up(config_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BackupSet:
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tmp_path / "backup"))
    plan = load_plan()
    backup_id = steps.backup(plan, clear_job(plan), RUN, get_connection=fs_connection(config_root))
    steps.checksum(plan, clear_job(plan), backup_id)
    return BackupSet(plan.backup_root, "files", "full", backup_id)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_backup_records_every_entry_with_mode_owner_and_hash(backed_up: BackupSet, config_root: Path) -> None:
    manifest = backed_up.manifest()
    entries = {e.path: e for e in files.manifest_entries(manifest)}

    assert backed_up.state is SetState.VERIFIED
    assert [f.path for f in manifest.files] == [files.ARCHIVE]
    secret = entries["etc/gitlab/gitlab-secrets.json"]
    assert (secret.kind, secret.mode, secret.sha256) == ("file", 0o600, sha256(config_root / "etc/gitlab/gitlab-secrets.json"))
    assert entries["etc/gitlab/trusted-certs"].kind == "dir" and entries["etc/gitlab/trusted-certs"].mode == 0o700
    assert entries["etc/nginx/sites-enabled/erp"].target == "../sites-available/erp"
    assert entries["etc/nginx/erp.hardlink"].sha256 == sha256(config_root / "etc/nginx/sites-available/erp")
    assert "etc/nginx/conf.d/설정.conf" in entries and "opt/erp/.env" in entries and "etc" in entries
    assert "etc/nginx/control.fifo" not in entries
    if os.geteuid() == 0:
        assert (entries["etc/ssl/erp/erp.key"].uid, entries["etc/ssl/erp/erp.key"].gid) == (0, 123)
    assert "not-in-logs" not in json.dumps(manifest.details)  # contents never reach the manifest
    assert files.verify(backed_up, manifest) == []


def test_a_skipped_special_file_is_a_warning(config_root: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tmp_path / "backup"))
    plan = load_plan()
    with caplog.at_level("WARNING"):
        steps.backup(plan, clear_job(plan), RUN, get_connection=fs_connection(config_root))
    assert "skipped etc/nginx/control.fifo: not a file, directory or symlink" in caplog.text


def test_restore_is_exact_and_a_changed_file_is_found(backed_up: BackupSet, tmp_path: Path) -> None:
    manifest = backed_up.manifest()
    target = tmp_path / "restored"

    report = files.restore(backed_up.path, manifest, target)

    assert report.ok and report.checks and report.restored_bytes == manifest.details["source_bytes"]
    assert os.readlink(target / "etc/nginx/sites-enabled/erp") == "../sites-available/erp"
    assert (target / "etc/gitlab/gitlab-secrets.json").stat().st_mode & 0o777 == 0o600
    (target / "opt/erp/.env").write_text("ERP_DB_PASSWORD=changed\n")
    os.chmod(target / "etc/gitlab/trusted-certs", 0o755)
    found = files.check_restored(target, backed_up.path, manifest, report, CheckContext(guard=lambda h, p: None))
    assert sorted(found.problems) == [
        "etc/gitlab/trusted-certs: mode 0755, the backup has 0700",
        "opt/erp/.env: content differs from the backup (SHA-256)",
    ]


def test_dry_run_writes_nothing_and_a_used_target_is_refused(backed_up: BackupSet, tmp_path: Path) -> None:
    manifest = backed_up.manifest()
    report = files.restore(backed_up.path, manifest, tmp_path / "new", dry_run=True)
    assert report.dry_run and "into" in report.actions[0] and not (tmp_path / "new").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.me").write_text("x")
    with pytest.raises(TargetUsageError, match="new or empty directory"):
        files.restore(backed_up.path, manifest, used)


def test_standard_tools_restore_the_same_tree(backed_up: BackupSet, tmp_path: Path) -> None:
    target = tmp_path / "by-hand"
    target.mkdir()
    subprocess.run(f"zstd -q -d < {backed_up.path / files.ARCHIVE} | tar -x --numeric-owner -p -C {target}",
                   shell=True, check=True)
    assert files.compare_tree(target, files.manifest_entries(backed_up.manifest())).problems == []


def test_a_corrupt_archive_fails_verify(backed_up: BackupSet) -> None:
    archive = backed_up.path / files.ARCHIVE
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(archive, 0o600)
    archive.write_bytes(bytes(data))
    problems = files.verify(backed_up, backed_up.manifest())
    assert problems and any("cannot be read" in p or "differs" in p or "not in the archive" in p for p in problems)


def test_a_missing_path_names_it_and_the_root(config_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tmp_path / "backup"))
    (config_root / "opt/erp/.env").unlink()
    plan = load_plan()
    with pytest.raises(files.SourceUnavailable, match=r"/opt/erp/\.env does not exist under .*host"):
        steps.backup(plan, clear_job(plan), RUN, get_connection=fs_connection(config_root))
    assert not any((tmp_path / "backup" / "files" / "full").glob("*/manifest.json"))


def test_the_weekly_drill_restores_a_files_set_and_checks_every_entry(make_env, config_root: Path) -> None:  # noqa: F811
    env = make_env("files")
    backup_id = back_up(env, "files", "full", get_connection=fs_connection(config_root))

    result = passed(drill(env, {"service": "files"}))

    assert (result["backup_type"], result["backup_id"], result["status"]) == ("full", backup_id, "passed")
    assert any(check.endswith("match the manifest") and "symlinks" in check for check in result["checks"])
    assert result["target"].startswith("directory ") and result["rto"]["within_target"] is True
