"""GitLab in local (Omnibus) mode, for real, against the stand-in under tests/fixtures/gitlab_standin/.

The stand-in is a test double of GitLab (an external system): bash `gitlab-backup`, `gitlab-ctl`
and `gitlab-rake` that keep GitLab's interface and layout. Our code runs unchanged: the backup
step writes a set with its manifest, the checksum step verifies it, restore() prepares the files,
and the runbook script restores them. Then the data is compared with what was backed up.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import stat
import subprocess
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from erp_backup import steps
from erp_backup.checksum import ChecksumMismatch
from erp_backup.plan import load_plan
from erp_backup.runner import CommandError
from erp_backup.services import gitlab
from erp_backup.services.base import CheckContext, RestoreReport, RunInfo, SourceUnavailable
from erp_backup.sets import SetState

pytestmark = pytest.mark.integration

STANDIN = Path(__file__).resolve().parents[1] / "fixtures" / "gitlab_standin"
VERSION = "gitlab-ce 17.5.1"
RUN = RunInfo(
    dag_id="backup_gitlab_full",
    run_id="scheduled__2026-11-26T04:00:00+09:00",
    run_after=datetime(2026, 11, 25, 19, tzinfo=timezone.utc),
    logical_date=datetime(2026, 11, 25, 19, tzinfo=timezone.utc),
)


class StandinHost:
    """A copy of the stand-in GitLab host in a tmp dir, and the plan options pointing at it."""

    def __init__(self, root: Path):
        self.home = root / "gitlab-host"
        shutil.copytree(STANDIN, self.home, symlinks=True)
        self.backups = self.home / "var/opt/gitlab/backups"
        self.backups.mkdir(parents=True)
        self.data = self.home / "var/opt/gitlab/data"
        self.config = self.home / "etc/gitlab"
        self.log = self.home / "var/log/standin.log"
        self.bin = self.home / "bin"

    def options(self, **extra: str) -> dict[str, str]:
        return {
            "exec_mode": "local",
            "gitlab_backup_cmd": str(self.bin / "gitlab-backup"),
            "backups_dir": str(self.backups),
            "config_dir": str(self.config),
            "version_manifest": str(self.home / "opt/gitlab/version-manifest.txt"),
            **extra,
        }

    def runbook_paths(self) -> dict[str, str]:
        return {
            "gitlab_backup_cmd": str(self.bin / "gitlab-backup"),
            "gitlab_ctl_cmd": str(self.bin / "gitlab-ctl"),
            "gitlab_rake_cmd": str(self.bin / "gitlab-rake"),
            "backups_dir": str(self.backups),
            "config_dir": str(self.config),
            "version_manifest": str(self.home / "opt/gitlab/version-manifest.txt"),
            "owner": "",
        }

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def wreck(self) -> None:
        """What a lost host looks like after reinstalling the same GitLab: no data, new secrets."""
        shutil.rmtree(self.data)
        (self.data / "db").mkdir(parents=True)
        secrets = json.loads((self.config / "gitlab-secrets.json").read_text())
        secrets["gitlab_rails"]["db_key_base"] = "a-new-install-key"
        (self.config / "gitlab-secrets.json").write_text(json.dumps(secrets, indent=2) + "\n")
        (self.config / "gitlab.rb").write_text("external_url 'http://localhost'\n")


@pytest.fixture
def host(tmp_path) -> StandinHost:
    return StandinHost(tmp_path)


def run_backup(tmp_path: Path, host: StandinHost, **extra: str):
    plan = replace(load_plan(), backup_root=tmp_path / "backup")
    # encrypt: false: this module reads the set's files as they lie on disk; encrypted GitLab sets are
    # backed up, sealed and drilled in tests/integration/test_drill.py's weekly run of every service.
    job = replace(plan.job("gitlab", "full"), options=host.options(**extra), encrypt=False)
    backup_id = steps.backup(plan, job, RUN, get_connection=lambda conn_id: pytest.fail("local mode needs no connection"))
    return plan, job, steps.backup_set_for(plan, job, backup_id)


def same_tree(left: Path, right: Path) -> bool:
    compared = filecmp.dircmp(left, right)
    if compared.left_only or compared.right_only or compared.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(left, right, compared.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(left / d, right / d) for d in compared.common_dirs)


@pytest.mark.parametrize(
    ("compression", "decompress_cmd"), [("auto", "zstd -d"), ("none", None)], ids=["zstd", "gitlab-gzip"]
)
def test_backup_wreck_restore_round_trip(tmp_path, host, compression, decompress_cmd):
    if compression == "auto" and shutil.which("zstd") is None:
        pytest.skip("zstd is not installed (apt package zstd)")
    plan, job, backup_set = run_backup(tmp_path, host, compression=compression)

    manifest = backup_set.manifest()
    details = manifest.details
    gitlab_id = details["gitlab_backup_id"]
    assert details["gitlab_version"] == VERSION
    assert details["gitlab_backup_id_found_by"] == "listing"  # CRON=1: GitLab printed no id
    assert details["compression"]["DECOMPRESS_CMD"] == decompress_cmd
    assert details["source_tar_removed"] is True
    assert list(host.backups.iterdir()) == [], "GitLab's tar is removed once our copy is safe"
    assert {entry.path for entry in manifest.files} == {
        f"{gitlab_id}_gitlab_backup.tar", "config/gitlab-secrets.json.zst", "config/gitlab.rb.zst",
    }
    create_line = next(line for line in host.log_lines() if line.startswith("gitlab-backup create"))
    assert create_line.startswith("gitlab-backup create STRATEGY=copy CRON=1 ")
    assert f"COMPRESS_CMD={details['compression']['COMPRESS_CMD'] or ''} " in create_line
    steps.checksum(plan, job, backup_set.backup_id)
    assert backup_set.state is SetState.VERIFIED

    original = tmp_path / "original"
    shutil.copytree(host.data, original / "data")
    shutil.copytree(host.config, original / "config")
    host.wreck()
    assert not same_tree(original / "data", host.data)

    prepared = tmp_path / "prepared"
    report = gitlab.restore(backup_set.path, manifest, prepared,
                            options={"exec_mode": "local", **host.runbook_paths()}).details
    assert report["restored"] is False and "runbook_command" in report["status"]
    assert sorted(p.name for p in prepared.iterdir()) == sorted(
        [f"{gitlab_id}_gitlab_backup.tar", "gitlab-secrets.json", "gitlab.rb"]
    )
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in prepared.iterdir())
    assert ("--decompress-cmd" in report["runbook_command"]) == (decompress_cmd is not None)

    done = subprocess.run(report["runbook_command"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert same_tree(original / "data", host.data)
    for name in ("gitlab-secrets.json", "gitlab.rb"):
        assert (host.config / name).read_bytes() == (original / "config" / name).read_bytes()
    kept = list(host.config.glob("gitlab-secrets.json.before-restore-*"))
    assert len(kept) == 1 and "a-new-install-key" in kept[0].read_text()

    runbook_calls = [line for line in host.log_lines() if not line.startswith("gitlab-backup create")]
    assert [line.split(" COMPRESS_CMD=")[0] for line in runbook_calls] == [
        "gitlab-ctl reconfigure",
        "gitlab-ctl stop puma",
        "gitlab-ctl stop sidekiq",
        f"gitlab-backup restore BACKUP={gitlab_id}",
        "gitlab-ctl restart",
        "gitlab-rake gitlab:check SANITIZE=true",
        "gitlab-rake gitlab:doctor:secrets",
    ]
    assert f"DECOMPRESS_CMD={decompress_cmd or ''} GITLAB_ASSUME_YES=1" in runbook_calls[3]


@pytest.fixture
def prepared(tmp_path, host):
    """A verified backup of the stand-in, wrecked host, and restore() prepared into a directory."""
    _, _, backup_set = run_backup(tmp_path, host)
    host.wreck()
    report = gitlab.restore(
        backup_set.path, backup_set.manifest(), tmp_path / "prepared", options={"exec_mode": "local", **host.runbook_paths()}
    )
    return report.details, backup_set


def test_restore_dry_run_prepares_nothing_and_lists_what_it_would_prepare(tmp_path, host):
    _, _, backup_set = run_backup(tmp_path, host)
    manifest = backup_set.manifest()
    tar = manifest.details["files"]["backup_tar"]
    target = tmp_path / "prepared"
    options = {"exec_mode": "local", **host.runbook_paths()}

    dry = gitlab.restore(backup_set.path, manifest, target, dry_run=True, options=options)

    assert not target.exists()
    assert dry.dry_run and dry.restored_bytes == 0 and dry.problems == [] and dry.checks == []
    assert dry.actions[0] == f"create {target} (mode 0700)"
    assert dry.actions[1].startswith(f"copy {tar} ({manifest.file(tar).size} bytes) to {target / tar} (mode 0600)")
    assert dry.actions[2:4] == [
        f"check config/gitlab-secrets.json.zst against the manifest and decompress it to {target}/gitlab-secrets.json",
        f"check config/gitlab.rb.zst against the manifest and decompress it to {target}/gitlab.rb",
    ]
    assert dry.actions[4] == "GitLab itself is not restored here: run on the GitLab host: " + dry.details[
        "runbook_command_text"]
    assert dry.details["restored"] is False and dry.details["status"] == "dry run: nothing was prepared"

    real = gitlab.restore(backup_set.path, manifest, target, options=options)
    assert real.details["runbook_command"] == dry.details["runbook_command"]
    assert not real.dry_run and real.problems == [] and real.details["restored"] is False
    assert real.restored_bytes == sum(path.stat().st_size for path in target.iterdir())
    assert real.actions[0].startswith("prepared (not restored) ")

    (backup_set.path / "config" / "gitlab.rb.zst").unlink()
    with pytest.raises(gitlab.GitLabRestoreError, match="config/gitlab.rb.zst is missing"):
        gitlab.restore(backup_set.path, manifest, tmp_path / "again", dry_run=True, options=options)
    assert not (tmp_path / "again").exists()


def test_check_restored_checks_the_prepared_files_and_says_gitlab_was_not_restored(prepared):
    report, backup_set = prepared
    directory = Path(report["prepared_dir"])
    ctx = CheckContext(guard=lambda host, port: pytest.fail("a prepared directory has no endpoint"))

    found = gitlab.check_restored(directory, backup_set.path, backup_set.manifest(), RestoreReport(details=report), ctx)

    assert found.problems == []
    tar = f"{report['gitlab_backup_id']}_gitlab_backup.tar"
    assert found.checks == [
        f"{tar}: {(directory / tar).stat().st_size} bytes, SHA-256 matches the manifest",
        "gitlab-secrets.json parses and holds gitlab_rails.db_key_base",
        "GitLab itself was not restored (no GitLab here): run on the GitLab host: " + report["runbook_command_text"],
    ]
    (directory / "gitlab-secrets.json").write_text("{}")
    (directory / tar).write_bytes(b"not the backup")
    found = gitlab.check_restored(directory, backup_set.path, backup_set.manifest(), RestoreReport(details=report), ctx)
    assert found.problems == [f"prepared {tar} differs from the manifest's {tar}",
                              "prepared gitlab-secrets.json has no gitlab_rails.db_key_base"]


def test_dry_run_prints_every_step_and_changes_nothing(host, prepared):
    report, _ = prepared
    log_before = host.log_lines()
    secrets_before = (host.config / "gitlab-secrets.json").read_bytes()

    done = subprocess.run(report["runbook_dry_run_text"], shell=True, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    titles = [line.split("] ", 1)[1].split(" ", 2)[:2] for line in done.stdout.splitlines() if line.startswith("[")]
    assert [" ".join(t) for t in titles] == [
        "check that", "put back", "copy " + f"{report['gitlab_backup_id']}_gitlab_backup.tar", "reconfigure GitLab",
        "stop puma", "restore backup", "restart GitLab", "check GitLab", "check that",
    ]
    assert "GITLAB_ASSUME_YES=1 DECOMPRESS_CMD=zstd\\ -d" in done.stdout
    assert "nothing was changed" in done.stdout
    assert host.log_lines() == log_before
    assert (host.config / "gitlab-secrets.json").read_bytes() == secrets_before
    assert list(host.backups.iterdir()) == []


def test_docker_mode_dry_run_uses_docker_exec_and_cp(prepared):
    report, backup_set = prepared
    docker = gitlab.restore(backup_set.path, backup_set.manifest(), Path(report["prepared_dir"]),
                            options={"exec_mode": "docker"}).details
    assert docker["runbook_command"][1:5] == ["--mode", "docker", "--container", "ops-gitlab"]

    done = subprocess.run(docker["runbook_dry_run_text"], shell=True, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    tar = f"{report['gitlab_backup_id']}_gitlab_backup.tar"
    for expected in (
        "+ docker exec ops-gitlab head -n 1 /opt/gitlab/version-manifest.txt",
        f"+ docker cp {report['prepared_dir']}/gitlab-secrets.json ops-gitlab:/etc/gitlab/gitlab-secrets.json",
        f"+ docker cp {report['prepared_dir']}/{tar} ops-gitlab:/var/opt/gitlab/backups/{tar}",
        f"+ docker exec ops-gitlab chown git:git /var/opt/gitlab/backups/{tar}",
        "+ docker exec ops-gitlab gitlab-ctl stop sidekiq",
        "+ docker exec -e GITLAB_ASSUME_YES=1 -e DECOMPRESS_CMD=zstd\\ -d ops-gitlab gitlab-backup restore "
        f"BACKUP={report['gitlab_backup_id']}",
        "+ docker exec ops-gitlab gitlab-rake gitlab:doctor:secrets",
    ):
        assert expected in done.stdout


def test_version_mismatch_stops_the_runbook_before_any_change(host, prepared):
    report, _ = prepared
    (host.home / "opt/gitlab/version-manifest.txt").write_text("gitlab-ce 17.6.0\n")
    secrets_before = (host.config / "gitlab-secrets.json").read_bytes()
    log_before = host.log_lines()

    done = subprocess.run(report["runbook_command"], capture_output=True, text=True, timeout=60)

    assert done.returncode == 1
    assert "GitLab here is 'gitlab-ce 17.6.0' but the backup was made by 'gitlab-ce 17.5.1'" in done.stderr
    assert "step 1 failed" in done.stderr
    assert (host.config / "gitlab-secrets.json").read_bytes() == secrets_before
    assert host.log_lines() == log_before


def test_zstd_backup_restored_without_decompress_cmd_fails(host, prepared):
    report, _ = prepared
    command = list(report["runbook_command"])
    at = command.index("--decompress-cmd")
    del command[at:at + 2]

    done = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert done.returncode != 0
    assert "Decompressing db/database.sql.gz with 'gzip -cd' failed" in done.stderr
    assert "step 6 failed" in done.stderr


def test_wrong_secrets_are_caught_by_doctor_secrets(host, prepared):
    report, _ = prepared
    secrets = Path(report["prepared_dir"]) / "gitlab-secrets.json"
    secrets.write_text(secrets.read_text().replace("standin-db-key-base", "another-key"))

    done = subprocess.run(report["runbook_command"], capture_output=True, text=True, timeout=60)

    assert done.returncode != 0
    assert "gitlab-secrets.json does not match the database" in done.stderr
    assert "step 9 failed" in done.stderr


def test_corrupt_set_fails_checksum_and_restore(tmp_path, host):
    plan, job, backup_set = run_backup(tmp_path, host)
    manifest = backup_set.manifest()
    tar = backup_set.path / manifest.details["files"]["backup_tar"]
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))

    with pytest.raises(gitlab.GitLabRestoreError, match=f"{tar.name} does not match the manifest.*use another backup"):
        gitlab.restore(backup_set.path, manifest, tmp_path / "prepared", options={"exec_mode": "local"})
    assert not (tmp_path / "prepared" / tar.name).exists()
    with pytest.raises(ChecksumMismatch, match=tar.name):
        steps.checksum(plan, job, backup_set.backup_id)
    assert backup_set.state is SetState.CORRUPT


def test_missing_gitlab_backup_is_source_unavailable(tmp_path, host):
    with pytest.raises(SourceUnavailable, match="exec_mode local, connection 'ops_gitlab'"):
        run_backup(tmp_path, host, gitlab_backup_cmd=str(tmp_path / "no-gitlab-backup"))
    assert not list((tmp_path / "backup").rglob("*.tar"))


def test_failed_gitlab_backup_leaves_no_set(tmp_path, host, monkeypatch):
    monkeypatch.setenv("GITLAB_STANDIN_FAIL", "create")
    with pytest.raises(CommandError, match="failed on purpose"):
        run_backup(tmp_path, host)
    assert not [p for p in (tmp_path / "backup").rglob("*") if p.is_file() and ".locks" not in p.parts]  # job lock stays


def test_unreadable_secrets_name_the_file(tmp_path, host):
    if os.geteuid() == 0:
        (host.config / "gitlab-secrets.json").unlink()
        expected = "No such file or directory"
    else:
        (host.config / "gitlab-secrets.json").chmod(0)
        expected = "Permission denied"
    with pytest.raises(gitlab.GitLabBackupError, match=f"cannot read {host.config}/gitlab-secrets.json: {expected}"):
        run_backup(tmp_path, host)
    assert len(list(host.backups.iterdir())) == 1, "GitLab's tar stays when our copy failed"
