"""Where GitLab runs: commands and file reads on an Omnibus host or, through the Docker API, in its container.

`exec_mode: docker` runs commands with `docker exec` (`erp_backup.runner.DockerExecutor`)
and copies files with `APIClient.get_archive`, whose tar stream is unpacked on the fly
(`tarfile` mode `r|`), never held in memory. `exec_mode: local` runs the same commands
on this host.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import socket
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from erp_backup.runner import CHUNK, Command, CommandError, DockerExecutor, Executor, LocalExecutor, docker_api
from erp_backup.services.base import BackupContext, SourceUnavailable
from erp_backup.services.gitlab.commands import (
    OPTION_PREFIX,
    ZSTD_COMPRESS_CMD,
    GitLabBackupError,
    GitLabOptions,
    backup_ids_in_listing,
    checksum_command,
    docker_url_from_connection,
    list_backups_command,
    version_command,
    zstd_probe_command,
)

log = logging.getLogger(__name__)


class FileSource(Protocol):
    def chunks(self, path: str) -> Iterator[bytes]: ...


class LocalFiles:
    """Files on this host (Omnibus without Docker)."""

    def chunks(self, path: str) -> Iterator[bytes]:
        try:
            handle = open(path, "rb")  # noqa: SIM115  (closed by the `with` below; opened apart to name the error)
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

