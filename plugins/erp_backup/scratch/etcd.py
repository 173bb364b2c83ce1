"""A scratch etcd on free 127.0.0.1 ports, for restore checks and the DR drill.

`start_scratch_etcd(data_dir)` starts `etcd` on a data dir (a new one, or one
made by `etcdctl snapshot restore`), waits until `/health` answers, and returns
a handle whose `stop()` ends it. A pid file (pid, then data dir) beside the
data dir records the process, so a drill that crashed can have its leftover stopped by pid
(`stop_pid_file`), after checking the pid is still that etcd, never by name.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from erp_backup.runner import Command

log = logging.getLogger(__name__)

ETCD_BINARY = "etcd"
DEFAULT_MEMBER_NAME = "default"  # what `etcdctl snapshot restore` names the member by default
HOST = "127.0.0.1"
START_ATTEMPTS = 3
LOG_TAIL = 2000


class ScratchEtcdError(RuntimeError):
    """The scratch etcd did not start or stop; the message includes its log tail."""


def free_port(host: str = HOST) -> int:
    """A port the kernel says is free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL:]
    except OSError:
        return "(no log)"


def _healthy(client_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{client_url}/health", timeout=2) as response:
            return json.loads(response.read()).get("health") == "true"
    except (OSError, ValueError, urllib.error.URLError):
        return False


@dataclass
class ScratchEtcd:
    data_dir: Path
    name: str
    client_url: str
    peer_url: str
    pid_file: Path
    log_file: Path
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return self.client_url

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; removes the pid file."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("scratch etcd %d ignored SIGTERM for %.0f s; killing it", self.pid, timeout)
                self.process.kill()
                self.process.wait()
        self.pid_file.unlink(missing_ok=True)
        log.info("scratch etcd on %s stopped (data dir %s)", self.client_url, self.data_dir)

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
    timeout: float = 30.0,
) -> ScratchEtcd:
    """Start etcd on `data_dir` with free client and peer ports and wait until it is healthy.

    `name` must be the member name stored in a restored data dir (etcdctl's default is "default").
    Retries with new ports if another process took a port between probing and binding.
    """
    data_dir = Path(data_dir).resolve()
    pid_file = pid_file or default_pid_file(data_dir)
    log_file = log_file or default_log_file(data_dir)
    env = {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}
    last_error = ""
    for attempt in range(1, START_ATTEMPTS + 1):
        client_port, peer_port = free_port(), free_port()
        while peer_port == client_port:
            peer_port = free_port()
        command = etcd_command(data_dir, client_port, peer_port, name=name, binary=binary)
        client_url, peer_url = f"http://{HOST}:{client_port}", f"http://{HOST}:{peer_port}"
        with open(log_file, "ab") as log_handle:
            try:
                process = subprocess.Popen(
                    list(command.argv), stdout=log_handle, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=env,
                )
            except FileNotFoundError as exc:
                raise ScratchEtcdError(f"{binary}: not installed on this worker (Debian package: etcd-server)") from exc
        pid_file.write_text(f"{process.pid}\n{data_dir}\n")
        etcd = ScratchEtcd(data_dir, name, client_url, peer_url, pid_file, log_file, process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if _healthy(client_url):
                log.info("scratch etcd pid %d serving %s (data dir %s)", process.pid, client_url, data_dir)
                return etcd
            time.sleep(0.1)
        etcd.stop()
        last_error = _tail(log_file)
        if "address already in use" not in last_error:
            break
        log.warning("scratch etcd attempt %d: a port was taken meanwhile; retrying", attempt)
    raise ScratchEtcdError(
        f"etcd on {data_dir} did not become healthy within {timeout:.0f} s; log {log_file}:\n{last_error}"
    )


def _running(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_pid_file(pid_file: Path, timeout: float = 10.0) -> bool:
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
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        argv = []
    ours = bool(argv) and Path(argv[0].decode()).name == ETCD_BINARY and data_dir_line.encode() in argv
    if not ours:
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    log.info("stopped leftover scratch etcd pid %d (data dir %s)", pid, data_dir_line)
    return True
