"""A scratch RabbitMQ node of its own on 127.0.0.1, for restore checks and the DR drill.

The node has its own name, AMQP and distribution ports, mnesia, logs and no plugins.
It is started from the rabbitmq-server package's scripts; as root it runs as the
`rabbitmq` OS user (sharing that user's Erlang cookie, so `rabbitmqctl --node`
reaches it). A state file in its directory lets another process `attach` and stop it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
from pathlib import Path

from erp_backup.scratch.base import (
    ScratchError,
    chown_tree,
    free_port,
    log_tail,
    process_environ,
    read_pid,
    stop_pid,
)

log = logging.getLogger(__name__)

RABBITMQ_LIBDIR = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_USER = "rabbitmq"
STATE_FILE_NAME = "scratch-rabbit.json"
DEFAULT_START_TIMEOUT_S = 180.0
DEFAULT_STOP_TIMEOUT_S = 60.0


def node_name() -> str:
    """A node name no other node on this host has."""
    return f"erpdrill{secrets.token_hex(4)}@localhost"


class ScratchRabbit:
    """One scratch RabbitMQ node in `base_dir`; `port` is its AMQP port on 127.0.0.1."""

    STATE = STATE_FILE_NAME

    def __init__(self, base_dir: Path, node: str | None = None, port: int | None = None, dist_port: int | None = None):
        self.base_dir = Path(base_dir)
        self.node = node or node_name()
        self.port = port or free_port()
        self.dist_port = dist_port or free_port()

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "rabbit.pid"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "startup.log"

    @property
    def state_file(self) -> Path:
        return self.base_dir / STATE_FILE_NAME

    def _env(self) -> dict[str, str]:
        home = "/var/lib/rabbitmq" if os.geteuid() == 0 else str(self.base_dir)
        return {
            "HOME": home,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base_dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base_dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CONFIG_FILE": str(self.base_dir / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base_dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base_dir / "rabbitmq-env.conf"),
        }

    def _argv(self, script: str, *args: str) -> list[str]:
        env = [f"{key}={value}" for key, value in self._env().items()]
        binary = RABBITMQ_LIBDIR / script
        argv = ["env", *env, str(binary if binary.exists() else script), *args]
        return ["runuser", "-u", RABBITMQ_USER, "--", *argv] if os.geteuid() == 0 else argv

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> ScratchRabbit:
        """Start the node and wait (`rabbitmqctl wait`) until it runs; a node that does not start is stopped."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:
            chown_tree(self.base_dir, RABBITMQ_USER)
        log.info("starting scratch RabbitMQ node %s on 127.0.0.1:%d (%s)", self.node, self.port, self.base_dir)
        with open(self.log_file, "ab") as out:
            try:
                process = subprocess.Popen(
                    self._argv("rabbitmq-server"), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                raise ScratchError("rabbitmq-server is not installed on this worker (Debian package rabbitmq-server)") from exc
        self.state_file.write_text(json.dumps(
            {"node": self.node, "port": self.port, "dist_port": self.dist_port, "launcher_pid": process.pid}
        ))
        done = subprocess.run(
            self._argv("rabbitmqctl", "--node", self.node, "wait", "--timeout", str(int(timeout)), str(self.pid_file)),
            capture_output=True, text=True, timeout=timeout + 30,
        )
        if done.returncode != 0:
            tail = log_tail(self.log_file)
            self.stop()
            raise ScratchError(f"scratch RabbitMQ node {self.node} did not start: {done.stderr.strip()[-1500:]} {tail}")
        return self

    def _is_node(self, pid: int) -> bool:
        """True if `pid` is this node's Erlang VM (its argv does not name the node; its environment does)."""
        return process_environ(pid).get("RABBITMQ_NODENAME") == self.node

    def is_running(self) -> bool:
        pid = read_pid(self.pid_file)
        return pid is not None and self._is_node(pid)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Stop the node (rabbitmqctl stop, then by pid), and kill what is left of its launcher's session."""
        pid = read_pid(self.pid_file)
        if pid is not None and self._is_node(pid):
            subprocess.run(
                self._argv("rabbitmqctl", "--node", self.node, "stop", str(self.pid_file)),
                capture_output=True, timeout=timeout,
            )
            stop_pid(pid, lambda _argv: self._is_node(pid))
        try:
            launcher = json.loads(self.state_file.read_text()).get("launcher_pid")
        except (OSError, ValueError):
            launcher = None
        if launcher:
            try:
                os.killpg(launcher, signal.SIGKILL)  # the launcher's session: runuser and the scripts
            except (ProcessLookupError, PermissionError):
                pass

    @classmethod
    def attach(cls, directory: Path) -> ScratchRabbit:
        """The node another process started in `directory` (from its state file)."""
        state_file = Path(directory) / STATE_FILE_NAME
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            raise ScratchError(f"{state_file}: no scratch RabbitMQ state to attach to ({exc})") from exc
        return cls(Path(directory), node=state["node"], port=state["port"], dist_port=state["dist_port"])
