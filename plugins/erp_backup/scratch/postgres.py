"""Scratch PostgreSQL clusters: `initdb` + `pg_ctl` on a free loopback port.

Used by restores, PITR and the DR drill's local backend. A scratch cluster
listens on 127.0.0.1 only, keeps its socket in its own data directory, and
runs as the `postgres` OS user when we are root (initdb refuses root).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SCRATCH_ROOT_ENV = "ERP_SCRATCH_ROOT"
PG_BINDIR_ENV = "ERP_PG_BINDIR"
SCRATCH_LABEL = ".erp-scratch"


class ScratchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def _os_user() -> str | None:
    """The user scratch clusters run as: `postgres` when we are root, else ourselves."""
    return "postgres" if os.geteuid() == 0 else None


def as_cluster_user(argv: list[str]) -> list[str]:
    user = _os_user()
    return ["runuser", "-u", user, "--", *argv] if user else argv


def chown_to_cluster_user(path: Path) -> None:
    user = _os_user()
    if user:
        entry = pwd.getpwnam(user)
        for root, dirs, files in os.walk(path):
            os.chown(root, entry.pw_uid, entry.pw_gid)
            for name in files:
                os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def scratch_root() -> Path:
    root = Path(os.environ.get(SCRATCH_ROOT_ENV) or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return root


class ScratchPostgres:
    """One throwaway cluster. `create()` → `start()` → use `.conninfo()` → `destroy()`."""

    def __init__(self, base_dir: Path, port: int | None = None, bindir: Path | None = None):
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.port = port or free_port()
        self.bindir = bindir or pg_bindir()
        self.user = "postgres"

    @classmethod
    def new(cls, name: str = "pg", owner: str = "adhoc", bindir: Path | None = None) -> ScratchPostgres:
        """A new cluster directory, labelled with its owner (e.g. `drill:<run_id>`)."""
        base = Path(tempfile.mkdtemp(prefix=f"erp-scratch-{name}-", dir=scratch_root()))
        os.chmod(base, 0o755)
        (base / SCRATCH_LABEL).write_text(owner + "\n")
        return cls(base, bindir=bindir)

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
        base = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.data_dir}'",
            "fsync": "on",
            "logging_collector": "off",
        }
        lines = [f"{key} = {value}" for key, value in {**base, **settings}.items()]
        conf = self.data_dir / "postgresql.auto.conf"
        with open(conf, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        chown_to_cluster_user(self.data_dir)

    def start(self, timeout: float = 120) -> None:
        log.info("starting scratch PostgreSQL on 127.0.0.1:%d (%s)", self.port, self.data_dir)
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.base_dir / "server.log"),
            "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10,
        )

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

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
            shutil.rmtree(self.base_dir, ignore_errors=True)


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
        cluster = ScratchPostgres(base, port=0)
        try:
            if cluster.is_running():
                cluster.stop("immediate")
        except ScratchError as exc:
            log.warning("could not stop stale scratch cluster %s: %s", base, exc)
        shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed
