"""GitLab in Docker: the Docker API calls made, checked against a fake APIClient.

No Docker engine runs here. `FakeDockerAPI` stands in for `docker.APIClient` (the engine,
an external system) with one GitLab container: it answers `exec_create/exec_start/exec_inspect`
for the commands the module runs and `get_archive` with a real tar stream, and records every call.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import zstandard
from airflow.sdk import Connection

from erp_backup.manifest import Manifest, write_manifest
from erp_backup.plan import BackupJob
from erp_backup.runner import CommandError
from erp_backup.services import gitlab
from erp_backup.services.base import BackupContext, SourceUnavailable
from tests.fixtures.factories import make_backup_context, make_manifest

CONTAINER = "ops-gitlab"
ENGINE = "unix:///var/run/docker.sock"
GITLAB_ID = "1795665600_2026_11_26_17.5.1-ee"
TAR = f"/var/opt/gitlab/backups/{GITLAB_ID}_gitlab_backup.tar"
SECRETS = "/etc/gitlab/gitlab-secrets.json"
GITLAB_RB = "/etc/gitlab/gitlab.rb"
VERSION = "gitlab-ee 17.5.1-ee"
SECRETS_JSON = json.dumps({"gitlab_rails": {"db_key_base": "fake-key", "secret_key_base": "fake"}}).encode()
CHUNK = 64 * 1024


def gitlab_backup_tar(version: str = "17.5.1-ee", with_info: bool = True) -> bytes:
    """A small archive laid out like GitLab's: backup_information.yml plus compressed parts."""
    buffer = io.BytesIO()
    parts = {"db/database.sql.gz": b"\x1f\x8b fake dump", "repositories.tar.gz": b"\x1f\x8b fake repos"}
    if with_info:
        parts["backup_information.yml"] = f"---\n:gitlab_version: {version}\n:installation_type: omnibus\n".encode()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in parts.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@dataclass
class BigFile:
    """File content made on demand, so a large file never sits in the fake's memory either."""

    size: int

    def chunks(self) -> Iterator[bytes]:
        block = hashlib.sha256(b"seed").digest() * (CHUNK // 32)
        for offset in range(0, self.size, CHUNK):
            yield block[: min(CHUNK, self.size - offset)]


def content_chunks(content: bytes | BigFile) -> Iterator[bytes]:
    if isinstance(content, BigFile):
        yield from content.chunks()
    else:
        for offset in range(0, len(content), CHUNK):
            yield content[offset:offset + CHUNK]


def size_of(content: bytes | BigFile) -> int:
    return content.size if isinstance(content, BigFile) else len(content)


def tar_stream(name: str, content: bytes | BigFile) -> Iterator[bytes]:
    """What the engine's archive endpoint sends: one tar member, streamed in chunks."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = size_of(content), 0o600
    yield info.tobuf(format=tarfile.PAX_FORMAT)
    yield from content_chunks(content)
    yield b"\0" * ((-info.size) % 512) + b"\0" * 1024


class FakeDockerAPI:
    """A fake docker.APIClient with one GitLab container (the engine is an external system)."""

    def __init__(self, zstd: bool = True, backup_content: bytes | BigFile | None = None):
        self.files: dict[str, bytes | BigFile] = {
            "/opt/gitlab/version-manifest.txt": f"{VERSION}\ngitlab-rails v17.5.1-ee\n".encode(),
            SECRETS: SECRETS_JSON,
            GITLAB_RB: b"external_url 'https://gitlab.erp.example'\n",
            "/var/opt/gitlab/backups/1700000000_2023_11_14_16.5.0_gitlab_backup.tar": b"an older backup",
        }
        self.zstd = zstd
        self.backup_content = backup_content if backup_content is not None else gitlab_backup_tar()
        self.create_output = b""  # CRON=1: GitLab prints no progress
        self.create_fails = False
        self.rm_fails = False
        self.sha_override: str | None = None
        self.archive_breaks: dict[str, int] = {}  # path -> fail after this many chunks
        self.calls: list[tuple[Any, ...]] = []
        self._execs: dict[str, dict[str, Any]] = {}

    # docker.APIClient methods used by DockerExecutor and ContainerFiles
    def exec_create(self, container, cmd, stdout=True, stderr=True, stdin=False, tty=False, privileged=False,
                    user="", environment=None, workdir=None, detach_keys=None):
        if container != CONTAINER:
            raise docker.errors.NotFound(f"No such container: {container}")
        exec_id = f"exec{len(self._execs)}"
        self._execs[exec_id] = {"cmd": tuple(cmd)}
        self.calls.append(("exec", tuple(cmd), dict(environment or {}), user))
        return {"Id": exec_id}

    def exec_start(self, exec_id, detach=False, tty=False, stream=False, socket=False, demux=False):
        assert demux and not stream
        out, err, code = self._run(self._execs[exec_id]["cmd"])
        self._execs[exec_id]["code"] = code
        return (out or None, err or None)

    def exec_inspect(self, exec_id):
        return {"ExitCode": self._execs[exec_id]["code"], "Running": False}

    def get_archive(self, container, path, chunk_size=2097152, encode_stream=False):
        self.calls.append(("get_archive", path))
        if path not in self.files:
            raise docker.errors.NotFound(f"Could not find the file {path} in container {container}")
        content = self.files[path]
        stream = tar_stream(path.rsplit("/", 1)[-1], content)
        if path in self.archive_breaks:
            stream = self._breaking(stream, self.archive_breaks[path])
        stat = {"name": path.rsplit("/", 1)[-1], "size": size_of(content), "mode": 0o600, "linkTarget": ""}
        return stream, stat

    @staticmethod
    def _breaking(stream: Iterator[bytes], after: int) -> Iterator[bytes]:
        for index, chunk in enumerate(stream):
            if index == after:
                raise ConnectionError("connection reset by the Docker engine")
            yield chunk

    def _run(self, argv: tuple[str, ...]) -> tuple[bytes, bytes, int]:
        if argv[:3] == ("head", "-n", "1"):
            content = self.files.get(argv[3])
            return (bytes(content).splitlines(keepends=True)[0], b"", 0) if content else (b"", b"no such file", 1)
        if argv == ("sh", "-c", "command -v zstd"):
            return (b"/usr/bin/zstd\n", b"", 0) if self.zstd else (b"", b"", 1)
        if argv[:3] == ("ls", "-1A", "--"):
            prefix = argv[3].rstrip("/") + "/"
            names = [p[len(prefix):] for p in self.files if p.startswith(prefix)]
            return ("".join(f"{n}\n" for n in sorted(names)).encode(), b"", 0)
        if "gitlab-backup" in argv and "create" in argv:
            if self.create_fails:
                return (b"", b"pg_dump: error: connection to server failed\n", 1)
            self.files[TAR] = self.backup_content
            return (self.create_output, b"", 0)
        if argv[:2] == ("sha256sum", "--"):
            digest = hashlib.sha256()
            for chunk in content_chunks(self.files[argv[2]]):
                digest.update(chunk)
            return (f"{self.sha_override or digest.hexdigest()}  {argv[2]}\n".encode(), b"", 0)
        if argv[:3] == ("rm", "-f", "--"):
            if self.rm_fails:
                return (b"", b"rm: cannot remove: Read-only file system\n", 1)
            self.files.pop(argv[3], None)
            return (b"", b"", 0)
        return (b"", f"{argv[0]}: command not found\n".encode(), 127)

    def execs(self) -> list[tuple[str, ...]]:
        return [call[1] for call in self.calls if call[0] == "exec"]

    def archives(self) -> list[str]:
        return [call[1] for call in self.calls if call[0] == "get_archive"]


def make_context(root: Path, **options: Any) -> BackupContext:
    job = BackupJob(
        service="gitlab", backup_type="full", schedule="0 4 * * *", timezone="Asia/Seoul",
        retention=timedelta(days=60), method="gitlab_backup", rpo=timedelta(hours=24), rto=timedelta(hours=2),
        connections={"source": "ops_gitlab"}, enabled=True,
        options={"exec_mode": "docker", "container": CONTAINER, **options},
    )
    conn = Connection(conn_id="ops_gitlab", conn_type="docker", host=ENGINE)
    return make_backup_context(root, job=job, moment=datetime(2026, 11, 25, 19, tzinfo=timezone.utc), connection=conn)


def write_set_manifest(ctx: BackupContext, outcome: Any) -> Manifest:
    manifest = make_manifest(context=ctx, outcome=outcome, captured_started_at=ctx.run.run_after)
    write_manifest(ctx.set_dir, manifest)
    return manifest


def test_backup_runs_gitlab_backup_with_zstd_then_copies_and_removes(tmp_path):
    api = FakeDockerAPI(zstd=True)
    ctx = make_context(tmp_path)
    backup_tar = api.backup_content

    outcome = gitlab.backup(ctx, docker_client=api)

    assert api.execs() == [
        ("head", "-n", "1", "/opt/gitlab/version-manifest.txt"),
        ("sh", "-c", "command -v zstd"),
        ("ls", "-1A", "--", "/var/opt/gitlab/backups"),
        ("env", "COMPRESS_CMD=zstd -T0", "gitlab-backup", "create", "STRATEGY=copy", "CRON=1"),
        ("ls", "-1A", "--", "/var/opt/gitlab/backups"),
        ("sha256sum", "--", TAR),
        ("rm", "-f", "--", TAR),
    ]
    assert all(call[2] == {} and call[3] == "" for call in api.calls if call[0] == "exec")
    assert api.archives() == [TAR, SECRETS, GITLAB_RB]
    assert api.calls[-1] == ("exec", ("rm", "-f", "--", TAR), {}, ""), "removal only after every copy"
    assert TAR not in api.files

    tar_name = f"{GITLAB_ID}_gitlab_backup.tar"
    assert (ctx.set_dir / tar_name).read_bytes() == backup_tar
    secrets = zstandard.ZstdDecompressor().decompressobj().decompress((ctx.set_dir / "config/gitlab-secrets.json.zst").read_bytes())
    assert secrets == SECRETS_JSON
    assert [entry.path for entry in outcome.files] == [tar_name, "config/gitlab-secrets.json.zst", "config/gitlab.rb.zst"]
    assert outcome.files[0].sha256 == hashlib.sha256(backup_tar).hexdigest()
    details = outcome.details
    assert details["gitlab_version"] == VERSION
    assert details["gitlab_backup_id"] == GITLAB_ID and details["gitlab_backup_id_found_by"] == "listing"
    assert details["compression"] == {"method": "zstd", "COMPRESS_CMD": "zstd -T0", "DECOMPRESS_CMD": "zstd -d"}
    assert details["source_tar_removed"] is True
    assert outcome.source == {
        "conn_id": "ops_gitlab", "exec_mode": "docker", "host": ENGINE, "container": CONTAINER, "gitlab_version": VERSION,
    }
    manifest = write_set_manifest(ctx, outcome)
    assert "fake-key" not in manifest.to_json()
    assert gitlab.verify(ctx.backup_set, manifest) == []


def test_without_zstd_gitlab_uses_its_gzip_and_restore_needs_no_decompress_cmd(tmp_path):
    api = FakeDockerAPI(zstd=False)
    outcome = gitlab.backup(make_context(tmp_path), docker_client=api)
    assert ("gitlab-backup", "create", "STRATEGY=copy", "CRON=1") in api.execs()
    assert outcome.details["compression"] == {"method": "gzip", "COMPRESS_CMD": None, "DECOMPRESS_CMD": None}


def test_compression_none_skips_the_probe_and_zstd_required_fails_without_it(tmp_path):
    api = FakeDockerAPI(zstd=True)
    gitlab.backup(make_context(tmp_path / "a", compression="none"), docker_client=api)
    assert ("sh", "-c", "command -v zstd") not in api.execs()
    with pytest.raises(gitlab.GitLabBackupError, match="compression is zstd but zstd is not installed"):
        gitlab.backup(make_context(tmp_path / "b", compression="zstd"), docker_client=FakeDockerAPI(zstd=False))


def test_backup_id_from_gitlab_output(tmp_path):
    api = FakeDockerAPI()
    api.create_output = f"Creating backup archive: {GITLAB_ID}_gitlab_backup.tar ... done\nBackup {GITLAB_ID} is done.\n".encode()
    outcome = gitlab.backup(make_context(tmp_path), docker_client=api)
    assert outcome.details["gitlab_backup_id_found_by"] == "output"
    assert outcome.details["gitlab_backup_id"] == GITLAB_ID


@pytest.mark.parametrize("broken", [TAR, SECRETS, GITLAB_RB])
def test_a_failed_copy_never_removes_gitlabs_tar(tmp_path, broken):
    api = FakeDockerAPI()
    api.archive_breaks[broken] = 1
    ctx = make_context(tmp_path)
    with pytest.raises(ConnectionError):
        gitlab.backup(ctx, docker_client=api)
    assert not any(argv[0] == "rm" for argv in api.execs())
    assert TAR in api.files
    partial = {TAR: f"{GITLAB_ID}_gitlab_backup.tar", SECRETS: "config/gitlab-secrets.json.zst", GITLAB_RB: "config/gitlab.rb.zst"}
    assert not (ctx.set_dir / partial[broken]).exists()


def test_missing_config_file_fails_before_removal(tmp_path):
    api = FakeDockerAPI()
    del api.files[SECRETS]
    with pytest.raises(docker.errors.NotFound, match="gitlab-secrets.json"):
        gitlab.backup(make_context(tmp_path), docker_client=api)
    assert not any(argv[0] == "rm" for argv in api.execs())


def test_checksum_mismatch_with_gitlabs_file_keeps_it(tmp_path):
    api = FakeDockerAPI()
    api.sha_override = "0" * 64
    with pytest.raises(gitlab.GitLabBackupError, match="GitLab's copy was kept"):
        gitlab.backup(make_context(tmp_path), docker_client=api)
    assert not any(argv[0] == "rm" for argv in api.execs())
    assert TAR in api.files


def test_failed_gitlab_backup_copies_nothing(tmp_path):
    api = FakeDockerAPI()
    api.create_fails = True
    with pytest.raises(CommandError, match="docker exec ops-gitlab, exit 1.*pg_dump: error"):
        gitlab.backup(make_context(tmp_path), docker_client=api)
    assert api.archives() == []
    assert not any(argv[0] == "rm" for argv in api.execs())


def test_no_new_backup_fails_clearly(tmp_path):
    api = FakeDockerAPI()
    api.files[TAR] = b"existing"  # GitLab's tar is there before our run, so nothing new appears
    with pytest.raises(gitlab.GitLabBackupError, match="no new .*_gitlab_backup.tar appeared in /var/opt/gitlab/backups"):
        gitlab.backup(make_context(tmp_path), docker_client=api)
    assert api.archives() == []


def test_removal_failure_is_recorded_not_fatal(tmp_path, caplog):
    api = FakeDockerAPI()
    api.rm_fails = True
    outcome = gitlab.backup(make_context(tmp_path), docker_client=api)
    assert outcome.details["source_tar_removed"] is False
    assert f"could not remove {TAR}" in caplog.text


def test_missing_container_is_source_unavailable(tmp_path):
    ctx = make_context(tmp_path, container="ops-gitlab-old")
    with pytest.raises(SourceUnavailable, match=rf"'ops_gitlab' \(host {ENGINE}, container ops-gitlab-old\)"):
        gitlab.backup(ctx, docker_client=FakeDockerAPI())


def test_unreachable_engine_is_source_unavailable(tmp_path, monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError(f"Failed to establish connection to any given Docker hosts ({kwargs['base_url']})")

    monkeypatch.setattr(gitlab.host, "docker_api", refuse)
    with pytest.raises(SourceUnavailable, match=rf"Docker engine {ENGINE} of connection 'ops_gitlab'"):
        gitlab.backup(make_context(tmp_path))


def test_large_tar_streams_without_being_held_in_memory(tmp_path):
    size = 48 * 1024 * 1024
    api = FakeDockerAPI(backup_content=BigFile(size))
    tracemalloc.start()
    try:
        outcome = gitlab.backup(make_context(tmp_path, verify_copy=False), docker_client=api)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome.files[0].size == size
    assert peak < 12 * 1024 * 1024, f"peak {peak} bytes while copying a {size}-byte tar"


def test_verify_reports_an_archive_that_is_not_gitlabs(tmp_path):
    api = FakeDockerAPI(backup_content=gitlab_backup_tar(with_info=False))
    ctx = make_context(tmp_path)
    manifest = write_set_manifest(ctx, gitlab.backup(ctx, docker_client=api))
    assert gitlab.verify(ctx.backup_set, manifest) == [
        f"backup gitlab/full/20261125T190000Z: {GITLAB_ID}_gitlab_backup.tar: no backup_information.yml, "
        "not a GitLab backup archive"
    ]


def test_verify_reports_a_version_mismatch_and_missing_secrets_key(tmp_path):
    api = FakeDockerAPI(backup_content=gitlab_backup_tar(version="16.0.0-ee"))
    api.files[SECRETS] = b'{"gitlab_rails": {}}'
    ctx = make_context(tmp_path)
    manifest = write_set_manifest(ctx, gitlab.backup(ctx, docker_client=api))
    problems = gitlab.verify(ctx.backup_set, manifest)
    assert len(problems) == 2
    assert "made by GitLab 16.0.0-ee but the manifest records 'gitlab-ee 17.5.1-ee'" in problems[0]
    assert "has no gitlab_rails.db_key_base" in problems[1]
    broken = replace(manifest, details={k: v for k, v in manifest.details.items() if k != "gitlab_version"})
    assert gitlab.verify(ctx.backup_set, broken) == ["backup gitlab/full/20261125T190000Z: manifest details lack gitlab_version"]
