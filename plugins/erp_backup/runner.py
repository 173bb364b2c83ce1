"""Run commands built as data, locally or inside a Docker container.

Commands are argument lists plus an environment. Secrets travel only in the
environment, which is never logged (only its key names are).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

CHUNK = 1 << 20
STDERR_TAIL = 2000


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        keys = f" (env: {', '.join(sorted(self.env))})" if self.env else ""
        return shlex.join(self.argv) + keys


class CommandError(RuntimeError):
    def __init__(self, command: Command, returncode: int | None, stderr: str, where: str = "local"):
        self.command, self.returncode, self.stderr = command, returncode, stderr
        detail = stderr.strip()[-STDERR_TAIL:] or "(no stderr)"
        super().__init__(f"{command.argv[0]} failed ({where}, exit {returncode}): {detail}")


class Executor(Protocol):
    """Where commands run: the worker itself, or a container."""

    where: str

    def run(self, command: Command, stdin: bytes | None = None, timeout: float | None = None) -> bytes: ...

    def stream(self, command: Command) -> Iterator[bytes]: ...


class LocalExecutor:
    where = "local"

    def __init__(self, base_env: Mapping[str, str] | None = None):
        self.base_env = dict(os.environ if base_env is None else base_env)

    def _env(self, command: Command) -> dict[str, str]:
        return {**self.base_env, **command.env}

    def run(self, command: Command, stdin: bytes | None = None, timeout: float | None = None) -> bytes:
        log.info("running: %s", command.describe())
        try:
            done = subprocess.run(
                list(command.argv), input=stdin, capture_output=True, env=self._env(command), timeout=timeout
            )
        except FileNotFoundError as exc:
            raise CommandError(command, None, f"{command.argv[0]}: not installed on this worker") from exc
        if done.returncode != 0:
            raise CommandError(command, done.returncode, done.stderr.decode(errors="replace"))
        return done.stdout

    def stream(self, command: Command) -> Iterator[bytes]:
        """Yield stdout in chunks; raise CommandError after the last chunk if it failed."""
        log.info("streaming: %s", command.describe())
        with tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(
                    list(command.argv), stdout=subprocess.PIPE, stderr=stderr, env=self._env(command)
                )
            except FileNotFoundError as exc:
                raise CommandError(command, None, f"{command.argv[0]}: not installed on this worker") from exc
            try:
                assert proc.stdout is not None
                while chunk := proc.stdout.read(CHUNK):
                    yield chunk
                returncode = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if returncode != 0:
                stderr.seek(0)
                raise CommandError(command, returncode, stderr.read().decode(errors="replace"))


def stderr_lines(command: Command, base_env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Run `command` locally and yield its stderr lines as they come (stdout is discarded).

    For tools whose progress is their log, such as ``pg_dump --verbose``. Raises
    CommandError, with the last lines, if it fails.
    """
    log.info("running: %s", command.describe())
    env = {**(os.environ if base_env is None else base_env), **command.env}
    try:
        proc = subprocess.Popen(list(command.argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    except FileNotFoundError as exc:
        raise CommandError(command, None, f"{command.argv[0]}: not installed on this worker") from exc
    tail: deque[str] = deque(maxlen=40)
    try:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            tail.append(line)
            yield line
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if returncode != 0:
        raise CommandError(command, returncode, "\n".join(tail))


class DockerExecutor:
    """`docker exec` through the Docker API (docker SDK's low-level APIClient).

    `api` is a `docker.APIClient`, e.g. `DockerHook(docker_conn_id=...).api_client`.
    """

    def __init__(self, api: Any, container: str, user: str | None = None):
        self.api, self.container, self.user = api, container, user
        self.where = f"docker exec {container}"

    def _create(self, command: Command, stdin: bool = False) -> str:
        log.info("%s: %s", self.where, command.describe())
        created = self.api.exec_create(
            self.container,
            list(command.argv),
            environment=dict(command.env),
            user=self.user or "",
            stdin=stdin,
        )
        return created["Id"]

    def _finish(self, command: Command, exec_id: str, stderr: bytes) -> None:
        code = self.api.exec_inspect(exec_id).get("ExitCode")
        if code != 0:
            raise CommandError(command, code, stderr.decode(errors="replace"), where=self.where)

    def run(self, command: Command, stdin: bytes | None = None, timeout: float | None = None) -> bytes:
        if stdin is not None:
            raise NotImplementedError("stdin is not supported through docker exec here")
        exec_id = self._create(command)
        out, err = self.api.exec_start(exec_id, demux=True)
        self._finish(command, exec_id, err or b"")
        return out or b""

    def stream(self, command: Command) -> Iterator[bytes]:
        exec_id = self._create(command)
        stderr = bytearray()
        for out, err in self.api.exec_start(exec_id, stream=True, demux=True):
            if err:
                stderr.extend(err)
                del stderr[:-STDERR_TAIL]
            if out:
                yield out
        self._finish(command, exec_id, bytes(stderr))


def docker_api(docker_conn_id: str | None = None, base_url: str | None = None) -> Any:
    """A low-level Docker API client through the Docker provider's hook."""
    from airflow.providers.docker.hooks.docker import DockerHook

    url = base_url or os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return DockerHook(docker_conn_id=docker_conn_id, base_url=url).api_client
