"""A scratch etcd on free 127.0.0.1 ports, for restore checks and the DR drill.

`ScratchEtcd(data_dir).start()` (or `start_scratch_etcd(data_dir)`) starts `etcd`
on a data dir (a new one, or one made by `etcdctl snapshot restore`), waits until
`/health` answers, and returns a handle whose `stop()` ends it. A pid file (pid,
then data dir) beside the data dir records the process, so another process can
`attach` to it, and a drill that crashed can have its leftover stopped by pid
(`stop_pid_file`), after checking the pid is still that etcd, never by name.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from erp_backup.runner import Command
from erp_backup.scratch.base import (
    HOST,
    ScratchError,
    free_port,
    log_tail,
    process_argv,
    stop_pid,
)

log = logging.getLogger(__name__)

ETCD_BINARY = "etcd"
DEFAULT_MEMBER_NAME = "default"  # what `etcdctl snapshot restore` names the member by default
START_ATTEMPTS = 3
LOG_TAIL = 2000
DEFAULT_START_TIMEOUT_S = 30.0
DEFAULT_STOP_TIMEOUT_S = 10.0


class ScratchEtcdError(ScratchError):
    """The scratch etcd did not start or stop; the message includes its log tail."""


def etcd_command(
    data_dir: Path, client_port: int, peer_port: int, name: str = DEFAULT_MEMBER_NAME, binary: str = ETCD_BINARY
) -> Command:
    """The etcd server argv for one local member. The --initial-* flags only matter for a new data dir."""
    client_url = f"http://{HOST}:{client_port}"
    peer_url = f"http://{HOST}:{peer_port}"
    return Command(
        (
            binary,
            "--name", name,
            "--data-dir", str(data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{name}={peer_url}",
        )
    )


def default_pid_file(data_dir: Path) -> Path:
    return data_dir.with_name(f"{data_dir.name}.etcd.pid")


def default_log_file(data_dir: Path) -> Path:
    return data_dir.with_name(f"{data_dir.name}.etcd.log")


def _healthy(client_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{client_url}/health", timeout=2) as response:
            return bool(json.loads(response.read()).get("health") == "true")
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _is_etcd_on(argv: list[str], data_dir: str) -> bool:
    """True if `argv` is an etcd serving exactly `data_dir`."""
    return bool(argv) and Path(argv[0]).name == ETCD_BINARY and data_dir in argv


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1] if name in argv[:-1] else ""


class ScratchEtcd:
    """One scratch etcd member on `data_dir`. `start()` picks free client and peer ports."""

    def __init__(self, data_dir: Path, *, name: str = DEFAULT_MEMBER_NAME, binary: str = ETCD_BINARY,
                 pid_file: Path | None = None, log_file: Path | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.name, self.binary = name, binary
        self.pid_file = pid_file or default_pid_file(self.data_dir)
        self.log_file = log_file or default_log_file(self.data_dir)
        self.client_url = ""
        self.peer_url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    @property
    def endpoint(self) -> str:
        if not self.client_url:
            raise ScratchEtcdError(f"scratch etcd on {self.data_dir} is not started")
        return self.client_url

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else self._pid

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> ScratchEtcd:
        """Start etcd with free client and peer ports and wait until it is healthy.

        `name` must be the member name stored in a restored data dir (etcdctl's default is "default").
        Retries with new ports if another process took a port between probing and binding.
        """
        last_error = ""
        for attempt in range(1, START_ATTEMPTS + 1):
            self._launch()
            if self._wait_healthy(timeout):
                log.info("scratch etcd pid %s serving %s (data dir %s)", self.pid, self.client_url, self.data_dir)
                return self
            self.stop()
            last_error = log_tail(self.log_file, LOG_TAIL)
            if "address already in use" not in last_error:
                break
            log.warning("scratch etcd attempt %d: a port was taken meanwhile; retrying", attempt)
        raise ScratchEtcdError(
            f"etcd on {self.data_dir} did not become healthy within {timeout:.0f} s; log {self.log_file}:\n{last_error}"
        )

    def _launch(self) -> None:
        client_port, peer_port = free_port(), free_port()
        while peer_port == client_port:
            peer_port = free_port()
        command = etcd_command(self.data_dir, client_port, peer_port, name=self.name, binary=self.binary)
        self.client_url, self.peer_url = f"http://{HOST}:{client_port}", f"http://{HOST}:{peer_port}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}
        with open(self.log_file, "ab") as log_handle:
            try:
                self.process = subprocess.Popen(
                    list(command.argv), stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                )
            except FileNotFoundError as exc:
                raise ScratchEtcdError(f"{self.binary}: not installed on this worker (Debian package: etcd-server)") from exc
        self.pid_file.write_text(f"{self.process.pid}\n{self.data_dir}\n")

    def _wait_healthy(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if _healthy(self.client_url):
                return True
            time.sleep(0.1)
        return False

    def is_running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self._pid is not None and _is_etcd_on(process_argv(self._pid), str(self.data_dir))

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after `timeout`; removes the pid file."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("scratch etcd %d ignored SIGTERM for %.0f s; killing it", self.process.pid, timeout)
                    self.process.kill()
                    self.process.wait()
        elif self._pid is not None:
            data_dir = str(self.data_dir)
            stop_pid(self._pid, lambda argv: _is_etcd_on(argv, data_dir), timeout)
        self.pid_file.unlink(missing_ok=True)
        log.info("scratch etcd on %s stopped (data dir %s)", self.client_url, self.data_dir)

    @classmethod
    def attach(cls, directory: Path) -> ScratchEtcd:
        """The scratch etcd another process started on data dir `directory` (from its pid file)."""
        etcd = cls(Path(directory))
        try:
            etcd._pid = int(etcd.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            raise ScratchEtcdError(f"{etcd.pid_file}: no scratch etcd pid file to attach to ({exc})") from exc
        argv = process_argv(etcd._pid)
        if _is_etcd_on(argv, str(etcd.data_dir)):
            etcd.name = _flag(argv, "--name") or etcd.name
            etcd.client_url, etcd.peer_url = _flag(argv, "--listen-client-urls"), _flag(argv, "--listen-peer-urls")
        return etcd

    def __enter__(self) -> ScratchEtcd:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_scratch_etcd(
    data_dir: Path,
    *,
    name: str = DEFAULT_MEMBER_NAME,
    binary: str = ETCD_BINARY,
    pid_file: Path | None = None,
    log_file: Path | None = None,
    timeout: float = DEFAULT_START_TIMEOUT_S,
) -> ScratchEtcd:
    """A started `ScratchEtcd` on `data_dir` (see `ScratchEtcd.start`)."""
    return ScratchEtcd(data_dir, name=name, binary=binary, pid_file=pid_file, log_file=log_file).start(timeout)


def stop_pid_file(pid_file: Path, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
    """Stop the scratch etcd a pid file names, if that pid is still an etcd on the same data dir.

    Returns True if a process was stopped. A stale pid file (process gone, or the pid
    reused by something else) is removed without signalling anything.
    """
    try:
        pid_line, data_dir_line = pid_file.read_text().splitlines()[:2]
        pid = int(pid_line)
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return False
    stopped = stop_pid(pid, lambda argv: _is_etcd_on(argv, data_dir_line), timeout)
    pid_file.unlink(missing_ok=True)
    if stopped:
        log.info("stopped leftover scratch etcd pid %d (data dir %s)", pid, data_dir_line)
    return stopped
