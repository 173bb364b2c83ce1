"""Where PostgreSQL client tools connect, and the exact commands they run.

Owns the connection endpoints (`PgEndpoint` for the tools and a restore target,
`SourceServer` for the Airflow connection backed up), the pure ``*_command``
builders, the dump file naming, and parsing of the globals script and of
``pg_restore --list``. Passwords travel only in the PGPASSWORD environment
variable (tools) or as a psycopg keyword, never in argv.
"""

from __future__ import annotations

import getpass
import logging
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import zstandard
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from erp_backup.runner import Command
from erp_backup.services.base import SourceUnavailable

log = logging.getLogger(__name__)

GLOBALS_FILE = "globals.sql.zst"
DATABASES_DIR = "databases"
DUMP_SUFFIX = ".dump.zst"
DIR_SUFFIX = ".dir"
DEFAULT_MAINTENANCE_DB = "postgres"
DEFAULT_PORT = 5432
CONNECT_TIMEOUT_S = 10
APPLICATION_NAME = "erp_backup"


class PostgresBackupError(RuntimeError):
    """A dump failed. The message names the database and the tool's error."""


class RestoreError(RuntimeError):
    """A restore could not run or a restore step failed."""


class RestoreConflict(RestoreError):
    """The target already holds tables the restore would create."""

# ---------------------------------------------------------------------------
# Where client tools connect
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PgEndpoint:
    """libpq parameters without the password, plus the password kept apart for PGPASSWORD."""

    params: Mapping[str, str]
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, target: str) -> PgEndpoint:
        """From a conninfo string or postgresql:// URI; the password is moved out of the params."""
        params = conninfo_to_dict(target)
        password = params.pop("password", None)
        return cls({k: str(v) for k, v in params.items()}, str(password) if password is not None else None)

    @property
    def maintenance_db(self) -> str:
        return self.params.get("dbname") or DEFAULT_MAINTENANCE_DB

    def conninfo(self, dbname: str) -> str:
        return make_conninfo("", **{**self.params, "dbname": dbname})

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password} if self.password else {}

    @property
    def user(self) -> str:
        """The role it connects as (libpq's default: the OS user)."""
        return self.params.get("user") or getpass.getuser()

    def describe(self) -> str:
        return make_conninfo("", **{k: v for k, v in self.params.items() if k != "dbname"})

    def connect(self, dbname: str, **kwargs: Any) -> psycopg.Connection:
        try:
            return psycopg.connect(
                self.conninfo(dbname), password=self.password, connect_timeout=CONNECT_TIMEOUT_S,
                application_name=APPLICATION_NAME, **kwargs,
            )
        except psycopg.OperationalError as exc:
            raise RestoreError(f"cannot connect to restore target {self.describe()} (database {dbname!r}): {exc}") from exc


@dataclass(frozen=True)
class SourceServer:
    """The server to back up, from the Airflow connection (schema = maintenance database)."""

    conn_id: str
    host: str
    port: int
    user: str | None
    password: str | None = field(default=None, repr=False)
    maintenance_db: str = DEFAULT_MAINTENANCE_DB

    @classmethod
    def from_connection(cls, conn_id: str, conn: Any) -> SourceServer:
        if not conn.host:
            raise SourceUnavailable(f"PostgreSQL connection {conn_id!r} has no host: set it in the connection")
        return cls(
            conn_id=conn_id,
            host=conn.host,
            port=int(conn.port or DEFAULT_PORT),
            user=conn.login or None,
            password=conn.password or None,
            maintenance_db=conn.schema or DEFAULT_MAINTENANCE_DB,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self, dbname: str, **kwargs: Any) -> psycopg.Connection:
        try:
            return psycopg.connect(
                host=self.host, port=self.port, user=self.user, password=self.password, dbname=dbname,
                connect_timeout=CONNECT_TIMEOUT_S, application_name=APPLICATION_NAME, **kwargs,
            )
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise SourceUnavailable(
                f"PostgreSQL connection {self.conn_id!r} at {self.address} (database {dbname!r}) "
                f"is unreachable: {reason}"
            ) from exc

    def tool_endpoint(self, exec_mode: str) -> PgEndpoint:
        """Network mode: host and port. Docker mode: the container's local socket, same login."""
        params = {"host": self.host, "port": str(self.port)} if exec_mode == "network" else {}
        if self.user:
            params["user"] = self.user
        return PgEndpoint(params, self.password)


# ---------------------------------------------------------------------------
# Pure command builders
# ---------------------------------------------------------------------------


def tool(name: str, bindir: str | None = None) -> str:
    return str(Path(bindir) / name) if bindir else name


def tool_version_command(name: str, bindir: str | None = None) -> Command:
    return Command((tool(name, bindir), "--version"))


def pg_dumpall_globals_command(
    endpoint: PgEndpoint, maintenance_db: str, *, no_role_passwords: bool = False, bindir: str | None = None
) -> Command:
    argv = [tool("pg_dumpall", bindir), "--no-password", "--globals-only"]
    if no_role_passwords:
        argv.append("--no-role-passwords")
    argv.append(f"--dbname={endpoint.conninfo(maintenance_db)}")
    return Command(tuple(argv), endpoint.env())


def pg_dump_command(endpoint: PgEndpoint, dbname: str, snapshot: str, *, bindir: str | None = None) -> Command:
    """Custom format, uncompressed (we compress with zstd), to stdout, from an exported snapshot."""
    return Command(
        (
            tool("pg_dump", bindir), "--no-password", "--format=custom", "--compress=0",
            f"--snapshot={snapshot}", f"--dbname={endpoint.conninfo(dbname)}",
        ),
        endpoint.env(),
    )


def pg_dump_directory_command(
    endpoint: PgEndpoint, dbname: str, snapshot: str, out_dir: Path, *, jobs: int, bindir: str | None = None
) -> Command:
    """Directory format, uncompressed (we compress each file), `jobs` workers, verbose (each finished item)."""
    return Command(
        (
            tool("pg_dump", bindir), "--no-password", "--format=directory", "--compress=0", f"--jobs={jobs}",
            "--verbose", f"--snapshot={snapshot}", f"--file={out_dir}", f"--dbname={endpoint.conninfo(dbname)}",
        ),
        endpoint.env(),
    )


def pg_restore_list_command(archive: Path, *, bindir: str | None = None) -> Command:
    return Command((tool("pg_restore", bindir), "--list", str(archive)))


def pg_restore_command(
    endpoint: PgEndpoint,
    dbname: str,
    archive: Path,
    *,
    jobs: int = 1,
    create: bool = False,
    schema: str | None = None,
    use_list: Path | None = None,
    bindir: str | None = None,
) -> Command:
    """pg_restore into `dbname` (with create: connect to `dbname`, then CREATE the archive's database)."""
    argv = [tool("pg_restore", bindir), "--no-password", "--exit-on-error", f"--jobs={jobs}"]
    if create:
        argv.append("--create")
    if schema is not None:
        argv.append(f"--schema={schema}")
    if use_list is not None:
        argv.append(f"--use-list={use_list}")
    argv += [f"--dbname={endpoint.conninfo(dbname)}", str(archive)]
    return Command(tuple(argv), endpoint.env())


def psql_script_command(endpoint: PgEndpoint, dbname: str, *, bindir: str | None = None) -> Command:
    """psql reading a script from stdin, stopping at the first error."""
    return Command(
        (
            tool("psql", bindir), "--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1",
            f"--dbname={endpoint.conninfo(dbname)}", "--file=-",
        ),
        endpoint.env(),
    )


def dump_file_for(dbname: str) -> str:
    """The set-relative file of a database's dump (see the module docstring for the encoding)."""
    return f"{DATABASES_DIR}/{quote(dbname, safe='')}{DUMP_SUFFIX}"


def dump_dir_for(dbname: str) -> str:
    """The set-relative directory of a database's directory-format dump (each file as `<name>.zst`)."""
    return f"{DATABASES_DIR}/{quote(dbname, safe='')}{DIR_SUFFIX}"


# ---------------------------------------------------------------------------
# Globals script helpers
# ---------------------------------------------------------------------------

_CREATE_ROLE = re.compile(r'^CREATE ROLE ("(?:[^"]|"")+"|[^\s";]+);$')


def _unquote_identifier(text: str) -> str:
    return text[1:-1].replace('""', '"') if text.startswith('"') else text


def roles_created_by(globals_sql: str) -> list[str]:
    """Role names of the `CREATE ROLE name;` lines pg_dumpall writes."""
    return [
        _unquote_identifier(match.group(1))
        for line in globals_sql.splitlines()
        if (match := _CREATE_ROLE.match(line))
    ]


_ALTER_ROLE = re.compile(r'^ALTER ROLE ("(?:[^"]|"")+"|[^\s";]+) WITH ')
_PASSWORD_CLAUSE = re.compile(r" PASSWORD '(?:[^']|'')*'")


def globals_for_target(globals_sql: str, existing: Iterable[str], own_role: str) -> str:
    """The globals script as applied to a restore target, changed in two ways, line for line.

    - No CREATE ROLE for roles the target already has. Their ALTER ROLE lines still apply
      the backed-up attributes. This is how "role already exists" is tolerated while psql
      stops on any other error.
    - No PASSWORD for `own_role`, the role the restore connects as. Otherwise the backed-up
      password replaces the target's, and every later connection of the restore (and of
      anyone else using that role there) fails to authenticate.
    """
    present = set(existing)
    lines = []
    for line in globals_sql.splitlines(keepends=True):
        created = _CREATE_ROLE.match(line.rstrip("\n"))
        altered = _ALTER_ROLE.match(line)
        if created and _unquote_identifier(created.group(1)) in present:
            line = f"-- {line.rstrip()} skipped: the role exists on the target\n"
        elif altered and _unquote_identifier(altered.group(1)) == own_role:
            line = _PASSWORD_CLAUSE.sub("", line)
        lines.append(line)
    return "".join(lines)


_TOC_ENTRY = re.compile(r"^\d+; \d+ \d+ (.+)$")
_PLAIN_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def schema_header_entries(toc_listing: str, schema: str, owners: Collection[str] | None = None) -> list[str]:
    """TOC lines that create a schema itself: SCHEMA (with its owner), its ACL and COMMENT.

    `pg_restore --schema` restores only objects *in* the schema, not the schema;
    these lines go to a `--use-list` file restored first. `pg_restore --list` writes
    the SCHEMA entry's name as it is and the ACL's and COMMENT's as pg_dump quotes it
    (a plain lower-case name may be quoted too, if a keyword: both forms match).
    Owners are written unquoted and may hold spaces, so the SCHEMA line must end in
    one of `owners` (the recorded owner) when given, else in one word.
    """
    forms = {quote_identifier(schema)} | ({schema} if _PLAIN_IDENTIFIER.match(schema) else set())
    dependents = tuple(f"{kind} - SCHEMA {form} " for kind in ("ACL", "COMMENT") for form in forms)
    itself = f"SCHEMA - {schema} "
    selected = []
    for line in toc_listing.splitlines():
        match = _TOC_ENTRY.match(line)
        entry = match.group(1) if match else ""
        if entry.startswith(itself):
            owner = entry[len(itself):]
            if owner in owners if owners is not None else bool(re.fullmatch(r"\S+", owner)):
                selected.append(line)
        elif entry.startswith(dependents):
            selected.append(line)
    return selected


def read_zst_text(path: Path) -> str:
    with open(path, "rb") as handle:
        reader = zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True)
        return reader.read().decode("utf-8", errors="surrogateescape")

