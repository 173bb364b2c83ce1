"""Scratch redis-server instances for restores and DR drills.

A scratch server listens on a free 127.0.0.1 port and on a unix socket in a
short private directory under /tmp (removed at stop), loads ``<dir>/<dbfilename>``
at start, never writes it back (``--save ""``, AOF off) and is stopped by pid.
It leaves a pid file and a small state file in its directory, so a later
process (e.g. a drill's teardown task) can `attach` to it and stop it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from erp_backup.manifest import FILE_MODE
from erp_backup.scratch.base import (
    ScratchError,
    free_port,
    log_tail,
    private_socket_dir,
    process_argv,
    remove_socket_dir,
    stop_pid,
)

log = logging.getLogger(__name__)

PID_FILE_NAME = "scratch-redis.pid"
STATE_FILE_NAME = "scratch-redis.json"
CONFIG_FILE_NAME = "scratch-redis.conf"
LOG_FILE_NAME = "scratch-redis.log"
SOCKET_NAME = "redis.sock"
DEFAULT_START_TIMEOUT_S = 300.0
DEFAULT_STOP_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 3
LOG_TAIL = 1500


class ScratchRedisError(ScratchError):
    """A scratch redis-server could not be started, reached or stopped."""


def server_argv(
    binary: str, config_file: Path | None, host: str, port: int, data_dir: Path, dbfilename: str, pid_file: Path,
    log_file: Path, unix_socket: Path | None = None,
) -> tuple[str, ...]:
    """The redis-server command line of a scratch server (secrets stay in the 0600 config file)."""
    socket_args = ("--unixsocket", str(unix_socket), "--unixsocketperm", "700") if unix_socket else ()
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
        *socket_args,
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
    socket_dir: Path | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

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

    @property
    def unix_socket(self) -> Path | None:
        return self.socket_dir / SOCKET_NAME if self.socket_dir else None

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
            self.socket_dir = private_socket_dir()
            self._launch()
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

    def _launch(self) -> None:
        assert self.port is not None
        argv = server_argv(
            self.server_binary, self._write_config(), self.host, self.port, self.dir, self.dbfilename,
            self.pid_file, self.log_file, self.unix_socket,
        )
        log.info("starting scratch redis-server on %s:%d in %s", self.host, self.port, self.dir)
        try:
            self._process = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            remove_socket_dir(self.socket_dir)
            raise ScratchRedisError(f"{self.server_binary}: not installed on this worker") from exc
        self.pid = self._process.pid
        self._write_state()

    def _write_config(self) -> Path | None:
        if not self.password:
            return None
        path = self.dir / CONFIG_FILE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"requirepass {_quote_config_value(self.password)}\n")
        return path

    def _write_state(self) -> None:
        state = {"pid": self.pid, "host": self.host, "port": self.port, "dbfilename": self.dbfilename,
                 "socket_dir": str(self.socket_dir) if self.socket_dir else None}
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
        return log_tail(self.log_file, LOG_TAIL)

    def is_running(self) -> bool:
        if self.pid is None:
            return False
        if self._process is not None:
            return self._process.poll() is None
        return _is_our_redis(process_argv(self.pid), self.port)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM the server (it saves nothing: no save points), SIGKILL after `timeout`; remove its socket dir."""
        if self._process is not None:
            _stop_child(self._process, timeout)
        elif self.pid is not None:
            log.info("stopping scratch redis-server pid %d (%s:%s)", self.pid, self.host, self.port)
            port = self.port
            stop_pid(self.pid, lambda argv: _is_our_redis(argv, port), timeout)
        for path in (self.pid_file, self.state_file, self.dir / CONFIG_FILE_NAME):
            path.unlink(missing_ok=True)
        remove_socket_dir(self.socket_dir)
        self.pid, self._process, self.socket_dir = None, None, None

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
            socket_dir=Path(state["socket_dir"]) if state.get("socket_dir") else None,
        )

    def __enter__(self) -> ScratchRedis:
        return self if self.is_running() else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _stop_child(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop a server we started ourselves, and reap it."""
    if process.poll() is None:
        log.info("stopping scratch redis-server pid %d", process.pid)
        process.terminate()
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            log.warning("scratch redis-server pid %d ignored SIGTERM for %.0f s; killing it", process.pid, timeout)
            process.kill()
    process.wait()


def _is_our_redis(argv: list[str], port: int | None) -> bool:
    """True if `argv` (a live process's) is a redis-server (on `port`), so a recycled pid is never signalled."""
    title = " ".join(argv)  # redis-server rewrites its title to "redis-server 127.0.0.1:<port>"
    return "redis-server" in title and (port is None or str(port) in title)
