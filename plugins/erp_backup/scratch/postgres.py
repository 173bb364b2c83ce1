"""Scratch PostgreSQL clusters: `initdb` + `pg_ctl` on a free loopback port.

Used by restores, PITR and the DR drill's local backend. A scratch cluster
listens on 127.0.0.1, keeps its unix socket in a short private directory under
/tmp (made at start, removed at stop, so a deep scratch root still works), and
runs as the `postgres` OS user when we are root (initdb refuses root). A state
file in its base directory records the port and socket directory, so another
process can `attach` to it and stop it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from erp_backup.scratch.base import (
    ScratchError,
    chown_tree,
    free_port,
    private_socket_dir,
    remove_socket_dir,
    scratch_root,
)

log = logging.getLogger(__name__)

PG_BINDIR_ENV = "ERP_PG_BINDIR"
SCRATCH_LABEL = ".erp-scratch"
STATE_FILE_NAME = "scratch-pg.json"
CLUSTER_USER = "postgres"


def pg_bindir(major: int | None = None) -> Path:
    """The server binaries directory: $ERP_PG_BINDIR, else Debian's newest (or given) major."""
    if os.environ.get(PG_BINDIR_ENV):
        return Path(os.environ[PG_BINDIR_ENV])
    base = Path("/usr/lib/postgresql")
    majors = sorted((int(p.name) for p in base.glob("*") if p.name.isdigit()), reverse=True) if base.is_dir() else []
    if major is not None and major in majors:
        return base / str(major) / "bin"
    if majors:
        return base / str(majors[0]) / "bin"
    found = shutil.which("pg_ctl")
    if not found:
        raise ScratchError("no PostgreSQL server binaries found; set ERP_PG_BINDIR")
    return Path(found).resolve().parent


def cluster_user() -> str | None:
    """The user scratch clusters run as: `postgres` when we are root, else ourselves (None)."""
    return CLUSTER_USER if os.geteuid() == 0 else None


def as_cluster_user(argv: list[str]) -> list[str]:
    user = cluster_user()
    return ["runuser", "-u", user, "--", *argv] if user else argv


def chown_to_cluster_user(path: Path) -> None:
    user = cluster_user()
    if user:
        chown_tree(path, user)


class ScratchPostgres:
    """One throwaway cluster. `create()` → `start()` → use `.conninfo()` → `destroy()`."""

    def __init__(self, base_dir: Path, port: int | None = None, bindir: Path | None = None):
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.port = port or free_port()
        self.bindir = bindir or pg_bindir()
        self.user = "postgres"
        self.socket_dir: Path | None = None

    @classmethod
    def new(cls, name: str = "pg", owner: str = "adhoc", bindir: Path | None = None) -> ScratchPostgres:
        """A new cluster directory, labelled with its owner (e.g. `drill:<run_id>`)."""
        base = Path(tempfile.mkdtemp(prefix=f"erp-scratch-{name}-", dir=scratch_root()))
        os.chmod(base, 0o755)
        (base / SCRATCH_LABEL).write_text(owner + "\n")
        return cls(base, bindir=bindir)

    @classmethod
    def attach(cls, directory: Path) -> ScratchPostgres:
        """The cluster in base directory `directory`, with the port and socket directory its state file records."""
        state = _read_state(Path(directory))
        cluster = cls(Path(directory), port=state.get("port") or None)
        cluster.socket_dir = Path(state["socket_dir"]) if state.get("socket_dir") else None
        return cluster

    @property
    def state_file(self) -> Path:
        return self.base_dir / STATE_FILE_NAME

    def _run(self, *argv: str, timeout: float = 120) -> str:
        cmd = as_cluster_user([str(self.bindir / argv[0]), *argv[1:]])
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise ScratchError(f"{argv[0]} failed for scratch cluster {self.data_dir}: {done.stderr.strip()[-1500:]}")
        return done.stdout

    def create(self, settings: dict[str, str] | None = None) -> None:
        """initdb (trust auth, loopback only) and write the scratch settings."""
        self.data_dir.mkdir(mode=0o700)
        chown_to_cluster_user(self.base_dir)
        self._run("initdb", "-D", str(self.data_dir), "-U", self.user, "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        self.configure(settings or {})

    def configure(self, settings: dict[str, str]) -> None:
        """Append settings to postgresql.auto.conf. The unix socket directory is given at start."""
        base = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "fsync": "on",
            "logging_collector": "off",
        }
        lines = [f"{key} = {value}" for key, value in {**base, **settings}.items()]
        conf = self.data_dir / "postgresql.auto.conf"
        with open(conf, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        chown_to_cluster_user(self.data_dir)

    def start(self, timeout: float = 120) -> ScratchPostgres:
        """Start with a new private socket directory; wait until the server accepts connections."""
        if not self.is_running():
            self._forget_socket_dir()  # the server stopped on its own (e.g. a failed recovery) since the last start
        self.socket_dir = private_socket_dir(cluster_user())
        self._write_state()
        log.info("starting scratch PostgreSQL on 127.0.0.1:%d (%s, socket in %s)", self.port, self.data_dir,
                 self.socket_dir)
        try:
            self._run(
                "pg_ctl", "-D", str(self.data_dir), "-l", str(self.base_dir / "server.log"),
                "-o", f"-k {shlex.quote(str(self.socket_dir))}", "-w", "-t", str(int(timeout)), "start",
                timeout=timeout + 10,
            )
        except BaseException:
            if not self.is_running():
                self._forget_socket_dir()
            raise
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs, and remove its socket directory."""
        if self.is_running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")
        self._forget_socket_dir()

    def is_running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def server_log(self) -> str:
        path = self.base_dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def destroy(self) -> None:
        try:
            if self.is_running():
                self.stop("immediate")
        finally:
            self._forget_socket_dir()
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _write_state(self) -> None:
        state = {"port": self.port, "socket_dir": str(self.socket_dir) if self.socket_dir else None}
        self.state_file.write_text(json.dumps(state) + "\n")

    def _forget_socket_dir(self) -> None:
        remove_socket_dir(self.socket_dir or _read_state(self.base_dir).get("socket_dir"))
        self.socket_dir = None
        if self.state_file.exists():
            self._write_state()


def _read_state(base_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((base_dir / STATE_FILE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def cleanup_stale(owner_prefix: str, keep_owner: str | None = None, root: Path | None = None) -> list[Path]:
    """Stop and remove scratch clusters left by crashed runs, found by their label file.

    Only clusters whose owner starts with `owner_prefix` are touched, except `keep_owner`.
    """
    removed = []
    for label in (root or scratch_root()).glob(f"erp-scratch-*/{SCRATCH_LABEL}"):
        base = label.parent
        owner = label.read_text().strip()
        if not owner.startswith(owner_prefix) or owner == keep_owner:
            continue
        log.info("removing stale scratch cluster %s (owner %s)", base, owner)
        try:
            ScratchPostgres.attach(base).destroy()  # removes the directories even if the stop fails
        except ScratchError as exc:
            log.warning("could not stop stale scratch cluster %s: %s", base, exc)
        removed.append(base)
    return removed
