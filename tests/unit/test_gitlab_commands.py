"""GitLab: the commands and decisions as data (argv tuples, backup id discovery, options, runbook)."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from airflow.sdk import Connection

from erp_backup.plan import load_plan
from erp_backup.runner import Command
from erp_backup.services.gitlab import commands as gitlab
from erp_backup.services.gitlab import host
from erp_backup.services.gitlab.commands import GitLabBackupError, GitLabOptions, GitLabRestoreError

DEFAULTS = GitLabOptions()
BACKUP_ID = "1764115200_2025_11_26_17.5.1-ee"


def test_plan_options_are_valid_gitlab_options():
    opts = GitLabOptions.from_plan(load_plan().job("gitlab", "full").options)
    assert (opts.exec_mode, opts.container) == ("docker", "ops-gitlab")
    assert opts.tar_path(BACKUP_ID) == f"/var/opt/gitlab/backups/{BACKUP_ID}_gitlab_backup.tar"
    assert opts.config_path("gitlab-secrets.json") == "/etc/gitlab/gitlab-secrets.json"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"exec_mode": "ssh"}, "exec_mode"),
        ({"compression": "xz"}, "compression"),
        ({"container": ""}, "container"),
        ({"backups_dir": 5}, "backups_dir"),
        ({"verify_copy": "yes"}, "verify_copy"),
        ({"containr": "ops-gitlab"}, "containr"),
    ],
)
def test_bad_options_name_the_plan_field(options, field):
    with pytest.raises(GitLabBackupError, match=rf"services\.gitlab\.options\.{field}"):
        GitLabOptions.from_plan(options)


def test_create_command_places_compress_cmd_before_gitlab_backup():
    assert gitlab.create_command(DEFAULTS, "zstd -T0") == Command(
        ("env", "COMPRESS_CMD=zstd -T0", "gitlab-backup", "create", "STRATEGY=copy", "CRON=1")
    )
    assert gitlab.create_command(DEFAULTS, None) == Command(("gitlab-backup", "create", "STRATEGY=copy", "CRON=1"))
    custom = GitLabOptions(gitlab_backup_cmd="/opt/standin/bin/gitlab-backup")
    assert gitlab.create_command(custom, None).argv[0] == "/opt/standin/bin/gitlab-backup"


def test_helper_commands():
    tar = DEFAULTS.tar_path(BACKUP_ID)
    assert gitlab.version_command(DEFAULTS).argv == ("head", "-n", "1", "/opt/gitlab/version-manifest.txt")
    assert gitlab.zstd_probe_command().argv == ("sh", "-c", "command -v zstd")
    assert gitlab.list_backups_command(DEFAULTS).argv == ("ls", "-1A", "--", "/var/opt/gitlab/backups")
    assert gitlab.checksum_command(tar).argv == ("sha256sum", "--", tar)
    assert gitlab.remove_command(tar).argv == ("rm", "-f", "--", tar)
    for command in (gitlab.version_command(DEFAULTS), gitlab.create_command(DEFAULTS, "zstd -T0")):
        assert command.env == {}


@pytest.mark.parametrize(
    "output",
    [
        f"Dumping database ... done\nCreating backup archive: {BACKUP_ID}_gitlab_backup.tar ... done\n",
        f"2025-11-26 04:00:09 UTC -- Backup {BACKUP_ID} is done.\n",
        f"\x1b[32mCreating backup archive: {BACKUP_ID}_gitlab_backup.tar\x1b[0m ... \x1b[32mdone\x1b[0m\n",
    ],
)
def test_backup_id_is_read_from_either_output_form(output):
    assert gitlab.parse_backup_id(output) == BACKUP_ID


def test_no_backup_id_in_quiet_output():
    assert gitlab.parse_backup_id("") is None
    assert gitlab.parse_backup_id("Dumping database ... done\n") is None


def test_listing_keeps_only_gitlab_backup_tars():
    listing = f"{BACKUP_ID}_gitlab_backup.tar\n.tmp\nnotes.txt\n1_2025_01_01_17.5.1_gitlab_backup.tar\n"
    assert gitlab.backup_ids_in_listing(listing) == {BACKUP_ID, "1_2025_01_01_17.5.1"}


def test_find_backup_id_prefers_output_then_the_one_new_file():
    before = {"old"}
    assert gitlab.find_backup_id(f"Backup {BACKUP_ID} is done.", before, before | {BACKUP_ID}, "/b") == (
        BACKUP_ID, "output",
    )
    assert gitlab.find_backup_id("", before, before | {BACKUP_ID}, "/b") == (BACKUP_ID, "listing")


def test_find_backup_id_fails_clearly():
    with pytest.raises(GitLabBackupError, match="no new .*_gitlab_backup.tar appeared in /b.*backups_dir"):
        gitlab.find_backup_id("", {"old"}, {"old"}, "/b")
    with pytest.raises(GitLabBackupError, match="several new backups.*a, b"):
        gitlab.find_backup_id("", set(), {"a", "b"}, "/b")
    with pytest.raises(GitLabBackupError, match=f"reported backup {BACKUP_ID} but /b has no"):
        gitlab.find_backup_id(f"Backup {BACKUP_ID} is done.", set(), set(), "/b")


def test_compression_details_record_what_restore_needs():
    assert gitlab.compression_details("zstd -T0") == {
        "method": "zstd", "COMPRESS_CMD": "zstd -T0", "DECOMPRESS_CMD": "zstd -d",
    }
    assert gitlab.compression_details(None)["DECOMPRESS_CMD"] is None


def test_docker_url_from_connection():
    sock = Connection(conn_id="ops_gitlab", conn_type="docker", host="unix:///var/run/docker.sock")
    assert gitlab.docker_url_from_connection(sock, "ops_gitlab") == "unix:///var/run/docker.sock"
    tcp = Connection(conn_id="ops_gitlab", conn_type="docker", host="gitlab-host", port=2376)
    assert gitlab.docker_url_from_connection(tcp, "ops_gitlab") == "tcp://gitlab-host:2376"
    with pytest.raises(GitLabBackupError, match="connection 'ops_gitlab' has no host"):
        gitlab.docker_url_from_connection(Connection(conn_id="ops_gitlab", conn_type="docker"), "ops_gitlab")


def test_runbook_command_docker_mode():
    argv = gitlab.runbook_command(
        exec_mode="docker", prepared_dir=Path("/restore/gitlab"), gitlab_backup_id=BACKUP_ID,
        expected_version="gitlab-ee 17.5.1-ee", decompress_cmd="zstd -d", container="ops-gitlab",
    )
    assert argv == (
        str(gitlab.RESTORE_SCRIPT), "--mode", "docker", "--container", "ops-gitlab",
        "--from", "/restore/gitlab", "--backup-id", BACKUP_ID, "--expected-version", "gitlab-ee 17.5.1-ee",
        "--decompress-cmd", "zstd -d", "--yes",
    )


def test_runbook_command_local_mode_passes_paths_and_dry_run():
    argv = gitlab.runbook_command(
        exec_mode="local", prepared_dir=Path("/r"), gitlab_backup_id=BACKUP_ID, expected_version="gitlab-ce 17.5.1",
        decompress_cmd=None, paths={"gitlab_ctl_cmd": "/s/gitlab-ctl", "owner": ""}, dry_run=True,
    )
    assert "--container" not in argv and "--decompress-cmd" not in argv
    assert argv[-5:] == ("--gitlab-ctl-cmd", "/s/gitlab-ctl", "--owner", "", "--dry-run")
    with pytest.raises(GitLabRestoreError, match="unknown restore option 'colour'"):
        gitlab.runbook_command(
            exec_mode="local", prepared_dir=Path("/r"), gitlab_backup_id=BACKUP_ID, expected_version="v",
            decompress_cmd=None, paths={"colour": "x"},
        )


def _tar(members: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for member in members:
            archive.addfile(member, io.BytesIO(data[member.name]) if member.name in data else None)
    return buffer.getvalue()


def _file(name: str, content: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info


def test_untar_single_file_yields_the_member_bytes_from_small_chunks():
    content = bytes(range(256)) * 5000
    raw = _tar([_file("x.tar", content)], {"x.tar": content})
    chunks = (raw[i:i + 777] for i in range(0, len(raw), 777))
    assert b"".join(host.untar_single_file(chunks, "/b/x.tar")) == content


def test_untar_single_file_rejects_links_and_several_members():
    link = tarfile.TarInfo("gitlab-secrets.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/srv/secrets.json"
    with pytest.raises(GitLabBackupError, match="is a link to /srv/secrets.json"):
        list(host.untar_single_file([_tar([link], {})], "/etc/gitlab/gitlab-secrets.json"))
    two = _tar([_file("a", b"1"), _file("b", b"2")], {"a": b"1", "b": b"2"})
    with pytest.raises(GitLabBackupError, match=r"more than one entry \(b\)"):
        list(host.untar_single_file([two], "/x"))
    with pytest.raises(tarfile.ReadError):
        list(host.untar_single_file([two[:700]], "/x"))


def test_restore_script_is_valid_bash_and_refuses_without_dry_run_or_yes(tmp_path):
    script = str(gitlab.RESTORE_SCRIPT)
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    assert "set -euo pipefail" in gitlab.RESTORE_SCRIPT.read_text()
    base = [script, "--mode", "local", "--from", str(tmp_path), "--backup-id", "x", "--expected-version", "v"]
    refused = subprocess.run(base, capture_output=True, text=True)
    assert refused.returncode == 2 and "pass --dry-run to see the steps, or --yes" in refused.stderr
    bad_mode = subprocess.run([script, "--mode", "k8s"], capture_output=True, text=True)
    assert bad_mode.returncode == 2 and "--mode must be docker or local" in bad_mode.stderr
    missing = subprocess.run(base + ["--dry-run"], capture_output=True, text=True)
    assert missing.returncode == 1 and f"{tmp_path}/x_gitlab_backup.tar is missing" in missing.stderr
    helped = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "Usage:" in helped.stdout
