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
GitLab host. It does not restore GitLab itself.

Real GitLab was not run while this module was written (no GitLab or Docker engine here):
the Docker API calls are tested at the boundary with a fake APIClient, and local mode
against a stand-in `gitlab-backup` (tests/fixtures/gitlab_standin/).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shlex
import shutil
import socket
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import zstandard

from erp_backup.checksum import entry_problem
from erp_backup.manifest import DIR_MODE, FILE_MODE, FileEntry, Manifest
from erp_backup.runner import CHUNK, Command, CommandError, DockerExecutor, Executor, LocalExecutor, docker_api
from erp_backup.services.base import BackupContext, BackupOutcome, SourceUnavailable
from erp_backup.sets import BackupSet
from erp_backup.stream import StreamResult, decompress_to, stream_to_file

log = logging.getLogger(__name__)

SUPPORTED_TYPES = frozenset({"full"})

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
RESTORE_SCRIPT = Path(__file__).resolve().parents[3] / "include" / "scripts" / "gitlab_restore.sh"

_BACKUP_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_TAR_NAME = re.compile(rf"^({_BACKUP_ID}){re.escape(TAR_SUFFIX)}$")
_ID_IN_OUTPUT = (
    re.compile(rf"Creating backup archive: ({_BACKUP_ID}){re.escape(TAR_SUFFIX)}"),
    re.compile(rf"Backup ({_BACKUP_ID}) is done"),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_INFO_VERSION = re.compile(r"^:?gitlab_version:\s*['\"]?([^'\"\s]+)", re.MULTILINE)
_VERSION_NUMBER = re.compile(r"\d+\.\d+\.\d+")

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


# --- commands: pure functions, asserted by the unit tests -------------------------------


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


# --- where GitLab runs -----------------------------------------------------------------


class FileSource(Protocol):
    def chunks(self, path: str) -> Iterator[bytes]: ...


class LocalFiles:
    """Files on this host (Omnibus without Docker)."""

    def chunks(self, path: str) -> Iterator[bytes]:
        try:
            handle = open(path, "rb")
        except OSError as exc:
            raise GitLabBackupError(
                f"cannot read {path}: {exc.strerror}; the Airflow worker's user needs read access to it"
            ) from exc
        with handle:
            while chunk := handle.read(CHUNK):
                yield chunk


class _ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (what tarfile's stream mode reads)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def untar_single_file(chunks: Iterable[bytes], path: str) -> Iterator[bytes]:
    """Yield the bytes of the one regular file in a tar stream (as `get_archive` returns it)."""
    with tarfile.open(fileobj=_ChunkReader(chunks), mode="r|") as archive:
        member = archive.next()
        if member is None:
            raise GitLabBackupError(f"the archive Docker returned for {path} is empty")
        if member.issym() or member.islnk():
            raise GitLabBackupError(
                f"{path} is a link to {member.linkname}; set {OPTION_PREFIX}.config_dir or "
                f".backups_dir to the real location"
            )
        if not member.isfile():
            raise GitLabBackupError(f"{path} is not a regular file in the container")
        body = archive.extractfile(member)
        assert body is not None
        copied = 0
        while chunk := body.read(CHUNK):
            copied += len(chunk)
            yield chunk
        if copied != member.size:
            raise GitLabBackupError(f"{path}: copied {copied} bytes but the archive declared {member.size}")
        extra = archive.next()
        if extra is not None:
            raise GitLabBackupError(f"the archive Docker returned for {path} holds more than one entry ({extra.name})")


class ContainerFiles:
    """Files inside a container, streamed out with the Docker API's `get_archive`."""

    def __init__(self, api: Any, container: str):
        self.api, self.container = api, container

    def chunks(self, path: str) -> Iterator[bytes]:
        stream, _stat = self.api.get_archive(self.container, path)
        yield from untar_single_file(stream, path)


@dataclass
class GitLabHost:
    executor: Executor
    files: FileSource
    source: dict[str, Any]

    def run(self, command: Command) -> str:
        return self.executor.run(command).decode(errors="replace")


def connect(ctx: BackupContext, opts: GitLabOptions, docker_client: Any | None = None) -> GitLabHost:
    """Where GitLab runs: through the Docker engine of the source connection, or this host."""
    conn_id = ctx.conn_id("source")
    if opts.exec_mode == "local":
        host = socket.gethostname()
        if shutil.which(opts.gitlab_backup_cmd) is None:
            raise SourceUnavailable(
                f"{opts.gitlab_backup_cmd} is not an executable on {host} (exec_mode local, connection "
                f"{conn_id!r}); install GitLab Omnibus here or set {OPTION_PREFIX}.exec_mode: docker"
            )
        return GitLabHost(
            LocalExecutor(), LocalFiles(), {"conn_id": conn_id, "exec_mode": "local", "host": host}
        )
    url = opts.docker_url or docker_url_from_connection(ctx.connection("source"), conn_id)
    if docker_client is None:
        try:
            docker_client = docker_api(base_url=url)
        except Exception as exc:
            raise SourceUnavailable(
                f"cannot reach the Docker engine {url} of connection {conn_id!r} "
                f"(GitLab container {opts.container}): {exc}"
            ) from exc
    executor = DockerExecutor(docker_client, opts.container, user=opts.exec_user)
    return GitLabHost(
        executor,
        ContainerFiles(docker_client, opts.container),
        {"conn_id": conn_id, "exec_mode": "docker", "host": url, "container": opts.container},
    )


def read_version(gitlab: GitLabHost, opts: GitLabOptions) -> str:
    """The first line of version-manifest.txt, e.g. "gitlab-ee 17.5.1". Also the reachability probe."""
    try:
        output = gitlab.run(version_command(opts))
    except CommandError as exc:
        raise GitLabBackupError(
            f"cannot read the GitLab version from {opts.version_manifest} ({gitlab.executor.where}): "
            f"{exc}; set {OPTION_PREFIX}.version_manifest"
        ) from exc
    except Exception as exc:
        if _is_unreachable(exc):
            raise SourceUnavailable(
                f"GitLab is unreachable through connection {gitlab.source['conn_id']!r} "
                f"(host {gitlab.source['host']}, container {gitlab.source.get('container', '-')}): {exc}"
            ) from exc
        raise
    version = output.strip().splitlines()[0].strip() if output.strip() else ""
    if not version:
        raise GitLabBackupError(f"{opts.version_manifest} is empty ({gitlab.executor.where})")
    return version


def _is_unreachable(exc: Exception) -> bool:
    """Docker said the container is missing or stopped, or the engine could not be reached."""
    import docker.errors
    import requests.exceptions

    if isinstance(exc, docker.errors.NotFound | requests.exceptions.ConnectionError | ConnectionError):
        return True
    return isinstance(exc, docker.errors.APIError) and exc.status_code in (404, 409)


def choose_compress_cmd(gitlab: GitLabHost, opts: GitLabOptions) -> str | None:
    """COMPRESS_CMD for gitlab-backup: zstd when GitLab has it (or is told to), else None (gzip)."""
    if opts.compression == "none":
        return None
    try:
        available = bool(gitlab.run(zstd_probe_command()).strip())
    except CommandError:
        available = False
    if available:
        return ZSTD_COMPRESS_CMD
    if opts.compression == "zstd":
        raise GitLabBackupError(
            f"{OPTION_PREFIX}.compression is zstd but zstd is not installed where GitLab runs "
            f"({gitlab.executor.where}); install it or set compression: auto"
        )
    log.info("zstd not found (%s): GitLab compresses with gzip", gitlab.executor.where)
    return None


def list_backup_ids(gitlab: GitLabHost, opts: GitLabOptions) -> set[str]:
    try:
        return backup_ids_in_listing(gitlab.run(list_backups_command(opts)))
    except CommandError as exc:
        raise GitLabBackupError(
            f"cannot list GitLab's backups directory {opts.backups_dir} ({gitlab.executor.where}): {exc}; "
            f"set {OPTION_PREFIX}.backups_dir"
        ) from exc


def remote_sha256(gitlab: GitLabHost, path: str) -> str:
    output = gitlab.run(checksum_command(path)).split()
    if not output or not re.fullmatch(r"[0-9a-f]{64}", output[0]):
        raise GitLabBackupError(f"sha256sum {path} ({gitlab.executor.where}) printed no checksum")
    return output[0]


# --- the verbs -------------------------------------------------------------------------


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

    tar_name = gitlab_backup_id + TAR_SUFFIX
    copied: dict[str, StreamResult] = {}
    try:
        copied[tar_name] = stream_to_file(gitlab.files.chunks(source_tar), ctx.set_dir, tar_name, compress=False)
        for name in CONFIG_FILES:
            relative = f"{CONFIG_SET_DIR}/{name}.zst"
            copied[relative] = stream_to_file(gitlab.files.chunks(opts.config_path(name)), ctx.set_dir, relative)
        if opts.verify_copy:
            ours, theirs = copied[tar_name].entry.sha256, remote_sha256(gitlab, source_tar)
            if ours != theirs:
                raise GitLabBackupError(
                    f"the copy of {source_tar} has SHA-256 {ours} but GitLab's file has {theirs}; "
                    f"GitLab's copy was kept"
                )
    except BaseException:
        log.error("copy of GitLab backup %s failed; %s was left in place (%s)", gitlab_backup_id, source_tar, gitlab.executor.where)
        raise

    removed = _remove_source_tar(gitlab, source_tar, opts.verify_copy)
    copy_seconds = sum(result.seconds for result in copied.values())
    files = [result.entry for result in copied.values()]
    return BackupOutcome(
        files=files,
        source={**gitlab.source, "gitlab_version": version},
        tools={"gitlab": version, "gitlab-backup": opts.gitlab_backup_cmd},
        details={
            "gitlab_version": version,
            "gitlab_version_source": f"first line of {opts.version_manifest}",
            "gitlab_backup_id": gitlab_backup_id,
            "gitlab_backup_id_found_by": found_by,
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
            "source_tar": source_tar,
            "source_tar_removed": removed,
            "copy_verified_against_source": opts.verify_copy,
            "measured": {
                "create_seconds": round(create_seconds, 3),
                "copy_seconds": round(copy_seconds, 3),
                "backup_tar_bytes": copied[tar_name].entry.size,
                "total_bytes": sum(entry.size for entry in files),
            },
            "restore_runbook": "include/scripts/gitlab_restore.sh",
        },
    )


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


def restore(set_dir: Path, manifest: Manifest, target: Path, **options: Any) -> dict[str, Any]:
    """Verify the set and place `<id>_gitlab_backup.tar`, gitlab-secrets.json and gitlab.rb in `target`.

    GitLab itself is NOT restored here: the report's `runbook_command` does that on the GitLab
    host. Options: `exec_mode` (docker|local, default: as backed up), `container`, and
    RUNBOOK_PATH_OPTIONS (`backups_dir`, `gitlab_ctl_cmd`...), passed through to the script.
    """
    unknown = sorted(set(options) - {"exec_mode", "container", *RUNBOOK_PATH_OPTIONS})
    if unknown:
        log.warning("gitlab restore ignores options it does not know: %s", ", ".join(unknown))
    started = time.monotonic()
    details = manifest.details
    try:
        gitlab_backup_id = details["gitlab_backup_id"]
        version = details["gitlab_version"]
        files = details["files"]
        compression = details["compression"]
    except KeyError as exc:
        raise GitLabRestoreError(f"backup {manifest.backup_id}: manifest details lack {exc.args[0]}") from None

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(target, DIR_MODE)
    tar_name = gitlab_backup_id + TAR_SUFFIX
    placed = {
        tar_name: _copy_verified(set_dir, manifest.file(files["backup_tar"]), target / tar_name, manifest),
    }
    for role, name in (("gitlab_secrets", SECRETS_NAME), ("gitlab_rb", CONFIG_NAME)):
        entry = manifest.file(files[role])
        _check_entry(set_dir, entry, manifest)
        destination = target / name
        destination.unlink(missing_ok=True)
        placed[name] = decompress_to(set_dir / entry.path, destination)

    exec_mode: ExecMode = options.get("exec_mode") or details.get("exec_mode") or "docker"
    if exec_mode not in ("docker", "local"):
        raise GitLabRestoreError(f"exec_mode must be docker or local, got {exec_mode!r}")
    container = options.get("container") or details.get("container") or DEFAULT_CONTAINER
    paths = {key: str(options[key]) for key in RUNBOOK_PATH_OPTIONS if options.get(key) is not None}
    command_args: dict[str, Any] = {
        "exec_mode": exec_mode,
        "prepared_dir": target,
        "gitlab_backup_id": gitlab_backup_id,
        "expected_version": version,
        "decompress_cmd": compression.get("DECOMPRESS_CMD"),
        "container": container,
        "paths": paths,
    }
    command = runbook_command(**command_args)
    dry_run = runbook_command(**command_args, dry_run=True)
    return {
        "service": "gitlab",
        "backup_id": manifest.backup_id,
        "restored": False,
        "status": "prepared: run runbook_command on the GitLab host to restore GitLab",
        "prepared_dir": str(target),
        "gitlab_backup_id": gitlab_backup_id,
        "gitlab_version": version,
        "compression": compression,
        "placed_bytes": placed,
        "checked": ["sha256 of every file against the manifest", "config files decompressed"],
        "runbook_command": list(command),
        "runbook_command_text": shlex.join(command),
        "runbook_dry_run_text": shlex.join(dry_run),
        "seconds": round(time.monotonic() - started, 3),
    }


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
