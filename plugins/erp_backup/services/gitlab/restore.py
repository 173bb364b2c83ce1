"""GitLab restore: the set's tar and config files *prepared* in a directory for the runbook; the drill's checks.

GitLab itself is not restored here (no GitLab runs where Airflow does): the report's
``details.runbook_command`` restores it on the GitLab host, and the report says the set
was prepared, not restored. A dry run writes nothing and lists what it would prepare.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erp_backup.checksum import entry_problem
from erp_backup.manifest import DIR_MODE, FILE_MODE, FileEntry, Manifest, sha256_file
from erp_backup.runner import CHUNK
from erp_backup.services.base import CheckContext, Checks, RestoreReport
from erp_backup.services.gitlab.commands import (
    CONFIG_NAME,
    DEFAULT_CONTAINER,
    RUNBOOK_PATH_OPTIONS,
    SECRETS_NAME,
    TAR_SUFFIX,
    GitLabRestoreError,
    runbook_command,
)
from erp_backup.stream import decompress_to

log = logging.getLogger(__name__)

RESTORE_OPTIONS = frozenset({"exec_mode", "container", *RUNBOOK_PATH_OPTIONS})
CONFIG_ROLES = (("gitlab_secrets", SECRETS_NAME), ("gitlab_rb", CONFIG_NAME))
PREPARED_STATUS = "prepared: run runbook_command on the GitLab host to restore GitLab"


@dataclass(frozen=True)
class Recorded:
    """What a restore needs from the manifest's details."""

    gitlab_backup_id: str
    version: str
    files: Mapping[str, str]
    compression: Mapping[str, Any]

    @property
    def tar_name(self) -> str:
        return self.gitlab_backup_id + TAR_SUFFIX

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Recorded:
        details = manifest.details
        try:
            return cls(details["gitlab_backup_id"], details["gitlab_version"], details["files"],
                       details["compression"])
        except KeyError as exc:
            raise GitLabRestoreError(f"backup {manifest.backup_id}: manifest details lack {exc.args[0]}") from None


def _restore_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    given = dict(options or {})
    unknown = sorted(set(given) - RESTORE_OPTIONS)
    if unknown:
        raise ValueError(f"gitlab restore: unknown option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(RESTORE_OPTIONS))})")
    return given


def _runbook(recorded: Recorded, manifest: Manifest, target: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """The runbook command that restores `target` into GitLab (and its dry run), as argv and text."""
    exec_mode = options.get("exec_mode") or manifest.details.get("exec_mode") or "docker"
    if exec_mode not in ("docker", "local"):
        raise GitLabRestoreError(f"exec_mode must be docker or local, got {exec_mode!r}")
    command_args: dict[str, Any] = {
        "exec_mode": exec_mode,
        "prepared_dir": target,
        "gitlab_backup_id": recorded.gitlab_backup_id,
        "expected_version": recorded.version,
        "decompress_cmd": recorded.compression.get("DECOMPRESS_CMD"),
        "container": options.get("container") or manifest.details.get("container") or DEFAULT_CONTAINER,
        "paths": {key: str(options[key]) for key in RUNBOOK_PATH_OPTIONS if options.get(key) is not None},
    }
    command = runbook_command(**command_args)
    return {"runbook_command": list(command), "runbook_command_text": shlex.join(command),
            "runbook_dry_run_text": shlex.join(runbook_command(**command_args, dry_run=True))}


def _stored(set_dir: Path, manifest: Manifest, relative: str) -> FileEntry:
    entry = manifest.file(relative)
    if not (set_dir / entry.path).is_file():
        raise GitLabRestoreError(f"backup {manifest.backup_id}: {entry.path} is missing from {set_dir}")
    return entry


def _planned(set_dir: Path, manifest: Manifest, target: Path, recorded: Recorded) -> list[str]:
    """What a restore would prepare. Checks that the set's files are there; reads none of them."""
    tar = _stored(set_dir, manifest, recorded.files["backup_tar"])
    actions = [] if target.is_dir() else [f"create {target} (mode 0700)"]
    actions.append(f"copy {tar.path} ({tar.size} bytes) to {target / recorded.tar_name} (mode 0600), "
                   "checking its SHA-256 against the manifest")
    for role, name in CONFIG_ROLES:
        entry = _stored(set_dir, manifest, recorded.files[role])
        actions.append(f"check {entry.path} against the manifest and decompress it to {target / name}")
    return actions


def _check_entry(set_dir: Path, entry: FileEntry, manifest: Manifest) -> None:
    problem = entry_problem(set_dir, entry)
    if problem:
        raise GitLabRestoreError(
            f"backup {manifest.backup_id}: {entry.path} does not match the manifest ({problem}); use another backup"
        )


def _copy_verified(set_dir: Path, entry: FileEntry, destination: Path, manifest: Manifest) -> int:
    """Copy a set file to `destination` (0600), hashing while copying; fail if it differs from the manifest."""
    source = set_dir / entry.path
    if not source.is_file():
        raise GitLabRestoreError(f"backup {manifest.backup_id}: {entry.path} is missing from {set_dir}")
    destination.unlink(missing_ok=True)
    digest, size = hashlib.sha256(), 0
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        if (size, digest.hexdigest()) != (entry.size, entry.sha256):
            raise GitLabRestoreError(
                f"backup {manifest.backup_id}: {entry.path} does not match the manifest "
                f"(size {size} vs {entry.size}, sha256 {digest.hexdigest()} vs {entry.sha256}); use another backup"
            )
    except BaseException:
        destination.unlink(missing_ok=True)
        raise
    return size


def _place(set_dir: Path, manifest: Manifest, target: Path, recorded: Recorded) -> dict[str, int]:
    """Copy the tar and decompress the config files into `target`, each checked against the manifest."""
    target.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(target, DIR_MODE)
    tar = manifest.file(recorded.files["backup_tar"])
    placed = {recorded.tar_name: _copy_verified(set_dir, tar, target / recorded.tar_name, manifest)}
    for role, name in CONFIG_ROLES:
        entry = manifest.file(recorded.files[role])
        _check_entry(set_dir, entry, manifest)
        destination = target / name
        destination.unlink(missing_ok=True)
        placed[name] = decompress_to(set_dir / entry.path, destination)
    return placed


def restore(set_dir: Path, manifest: Manifest, target: Any, *, dry_run: bool = False,
            options: Mapping[str, Any] | None = None) -> RestoreReport:
    """Verify the set and prepare `<id>_gitlab_backup.tar`, gitlab-secrets.json and gitlab.rb in `target`.

    GitLab itself is NOT restored here: the report's `details.runbook_command` does that on the
    GitLab host. Options: `exec_mode` (docker|local, default: as backed up), `container`, and
    RUNBOOK_PATH_OPTIONS (`backups_dir`, `gitlab_ctl_cmd`...), passed through to the script.
    A file of the set that differs from the manifest raises GitLabRestoreError: use another backup.
    """
    settings = _restore_options(options)
    started = time.monotonic()
    set_dir, target = Path(set_dir), Path(target)
    recorded = Recorded.from_manifest(manifest)
    runbook = _runbook(recorded, manifest, target, settings)
    details: dict[str, Any] = {
        "service": "gitlab", "backup_id": manifest.backup_id, "restored": False, "prepared_dir": str(target),
        "gitlab_backup_id": recorded.gitlab_backup_id, "gitlab_version": recorded.version,
        "compression": dict(recorded.compression), **runbook,
    }
    not_restored = f"GitLab itself is not restored here: run on the GitLab host: {runbook['runbook_command_text']}"
    if dry_run:
        details["status"] = "dry run: nothing was prepared"
        return RestoreReport(dry_run=True, prepared_only=True, actions=[*_planned(set_dir, manifest, target, recorded), not_restored],
                             details=details)
    placed = _place(set_dir, manifest, target, recorded)
    details.update(status=PREPARED_STATUS, placed_bytes=placed, seconds=round(time.monotonic() - started, 3))
    log.info("prepared GitLab backup %s in %s; restore it on the GitLab host with: %s", recorded.gitlab_backup_id,
             target, runbook["runbook_command_text"])
    return RestoreReport(
        restored_bytes=sum(placed.values()),
        prepared_only=True,
        checks=[f"{recorded.tar_name}: {placed[recorded.tar_name]} bytes, SHA-256 matches the manifest",
                f"{SECRETS_NAME} and {CONFIG_NAME}: SHA-256 of the stored files match the manifest, decompressed"],
        actions=[f"prepared (not restored) {', '.join(placed)} in {target}", not_restored],
        details=details,
    )


def _check_prepared_tar(prepared: Path, manifest: Manifest, found: Checks) -> None:
    files = manifest.details.get("files") or {}
    if not files.get("backup_tar"):
        return
    tar_entry = manifest.file(files["backup_tar"])
    tar_name = f"{manifest.details.get('gitlab_backup_id')}{TAR_SUFFIX}"
    path = prepared / tar_name
    if not path.is_file():
        found.problems.append(f"{tar_name} was not prepared in {prepared}")
        return
    size, digest = sha256_file(path)
    if (size, digest) != (tar_entry.size, tar_entry.sha256):
        found.problems.append(f"prepared {tar_name} differs from the manifest's {tar_entry.path}")
    else:
        found.checks.append(f"{tar_name}: {size} bytes, SHA-256 matches the manifest")


def _check_prepared_secrets(prepared: Path, found: Checks) -> None:
    try:
        secrets = json.loads((prepared / SECRETS_NAME).read_text())
    except (OSError, ValueError) as exc:
        found.problems.append(f"prepared {SECRETS_NAME} is unreadable: {exc}")
        return
    if not isinstance(secrets, dict) or not (secrets.get("gitlab_rails") or {}).get("db_key_base"):
        found.problems.append(f"prepared {SECRETS_NAME} has no gitlab_rails.db_key_base")
    else:
        found.checks.append(f"{SECRETS_NAME} parses and holds gitlab_rails.db_key_base")


def check_restored(target: Any, set_dir: Path, manifest: Manifest, report: RestoreReport,
                   ctx: CheckContext) -> Checks:
    """The drill's check of the prepared directory. GitLab itself was not restored, and the checks say so."""
    found = Checks()
    _check_prepared_tar(Path(target), manifest, found)
    _check_prepared_secrets(Path(target), found)
    runbook = report.details.get("runbook_command_text")
    found.checks.append("GitLab itself was not restored (no GitLab here): "
                        + (f"run on the GitLab host: {runbook}" if runbook else "its files were prepared only"))
    return found
