"""Scratch redis-server instances for restores and DR drills.

A scratch server listens on a free 127.0.0.1 port, loads ``<dir>/<dbfilename>``
at start, never writes it back (``--save ""``, AOF off) and is stopped by pid.
It leaves a pid file and a small state file in its directory, so a later
process (e.g. a drill's teardown task) can `attach` to it and stop it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from erp_backup.manifest import FILE_MODE

log = logging.getLogger(__name__)

PID_FILE_NAME = "scratch-redis.pid"
STATE_FILE_NAME = "scratch-redis.json"
CONFIG_FILE_NAME = "scratch-redis.conf"
LOG_FILE_NAME = "scratch-redis.log"
DEFAULT_START_TIMEOUT_S = 300.0
DEFAULT_STOP_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 3
LOG_TAIL = 1500


class ScratchRedisError(RuntimeError):
    """A scratch redis-server could not be started, reached or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out on `host` (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def server_argv(
    binary: str, config_file: Path | None, host: str, port: int, data_dir: Path, dbfilename: str, pid_file: Path,
    log_file: Path,
) -> tuple[str, ...]:
    """The redis-server command line of a scratch server (secrets stay in the 0600 config file)."""
    return (
        binary,
        *((str(config_file),) if config_file else ()),
        "--bind", host,
        "--port", str(port),
        "--dir", str(data_dir),
        "--dbfilename", dbfilename,
        "--appendonly", "no",
        "--save", "",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--pidfile", str(pid_file),
        "--logfile", str(log_file),
    )


def _quote_config_value(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def ping(host: str, port: int, password: str | None = None, timeout: float = 2.0) -> str:
    """Send (AUTH and) PING over RESP; return the server's status line, e.g. '+PONG' or '-LOADING ...'."""
    def bulk(*parts: str) -> bytes:
        encoded = [part.encode() for part in parts]
        return f"*{len(encoded)}\r\n".encode() + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in encoded)

    with socket.create_connection((host, port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        if password:
            sock.sendall(bulk("AUTH", password))
            reply = reader.readline().decode(errors="replace").strip()
            if not reply.startswith("+"):
                return reply
        sock.sendall(bulk("PING"))
        return reader.readline().decode(errors="replace").strip()


@dataclass
class ScratchRedis:
    """One scratch redis-server. `start()` picks a free port unless `port` is given."""

    dir: Path
    dbfilename: str = "dump.rdb"
    host: str = "127.0.0.1"
    port: int | None = None
    password: str | None = field(default=None, repr=False)
    server_binary: str = "redis-server"
    pid: int | None = None
    _process: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.dir).resolve()

    @property
    def pid_file(self) -> Path:
        return self.dir / PID_FILE_NAME

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE_NAME

    @property
    def log_file(self) -> Path:
        return self.dir / LOG_FILE_NAME

    @property
    def data_file(self) -> Path:
        return self.dir / self.dbfilename

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> ScratchRedis:
        """Start the server and wait until it answers PING (i.e. finished loading the RDB)."""
        if self.is_running():
            raise ScratchRedisError(f"scratch redis in {self.dir} is already running (pid {self.pid})")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fixed_port = self.port
        last_error = ""
        for _ in range(1 if fixed_port else PORT_ATTEMPTS):
            self.port = fixed_port or free_port(self.host)
            config_file = self._write_config()
            argv = server_argv(
                self.server_binary, config_file, self.host, self.port, self.dir, self.dbfilename,
                self.pid_file, self.log_file,
            )
            log.info("starting scratch redis-server on %s:%d in %s", self.host, self.port, self.dir)
            try:
                self._process = subprocess.Popen(
                    list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                raise ScratchRedisError(f"{self.server_binary}: not installed on this worker") from exc
            self.pid = self._process.pid
            self._write_state()
            try:
                self._wait_ready(timeout)
                log.info("scratch redis-server ready on %s:%d (pid %d)", self.host, self.port, self.pid)
                return self
            except ScratchRedisError as exc:
                last_error = str(exc)
                self.stop()
                if "Address already in use" not in last_error:
                    raise
        raise ScratchRedisError(f"scratch redis could not get a free port: {last_error}")

    def _write_config(self) -> Path | None:
        if not self.password:
            return None
        path = self.dir / CONFIG_FILE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"requirepass {_quote_config_value(self.password)}\n")
        return path

    def _write_state(self) -> None:
        state = {"pid": self.pid, "host": self.host, "port": self.port, "dbfilename": self.dbfilename}
        fd = os.open(self.state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle)

    def _wait_ready(self, timeout: float) -> None:
        assert self.port is not None
        deadline = time.monotonic() + timeout
        delay = 0.02
        reply = "no answer"
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise ScratchRedisError(
                    f"scratch redis-server exited with code {self._process.returncode}: {self.log_tail()}"
                )
            try:
                reply = ping(self.host, self.port, self.password)
                if reply == "+PONG":
                    return
            except OSError as exc:
                reply = str(exc)
            if time.monotonic() > deadline:
                raise ScratchRedisError(
                    f"scratch redis-server on {self.host}:{self.port} not ready after {timeout:.0f} s "
                    f"(last reply: {reply}): {self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-LOG_TAIL:].strip() or "(empty log)"
        except OSError:
            return "(no log)"

    def is_running(self) -> bool:
        if self.pid is None:
            return False
        if self._process is not None:
            return self._process.poll() is None
        return _is_our_redis(self.pid, self.port)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM the server (it saves nothing: no save points), SIGKILL after `timeout`."""
        if self.pid is not None and self.is_running():
            log.info("stopping scratch redis-server pid %d (%s:%s)", self.pid, self.host, self.port)
            _signal(self.pid, signal.SIGTERM)
            if not self._wait_exit(timeout):
                log.warning("scratch redis-server pid %d ignored SIGTERM for %.0f s; killing it", self.pid, timeout)
                _signal(self.pid, signal.SIGKILL)
                self._wait_exit(timeout)
        elif self._process is not None:
            self._process.wait()
        for path in (self.pid_file, self.state_file, self.dir / CONFIG_FILE_NAME):
            path.unlink(missing_ok=True)
        self.pid, self._process = None, None

    def _wait_exit(self, timeout: float) -> bool:
        if self._process is not None:
            try:
                self._process.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while self.pid is not None and _is_our_redis(self.pid, self.port):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    @classmethod
    def attach(cls, directory: Path | str, password: str | None = None) -> ScratchRedis:
        """The scratch server another process started in `directory` (from its state file)."""
        directory = Path(directory).resolve()
        state_file = directory / STATE_FILE_NAME
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            raise ScratchRedisError(f"{state_file}: no scratch redis state to attach to ({exc})") from exc
        return cls(
            dir=directory, dbfilename=state["dbfilename"], host=state["host"], port=state["port"],
            password=password, pid=state["pid"],
        )

    def __enter__(self) -> ScratchRedis:
        return self if self.is_running() else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _is_our_redis(pid: int, port: int | None) -> bool:
    """True if `pid` is alive and is a redis-server (on `port`), so a recycled pid is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    if "State:\tZ" in status:
        return False
    return "redis-server" in cmdline and (port is None or str(port) in cmdline)
