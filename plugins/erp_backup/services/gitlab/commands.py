"""GitLab's commands and decisions as data: plan options, argv tuples, backup id discovery, the runbook command.

Pure functions, asserted by the unit tests; nothing here runs a command.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from erp_backup.runner import Command

DEFAULT_CONTAINER = "ops-gitlab"
DEFAULT_BACKUPS_DIR = "/var/opt/gitlab/backups"
DEFAULT_CONFIG_DIR = "/etc/gitlab"
DEFAULT_VERSION_MANIFEST = "/opt/gitlab/version-manifest.txt"
DEFAULT_GITLAB_BACKUP_CMD = "gitlab-backup"
DEFAULT_DOCKER_PORT = 2375

ZSTD_COMPRESS_CMD = "zstd -T0"
ZSTD_DECOMPRESS_CMD = "zstd -d"
TAR_SUFFIX = "_gitlab_backup.tar"
SECRETS_NAME = "gitlab-secrets.json"
CONFIG_NAME = "gitlab.rb"
CONFIG_FILES = (SECRETS_NAME, CONFIG_NAME)
CONFIG_SET_DIR = "config"
BACKUP_INFORMATION = "backup_information.yml"
MAX_CONFIG_BYTES = 16 << 20
OPTION_PREFIX = "services.gitlab.options"

RUNBOOK_PATH_OPTIONS = (
    "backups_dir", "config_dir", "version_manifest", "gitlab_backup_cmd", "gitlab_ctl_cmd", "gitlab_rake_cmd", "owner",
)
RESTORE_SCRIPT = Path(__file__).resolve().parents[4] / "include" / "scripts" / "gitlab_restore.sh"

_BACKUP_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_TAR_NAME = re.compile(rf"^({_BACKUP_ID}){re.escape(TAR_SUFFIX)}$")
_ID_IN_OUTPUT = (
    re.compile(rf"Creating backup archive: ({_BACKUP_ID}){re.escape(TAR_SUFFIX)}"),
    re.compile(rf"Backup ({_BACKUP_ID}) is done"),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

ExecMode = Literal["docker", "local"]
Compression = Literal["auto", "zstd", "none"]


class GitLabBackupError(RuntimeError):
    """A GitLab backup step failed. The message names the command, path or option to fix."""


class GitLabRestoreError(RuntimeError):
    """A set cannot be prepared for restore. The message names the backup and file."""


@dataclass(frozen=True)
class GitLabOptions:
    """The plan's `services.gitlab.options`, validated."""

    exec_mode: ExecMode = "docker"
    container: str = DEFAULT_CONTAINER
    backups_dir: str = DEFAULT_BACKUPS_DIR
    config_dir: str = DEFAULT_CONFIG_DIR
    version_manifest: str = DEFAULT_VERSION_MANIFEST
    gitlab_backup_cmd: str = DEFAULT_GITLAB_BACKUP_CMD
    compression: Compression = "auto"
    exec_user: str | None = None
    verify_copy: bool = True
    docker_url: str | None = None

    @classmethod
    def from_plan(cls, options: Mapping[str, Any]) -> GitLabOptions:
        def text(key: str, default: str) -> str:
            value = options.get(key, default)
            if not isinstance(value, str) or not value.strip():
                raise GitLabBackupError(f"{OPTION_PREFIX}.{key}: must be a non-empty string, got {value!r}")
            return value

        def choice(key: str, default: str, allowed: tuple[str, ...]) -> Any:
            value = text(key, default)
            if value not in allowed:
                raise GitLabBackupError(f"{OPTION_PREFIX}.{key}: must be one of {', '.join(allowed)}, got {value!r}")
            return value

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise GitLabBackupError(f"{OPTION_PREFIX}.{unknown[0]}: unknown option (known: {', '.join(sorted(known))})")
        verify_copy = options.get("verify_copy", True)
        if not isinstance(verify_copy, bool):
            raise GitLabBackupError(f"{OPTION_PREFIX}.verify_copy: must be true or false, got {verify_copy!r}")
        exec_user = options.get("exec_user")
        docker_url = options.get("docker_url")
        return cls(
            exec_mode=choice("exec_mode", "docker", ("docker", "local")),
            container=text("container", DEFAULT_CONTAINER),
            backups_dir=text("backups_dir", DEFAULT_BACKUPS_DIR),
            config_dir=text("config_dir", DEFAULT_CONFIG_DIR),
            version_manifest=text("version_manifest", DEFAULT_VERSION_MANIFEST),
            gitlab_backup_cmd=text("gitlab_backup_cmd", DEFAULT_GITLAB_BACKUP_CMD),
            compression=choice("compression", "auto", ("auto", "zstd", "none")),
            exec_user=text("exec_user", "") if exec_user is not None else None,
            verify_copy=verify_copy,
            docker_url=text("docker_url", "") if docker_url is not None else None,
        )

    def tar_path(self, gitlab_backup_id: str) -> str:
        return posixpath.join(self.backups_dir, gitlab_backup_id + TAR_SUFFIX)

    def config_path(self, name: str) -> str:
        return posixpath.join(self.config_dir, name)


def version_command(opts: GitLabOptions) -> Command:
    return Command(("head", "-n", "1", opts.version_manifest))


def zstd_probe_command() -> Command:
    return Command(("sh", "-c", "command -v zstd"))


def list_backups_command(opts: GitLabOptions) -> Command:
    return Command(("ls", "-1A", "--", opts.backups_dir))


def create_command(opts: GitLabOptions, compress_cmd: str | None) -> Command:
    """`gitlab-backup create STRATEGY=copy CRON=1`, with COMPRESS_CMD placed before it when given."""
    create = (opts.gitlab_backup_cmd, "create", "STRATEGY=copy", "CRON=1")
    if compress_cmd:
        return Command(("env", f"COMPRESS_CMD={compress_cmd}", *create))
    return Command(create)


def checksum_command(path: str) -> Command:
    return Command(("sha256sum", "--", path))


def remove_command(path: str) -> Command:
    return Command(("rm", "-f", "--", path))


def parse_backup_id(output: str) -> str | None:
    """The backup id GitLab names in its output ("Creating backup archive: <id>_gitlab_backup.tar",
    "Backup <id> is done"), or None."""
    plain = _ANSI.sub("", output)
    for pattern in _ID_IN_OUTPUT:
        found = pattern.findall(plain)
        if found:
            return found[-1]
    return None


def backup_ids_in_listing(listing: str) -> set[str]:
    """Backup ids of the `<id>_gitlab_backup.tar` names in an `ls -1` output."""
    ids = set()
    for line in listing.splitlines():
        match = _TAR_NAME.match(line.strip())
        if match:
            ids.add(match.group(1))
    return ids


def find_backup_id(output: str, before: set[str], after: set[str], backups_dir: str) -> tuple[str, str]:
    """Return (id, how it was found). Prefer GitLab's own output; else the one new tar in the listing."""
    named = parse_backup_id(output)
    if named:
        if named not in after:
            raise GitLabBackupError(
                f"gitlab-backup reported backup {named} but {backups_dir} has no {named}{TAR_SUFFIX}; "
                f"is {OPTION_PREFIX}.backups_dir GitLab's backup_path (gitlab_rails['backup_path'])?"
            )
        return named, "output"
    new = sorted(after - before)
    if len(new) == 1:
        return new[0], "listing"
    if not new:
        raise GitLabBackupError(
            f"gitlab-backup create succeeded but its output names no backup and no new *{TAR_SUFFIX} "
            f"appeared in {backups_dir}; set {OPTION_PREFIX}.backups_dir to GitLab's "
            f"gitlab_rails['backup_path'] (or check that backup_upload_connection does not move it away)"
        )
    raise GitLabBackupError(
        f"several new backups appeared in {backups_dir} during our run ({', '.join(new)}): "
        f"another gitlab-backup ran at the same time, so ours cannot be told apart; rerun this task"
    )


def compression_details(compress_cmd: str | None) -> dict[str, str | None]:
    """What the manifest records about GitLab's internal compression (the restore needs DECOMPRESS_CMD)."""
    if compress_cmd:
        return {"method": "zstd", "COMPRESS_CMD": compress_cmd, "DECOMPRESS_CMD": ZSTD_DECOMPRESS_CMD}
    return {"method": "gzip", "COMPRESS_CMD": None, "DECOMPRESS_CMD": None}


def docker_url_from_connection(conn: Any, conn_id: str) -> str:
    """The Docker engine URL: the connection's host if it is a URL, else tcp://host:port."""
    host = (getattr(conn, "host", None) or "").strip()
    if not host:
        raise GitLabBackupError(
            f"connection {conn_id!r} has no host: set it to the Docker engine that runs GitLab, "
            f"e.g. unix:///var/run/docker.sock or tcp://gitlab-host:2376 (or set {OPTION_PREFIX}.docker_url)"
        )
    if "://" in host:
        return host
    return f"tcp://{host}:{getattr(conn, 'port', None) or DEFAULT_DOCKER_PORT}"


def runbook_command(
    *,
    exec_mode: ExecMode,
    prepared_dir: Path,
    gitlab_backup_id: str,
    expected_version: str,
    decompress_cmd: str | None,
    container: str = DEFAULT_CONTAINER,
    paths: Mapping[str, str] | None = None,
    dry_run: bool = False,
    script: Path = RESTORE_SCRIPT,
) -> tuple[str, ...]:
    """The `gitlab_restore.sh` argv that restores a prepared directory into GitLab.

    `paths` overrides the script's GitLab paths and commands (`backups_dir` → `--backups-dir`...).
    """
    argv = [str(script), "--mode", exec_mode]
    if exec_mode == "docker":
        argv += ["--container", container]
    argv += [
        "--from", str(prepared_dir),
        "--backup-id", gitlab_backup_id,
        "--expected-version", expected_version,
    ]
    if decompress_cmd:
        argv += ["--decompress-cmd", decompress_cmd]
    for key, value in sorted((paths or {}).items()):
        if key not in RUNBOOK_PATH_OPTIONS:
            raise GitLabRestoreError(f"unknown restore option {key!r} (known: {', '.join(RUNBOOK_PATH_OPTIONS)})")
        argv += [f"--{key.replace('_', '-')}", value]
    argv.append("--dry-run" if dry_run else "--yes")
    return tuple(argv)

