"""PostgreSQL docker exec mode at the Docker API boundary: a fake APIClient records the calls.

The fake stands in for `docker.APIClient` only (exec_create / exec_start / exec_inspect /
inspect_container); everything above it is the real service code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import docker.errors
import pytest
import zstandard

from erp_backup.runner import Executor
from erp_backup.services.base import SourceUnavailable
from erp_backup.services.postgres import dump
from erp_backup.services.postgres.commands import (
    GLOBALS_FILE,
    PgEndpoint,
    PostgresBackupError,
    SourceServer,
    pg_dump_command,
)

SECRET = "docker-s3cret"
CONTAINER = "erp-postgres"
SOURCE = SourceServer("erp_postgres", "erp-db", 5432, "erp_backup", SECRET)
GLOBALS_ARGV = ("pg_dumpall", "--no-password", "--globals-only", "--dbname=user=erp_backup dbname=postgres")

Reply = tuple[list[tuple[bytes | None, bytes | None]], int]


class FakeDockerAPI:
    """A docker.APIClient double: records every call and replays scripted exec output per program."""

    def __init__(self, replies: dict[str, Reply], missing_container: bool = False):
        self.replies = replies
        self.missing_container = missing_container
        self.calls: list[tuple] = []
        self._programs: dict[str, str] = {}

    def inspect_container(self, container: str) -> dict:
        self.calls.append(("inspect_container", container))
        if self.missing_container:
            raise docker.errors.NotFound(f"No such container: {container}")
        return {"Name": f"/{container}", "State": {"Running": True}}

    def exec_create(self, container, cmd, environment=None, user="", stdin=False, **kwargs) -> dict:
        exec_id = f"exec-{len(self._programs) + 1}"
        self.calls.append(("exec_create", container, tuple(cmd), dict(environment or {}), user, stdin))
        self._programs[exec_id] = " ".join(cmd[:2]) if cmd[1:2] == ["--version"] else cmd[0]
        return {"Id": exec_id}

    def exec_start(self, exec_id, stream=False, demux=False, **kwargs):
        self.calls.append(("exec_start", exec_id, stream, demux))
        chunks, _ = self.replies[self._programs[exec_id]]
        if stream:
            return iter(chunks)
        return b"".join(o for o, _ in chunks if o), b"".join(e for _, e in chunks if e)

    def exec_inspect(self, exec_id) -> dict:
        self.calls.append(("exec_inspect", exec_id))
        return {"ExitCode": self.replies[self._programs[exec_id]][1], "Running": False}


@pytest.fixture
def docker_mode(monkeypatch) -> Iterator[Callable[[FakeDockerAPI], Executor]]:
    """Build the executor the backup would use in docker mode, over a given fake API."""

    def build(api: FakeDockerAPI):
        monkeypatch.setattr(dump, "docker_api", lambda conn_id=None, base_url=None: api)
        return dump.executor_for({"exec_mode": "docker", "container": CONTAINER}, SOURCE)

    yield build


def test_globals_dump_streams_exec_output_through_zstd(docker_mode, tmp_path: Path):
    chunks = [(b"--\n-- PostgreSQL database cluster dump\n", None), (None, b"pg_dumpall: warning\n"),
              (b"CREATE ROLE erp_app;\n" * 1000, None)]
    api = FakeDockerAPI({"pg_dumpall": (chunks, 0)})
    executor = docker_mode(api)

    result = dump.dump_globals(SOURCE, executor, SOURCE.tool_endpoint("docker"), tmp_path, level=3)

    assert api.calls == [
        ("inspect_container", CONTAINER),
        ("exec_create", CONTAINER, GLOBALS_ARGV, {"PGPASSWORD": SECRET}, "", False),
        ("exec_start", "exec-1", True, True),
        ("exec_inspect", "exec-1"),
    ]
    written = tmp_path / GLOBALS_FILE
    expected = b"".join(out for out, _ in chunks if out)
    assert zstandard.ZstdDecompressor().stream_reader(written.open("rb")).read() == expected
    assert result.raw_bytes == len(expected)
    assert result.entry.sha256 == hashlib.sha256(written.read_bytes()).hexdigest()
    assert written.stat().st_mode & 0o777 == 0o600


def test_nonzero_exit_fails_the_dump_and_removes_the_partial_file(docker_mode, tmp_path: Path):
    chunks = [(b"--\n-- partial output\n" * 500, None),
              (None, b'pg_dumpall: error: connection to server on socket "/var/run/postgresql/.s.PGSQL.5432" failed')]
    executor = docker_mode(FakeDockerAPI({"pg_dumpall": (chunks, 1)}))

    with pytest.raises(PostgresBackupError) as failure:
        dump.dump_globals(SOURCE, executor, SOURCE.tool_endpoint("docker"), tmp_path, level=3)

    message = str(failure.value)
    assert "'erp_postgres'" in message and "erp-db:5432" in message
    assert f"docker exec {CONTAINER}, exit 1" in message and "connection to server on socket" in message
    assert not (tmp_path / GLOBALS_FILE).exists()


def test_tool_versions_come_from_the_container(docker_mode):
    api = FakeDockerAPI({
        "pg_dump --version": ([(b"pg_dump (PostgreSQL) 15.8\n", None)], 0),
        "pg_dumpall --version": ([(b"pg_dumpall (PostgreSQL) 15.8\n", None)], 0),
    })
    versions = dump.tool_versions(docker_mode(api))

    assert versions["pg_dump"] == "pg_dump (PostgreSQL) 15.8"
    assert versions["pg_dumpall"] == "pg_dumpall (PostgreSQL) 15.8"
    assert versions["zstandard"] == zstandard.__version__
    creates = [call for call in api.calls if call[0] == "exec_create"]
    assert [call[2] for call in creates] == [("pg_dump", "--version"), ("pg_dumpall", "--version")]
    assert ("exec_start", "exec-1", False, True) in api.calls


def test_missing_tool_in_container_is_a_clear_error(docker_mode):
    api = FakeDockerAPI({"pg_dump --version": ([(None, b"exec: \"pg_dump\": executable file not found")], 126)})
    with pytest.raises(PostgresBackupError, match="pg_dump is not usable \\(docker exec erp-postgres\\).*exit 126"):
        dump.tool_versions(docker_mode(api))


def test_unreachable_container_is_source_unavailable(docker_mode):
    with pytest.raises(SourceUnavailable) as failure:
        docker_mode(FakeDockerAPI({}, missing_container=True))
    assert "'erp_postgres'" in str(failure.value) and "erp-db:5432" in str(failure.value)
    assert "container 'erp-postgres'" in str(failure.value)


def test_exec_mode_and_container_are_validated():
    with pytest.raises(PostgresBackupError, match="options.exec_mode must be one of network, docker, got 'ssh'"):
        dump.executor_for({"exec_mode": "ssh"}, SOURCE)
    with pytest.raises(PostgresBackupError, match="options.container is required"):
        dump.executor_for({"exec_mode": "docker"}, SOURCE)


def test_docker_endpoint_uses_the_container_socket_with_the_same_login():
    assert SOURCE.tool_endpoint("docker") == PgEndpoint({"user": "erp_backup"}, SECRET)
    command = pg_dump_command(SOURCE.tool_endpoint("docker"), "erp", "00000004-1")
    assert command.argv[-1] == "--dbname=user=erp_backup dbname=erp"
    assert SECRET not in " ".join(command.argv)
