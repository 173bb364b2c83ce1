"""A scratch S3 endpoint: a moto server subprocess on 127.0.0.1 (it stands in for MinIO).

A pid file (pid, then port) in its directory lets another process `attach` and stop it,
after checking the pid is still that moto server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from erp_backup.scratch.base import (
    HOST,
    ScratchError,
    free_port,
    process_argv,
    read_pid,
    stop_pid,
    wait_tcp,
)

PID_FILE_NAME = "moto.pid"
LOG_FILE_NAME = "moto.log"
DEFAULT_START_TIMEOUT_S = 60.0


def moto_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]


class ScratchS3:
    """A moto S3 server in `base_dir` (its pid file and log live there), stopped by pid."""

    def __init__(self, base_dir: Path, port: int | None = None):
        self.base_dir = Path(base_dir)
        self.port = port or free_port()

    @property
    def pid_file(self) -> Path:
        return self.base_dir / PID_FILE_NAME

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> ScratchS3:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with open(self.base_dir / LOG_FILE_NAME, "ab") as out:
            process = subprocess.Popen(
                moto_argv(self.port), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{process.pid}\n{self.port}\n")
        try:
            wait_tcp(HOST, self.port, timeout, "scratch S3 (moto)", alive=lambda: process.poll() is None)
        except ScratchError:
            self.stop()
            process.wait()
            raise
        return self

    def _is_moto(self, argv: list[str]) -> bool:
        return "moto.server" in argv and str(self.port) in argv

    def is_running(self) -> bool:
        pid = read_pid(self.pid_file)
        return pid is not None and self._is_moto(process_argv(pid))

    def stop(self) -> None:
        pid = read_pid(self.pid_file)
        if pid is not None:
            stop_pid(pid, self._is_moto)
        self.pid_file.unlink(missing_ok=True)

    @classmethod
    def attach(cls, directory: Path) -> ScratchS3:
        """The moto server another process started in `directory` (from its pid file)."""
        pid_file = Path(directory) / PID_FILE_NAME
        try:
            port = int(pid_file.read_text().split()[1])
        except (OSError, ValueError, IndexError) as exc:
            raise ScratchError(f"{pid_file}: no scratch S3 pid file to attach to ({exc})") from exc
        return cls(Path(directory), port=port)
