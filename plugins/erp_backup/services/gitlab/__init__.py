"""GitLab: `gitlab-backup create` in the `ops-gitlab` container (or an Omnibus host), copied out with its secrets.

Owns `backup_gitlab_full` (the seed's daily 04:00 full backup, kept 60 days):

1. read the GitLab version (first line of `/opt/gitlab/version-manifest.txt`; chosen over
   `gitlab-rake gitlab:env:info` because it needs no Rails boot and no database, and a
   restore needs exactly this version and edition);
2. check for zstd inside GitLab (`command -v zstd`) and, if present, run
   `env COMPRESS_CMD="zstd -T0" gitlab-backup create STRATEGY=copy CRON=1` (else GitLab's gzip);
3. find the backup id GitLab produced, from its output or by listing the backups directory
   before and after (`CRON=1` hides the progress output that names it);
4. stream `<id>_gitlab_backup.tar` (stored as-is: GitLab already compressed its parts) and
   `gitlab-secrets.json` / `gitlab.rb` (which the tar does not contain; zstd-compressed) into
   the set, hashing while streaming;
5. compare the copy's SHA-256 with `sha256sum` of the tar inside GitLab, and only then
   remove the tar there so GitLab's disk does not fill.

`exec_mode: docker` runs commands with `docker exec` through the Docker API
(`erp_backup.runner.DockerExecutor`) and copies files with `APIClient.get_archive`, whose
tar stream is unpacked on the fly (`tarfile` mode `r|`), never held in memory.
`exec_mode: local` runs the same commands on an Omnibus host without Docker.
Plan options (services.gitlab.options): exec_mode, container, backups_dir, config_dir,
version_manifest, gitlab_backup_cmd, compression (auto|zstd|none), exec_user, verify_copy,
docker_url (default: the source connection's host, the Docker engine running GitLab).

Restore is a runbook: `restore()` verifies the set and places the tar and config files in a
directory, then returns the exact `include/scripts/gitlab_restore.sh` command to run on the
GitLab host. It does not restore GitLab itself: its report says the set was *prepared*.

Modules: ``commands`` (options, argv, backup id discovery, the runbook command: pure),
``host`` (where GitLab runs: Docker API or this host), ``restore`` (restore and the drill's
checks). This module holds backup, verify and the contract's remaining verbs.

Real GitLab was not run while this module was written (no GitLab or Docker engine here):
the Docker API calls are tested at the boundary with a fake APIClient, and local mode
against a stand-in `gitlab-backup` (tests/fixtures/gitlab_standin/).
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zstandard

from erp_backup.manifest import Manifest
from erp_backup.services.base import BackupContext, BackupOutcome, CliTarget, ScratchSpec, TargetUsageError
from erp_backup.services.base import newest_set_at as sets_at
from erp_backup.services.base import no_after_prune as after_prune
from erp_backup.services.base import no_point_in_time as plan_point_in_time
from erp_backup.services.base import no_point_in_time_range as point_in_time_range
from erp_backup.services.base import no_protected_sets as protected_sets
from erp_backup.services.base import no_records as read_records
from erp_backup.services.base import no_restore_to_time as restore_to_time
from erp_backup.services.gitlab.commands import (
    BACKUP_INFORMATION,
    CONFIG_FILES,
    CONFIG_NAME,
    CONFIG_SET_DIR,
    MAX_CONFIG_BYTES,
    SECRETS_NAME,
    TAR_SUFFIX,
    GitLabBackupError,
    GitLabOptions,
    GitLabRestoreError,
    compression_details,
    create_command,
    find_backup_id,
    remove_command,
)
from erp_backup.services.gitlab.host import (
    GitLabHost,
    choose_compress_cmd,
    connect,
    list_backup_ids,
    read_version,
    remote_sha256,
)
from erp_backup.services.gitlab.restore import RESTORE_OPTIONS, check_restored, restore
from erp_backup.sets import BackupSet
from erp_backup.stream import StreamResult, stream_to_file

if TYPE_CHECKING:
    from erp_backup.scratch.base import TargetInfo

__all__ = [
    "CLEAR_DETAILS",
    "DEFAULT_PORTS",
    "DRILL_TYPES",
    "PITR_TYPES",
    "RESTORE_OPTIONS",
    "RESTORE_TYPES",
    "SUPPORTED_TYPES",
    "GitLabBackupError",
    "GitLabRestoreError",
    "after_prune",
    "backup",
    "check_restored",
    "plan_point_in_time", "point_in_time_range",
    "protected_sets",
    "read_records",
    "restore",
    "restore_to_time",
    "scratch_spec",
    "scratch_target",
    "sets_at",
    "source_size",
    "target_from_cli",
    "verify",
    "versions",
]

log = logging.getLogger(__name__)

SUPPORTED_TYPES = frozenset({"full"})
RESTORE_TYPES = frozenset({"full"})
DRILL_TYPES = frozenset({"full"})
PITR_TYPES: frozenset[str] = frozenset()
DEFAULT_PORTS = {"source": 443}
CLEAR_DETAILS = frozenset({"gitlab_version"})

_INFO_VERSION = re.compile(r"^:?gitlab_version:\s*['\"]?([^'\"\s]+)", re.MULTILINE)
_VERSION_NUMBER = re.compile(r"\d+\.\d+\.\d+")


# --- backup and verify -----------------------------------------------------------------


def backup(ctx: BackupContext, *, docker_client: Any | None = None) -> BackupOutcome:
    """Create a GitLab backup, copy it and its config files into the set, then remove GitLab's copy.

    `docker_client` replaces the APIClient built from the source connection (tests pass a fake).
    """
    opts = GitLabOptions.from_plan(ctx.options)
    gitlab = connect(ctx, opts, docker_client)
    version = read_version(gitlab, opts)
    compress_cmd = choose_compress_cmd(gitlab, opts)

    before = list_backup_ids(gitlab, opts)
    started = time.monotonic()
    output = gitlab.run(create_command(opts, compress_cmd))
    create_seconds = time.monotonic() - started
    after = list_backup_ids(gitlab, opts)
    gitlab_backup_id, found_by = find_backup_id(output, before, after, opts.backups_dir)
    source_tar = opts.tar_path(gitlab_backup_id)
    log.info("GitLab %s wrote backup %s in %.1f s (found by %s)", version, gitlab_backup_id, create_seconds, found_by)

    copied = _copy_into_set(gitlab, opts, ctx.set_dir, gitlab_backup_id)
    removed = _remove_source_tar(gitlab, source_tar, opts.verify_copy)
    details = _backup_details(opts, version, gitlab_backup_id, compress_cmd, copied)
    details.update(gitlab_backup_id_found_by=found_by, source_tar_removed=removed)
    details["measured"]["create_seconds"] = round(create_seconds, 3)
    return BackupOutcome(
        files=[result.entry for result in copied.values()],
        source={**gitlab.source, "gitlab_version": version},
        tools={"gitlab": version, "gitlab-backup": opts.gitlab_backup_cmd},
        details=details,
    )


def _copy_into_set(gitlab: GitLabHost, opts: GitLabOptions, set_dir: Path, gitlab_backup_id: str) -> dict[str, StreamResult]:
    """Stream the tar (as is) and the config files (zstd) into the set; check the tar against GitLab's."""
    source_tar = opts.tar_path(gitlab_backup_id)
    tar_name = gitlab_backup_id + TAR_SUFFIX
    copied: dict[str, StreamResult] = {}
    try:
        copied[tar_name] = stream_to_file(gitlab.files.chunks(source_tar), set_dir, tar_name, compress=False)
        for name in CONFIG_FILES:
            relative = f"{CONFIG_SET_DIR}/{name}.zst"
            copied[relative] = stream_to_file(gitlab.files.chunks(opts.config_path(name)), set_dir, relative)
        if opts.verify_copy:
            ours, theirs = copied[tar_name].clear_sha256, remote_sha256(gitlab, source_tar)
            if ours != theirs:
                raise GitLabBackupError(
                    f"the copy of {source_tar} has SHA-256 {ours} but GitLab's file has {theirs}; "
                    f"GitLab's copy was kept"
                )
    except BaseException:
        log.error("copy of GitLab backup %s failed; %s was left in place (%s)", gitlab_backup_id, source_tar, gitlab.executor.where)
        raise
    return copied


def _backup_details(opts: GitLabOptions, version: str, gitlab_backup_id: str, compress_cmd: str | None,
                    copied: Mapping[str, StreamResult]) -> dict[str, Any]:
    tar_name = gitlab_backup_id + TAR_SUFFIX
    return {
        "gitlab_version": version,
        "gitlab_version_source": f"first line of {opts.version_manifest}",
        "gitlab_backup_id": gitlab_backup_id,
        "strategy": "copy",
        "compression": compression_details(compress_cmd),
        "files": {
            "backup_tar": tar_name,
            "gitlab_secrets": f"{CONFIG_SET_DIR}/{SECRETS_NAME}.zst",
            "gitlab_rb": f"{CONFIG_SET_DIR}/{CONFIG_NAME}.zst",
        },
        "stored_compression": {tar_name: "none", **{f"{CONFIG_SET_DIR}/{n}.zst": "zstd" for n in CONFIG_FILES}},
        "exec_mode": opts.exec_mode,
        "container": opts.container if opts.exec_mode == "docker" else None,
        "source_tar": opts.tar_path(gitlab_backup_id),
        "copy_verified_against_source": opts.verify_copy,
        "measured": {
            "copy_seconds": round(sum(result.seconds for result in copied.values()), 3),
            "backup_tar_bytes": copied[tar_name].entry.size,
            "total_bytes": sum(result.entry.size for result in copied.values()),
        },
        "restore_runbook": "include/scripts/gitlab_restore.sh",
    }


def _remove_source_tar(gitlab: GitLabHost, path: str, verified: bool) -> bool:
    """Remove GitLab's tar after our copy is safe. A failure is logged, not fatal: the set is good."""
    try:
        gitlab.run(remove_command(path))
    except Exception as exc:
        log.warning("could not remove %s (%s): %s; remove it by hand or GitLab's disk fills", path, gitlab.executor.where, exc)
        return False
    check = " and its SHA-256 matched" if verified else ""
    log.info("removed %s (%s): it was copied into the backup set%s", path, gitlab.executor.where, check)
    return True


def verify(backup_set: BackupSet, manifest: Manifest) -> list[str]:
    """GitLab checks beyond the SHA-256s: the tar holds GitLab's backup_information.yml for the
    recorded version, and the secrets file decompresses to JSON holding the Rails keys."""
    return [f"backup {backup_set.key}: {problem}" for problem in _problems(backup_set.path, manifest)]


def _problems(set_dir: Path, manifest: Manifest) -> list[str]:
    details = manifest.details
    missing = [key for key in ("gitlab_version", "gitlab_backup_id", "files", "compression") if not details.get(key)]
    if missing:
        return [f"manifest details lack {key}" for key in missing]
    listed = {entry.path for entry in manifest.files}
    problems = []
    for role in ("backup_tar", "gitlab_secrets", "gitlab_rb"):
        relative = details["files"].get(role)
        if not relative or relative not in listed:
            problems.append(f"the {role} file {relative} is not in the manifest")
        elif not (set_dir / relative).is_file():
            problems.append(f"{relative} is missing")
    if problems:
        return problems
    problems += _check_backup_tar(set_dir / details["files"]["backup_tar"], details["gitlab_version"])
    problems += _check_secrets(set_dir / details["files"]["gitlab_secrets"])
    try:
        _read_zst(set_dir / details["files"]["gitlab_rb"])
    except (zstandard.ZstdError, GitLabRestoreError) as exc:
        problems.append(f"{details['files']['gitlab_rb']}: does not decompress: {exc}")
    return problems


def _check_backup_tar(path: Path, recorded_version: str) -> list[str]:
    try:
        with tarfile.open(path, mode="r:") as archive:
            info_member = None
            for member in archive:
                if posixpath.normpath(member.name) == BACKUP_INFORMATION:
                    info_member = member
            if info_member is None:
                return [f"{path.name}: no {BACKUP_INFORMATION}, not a GitLab backup archive"]
            handle = archive.extractfile(info_member)
            info = handle.read(1 << 20).decode(errors="replace") if handle else ""
    except (tarfile.TarError, OSError) as exc:
        return [f"{path.name}: not a readable tar archive: {exc}"]
    found = _INFO_VERSION.search(info)
    wanted = _VERSION_NUMBER.search(recorded_version)
    if found and wanted and not found.group(1).startswith(wanted.group(0)):
        return [f"{path.name}: made by GitLab {found.group(1)} but the manifest records {recorded_version!r}"]
    return []


def _check_secrets(path: Path) -> list[str]:
    try:
        secrets = json.loads(_read_zst(path))
    except (zstandard.ZstdError, GitLabRestoreError) as exc:
        return [f"{path.name}: does not decompress: {exc}"]
    except ValueError:
        return [f"{path.name}: is not JSON"]
    rails = secrets.get("gitlab_rails") if isinstance(secrets, dict) else None
    if not isinstance(rails, dict) or not rails.get("db_key_base"):
        return [f"{path.name}: has no gitlab_rails.db_key_base; encrypted data could not be read after a restore"]
    return []


def _read_zst(path: Path) -> bytes:
    with open(path, "rb") as handle:
        reader = zstandard.ZstdDecompressor().stream_reader(handle)
        data = reader.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise GitLabRestoreError(f"{path.name}: larger than {MAX_CONFIG_BYTES} bytes, not a GitLab config file")
    return data


# --- targets, versions, sizes ----------------------------------------------------------

TARGET_HELP = "a directory to place the GitLab backup tar and config files in, for the runbook"


def target_from_cli(backup_type: str, target: str | None, target_conn: str | None,
                    get_connection: Callable[[str], Any]) -> CliTarget:
    """A directory: the set is prepared there, and GitLab is restored from it by the runbook."""
    if target_conn:
        raise TargetUsageError(f"gitlab restores prepare files for the runbook, not a connection: give --target: "
                               f"{TARGET_HELP}")
    if not target:
        raise TargetUsageError(f"gitlab restores need --target: {TARGET_HELP}")
    path = Path(target).absolute()
    if path.exists() and not path.is_dir():
        raise TargetUsageError(f"--target {path} exists and is not a directory ({TARGET_HELP})")
    return CliTarget(target=path, description=f"directory {path} (prepared for the runbook, GitLab not restored)")


def scratch_spec(backup_type: str, versions: Mapping[str, Any], *, pitr: bool = False) -> ScratchSpec:
    """A directory: the drill prepares the files and checks them; no GitLab runs here."""
    return ScratchSpec("directory", None)


def scratch_target(info: TargetInfo) -> Path:
    if not info.uri:
        raise ValueError(f"gitlab scratch target has no directory (uri): {info.describe()}")
    return Path(info.uri)


def versions(manifest: Manifest) -> dict[str, Any]:
    """The GitLab version and edition the set was made by (a restore needs exactly this one)."""
    version = manifest.details.get("gitlab_version") or manifest.tools.get("gitlab")
    return {"gitlab": version} if version else {}


def source_size(manifest: Manifest) -> int | None:
    """The size of the tar GitLab wrote (stored as is in the set)."""
    value = (manifest.details.get("measured") or {}).get("backup_tar_bytes")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
