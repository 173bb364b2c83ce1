"""PostgreSQL service: the daily logical full backup, its verification and its restore.

A full set holds:

- ``globals.sql.zst``: ``pg_dumpall --globals-only`` (roles, memberships, tablespaces).
- ``databases/<name>.dump.zst``: one ``pg_dump -Fc -Z0`` per connectable non-template
  database, compressed with zstd by us while it streams. ``<name>`` is the database
  name percent-encoded (``urllib.parse.quote(name, safe="")``: letters, digits and
  ``_.-~`` stay, everything else, ``%`` included, becomes ``%XX`` of its UTF-8
  bytes), so any name gives one safe, unique file name. The manifest maps names to files.

Each dump runs with ``--snapshot`` exported by a REPEATABLE READ, READ ONLY
transaction that computes the table inventory (``erp_backup.pg_content``) in a
thread while the dump streams, so counts and hashes describe exactly the dumped data.

Backup, verify and restore dispatch on the backup type through ``_BACKUPS``,
``_VERIFIES`` and ``_RESTORES``; this module implements "full" (WAL, snapshots
and PITR are registered from ``postgres_pitr``).

Commands are built by the pure ``*_command`` functions below. Passwords travel
only in the PGPASSWORD environment variable (tools) or as a psycopg keyword.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import zstandard
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from erp_backup import pg_content
from erp_backup.manifest import FileEntry, Manifest
from erp_backup.pg_content import TableContent
from erp_backup.plan import BackupJob, Plan
from erp_backup.runner import Command, CommandError, DockerExecutor, Executor, LocalExecutor, docker_api
from erp_backup.services import postgres_chain, postgres_pitr, postgres_snapshot, postgres_wal
from erp_backup.services.base import BackupContext, BackupOutcome, SourceUnavailable
from erp_backup.sets import BackupSet
from erp_backup.stream import StreamResult, decompress_to, stream_to_file

log = logging.getLogger(__name__)

GLOBALS_FILE = "globals.sql.zst"
DATABASES_DIR = "databases"
DUMP_SUFFIX = ".dump.zst"
DEFAULT_MAINTENANCE_DB = "postgres"
DEFAULT_PORT = 5432
CONNECT_TIMEOUT_S = 10
APPLICATION_NAME = "erp_backup"
EXEC_MODES = ("network", "docker")
FILENAME_ENCODING = "percent-encoded database name (urllib.parse.quote, safe='')"
CONTENT_HASH = (
    "sum over rows of the first 64 bits of md5(ROW(t.*)::text) as signed bigint, exact numeric; "
    "partitioned parents: sum over leaf partitions; session settings: " + str(pg_content.SESSION_SETTINGS)
)


class PostgresBackupError(RuntimeError):
    """A dump failed. The message names the database and the tool's error."""


class RestoreError(RuntimeError):
    """A restore could not run or a restore step failed."""


class RestoreConflict(RestoreError):
    """The target already holds tables the restore would create."""


class RestoreVerificationError(RestoreError):
    """The restored data differs from the manifest. The message names db.schema.table."""


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


def skip_existing_roles(globals_sql: str, existing: Iterable[str]) -> str:
    """The globals script without CREATE ROLE for roles the target already has.

    Their ALTER ROLE lines still apply the backed-up attributes. This is how
    "role already exists" is tolerated while psql stops on any other error.
    """
    present = set(existing)
    lines = []
    for line in globals_sql.splitlines(keepends=True):
        match = _CREATE_ROLE.match(line.rstrip("\n"))
        if match and _unquote_identifier(match.group(1)) in present:
            lines.append(f"-- {line.rstrip()} skipped: the role exists on the target\n")
        else:
            lines.append(line)
    return "".join(lines)


def schema_header_entries(toc_listing: str, schema: str) -> list[str]:
    """TOC lines that create a schema itself (SCHEMA, its ACL and COMMENT).

    `pg_restore --schema` restores only objects *in* the schema, not the schema;
    these lines go to a `--use-list` file restored first. Owners are one word.
    """
    name = re.escape(schema)
    pattern = re.compile(rf"^\d+; \d+ \d+ (?:SCHEMA - {name}|(?:ACL|COMMENT) - SCHEMA {name}) \S+$")
    return [line for line in toc_listing.splitlines() if pattern.match(line)]


def read_zst_text(path: Path) -> str:
    with open(path, "rb") as handle:
        reader = zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True)
        return reader.read().decode("utf-8", errors="surrogateescape")


# ---------------------------------------------------------------------------
# Backup
# ---------------------------------------------------------------------------

_DATABASES = """
SELECT datname, pg_catalog.pg_encoding_to_char(encoding), datcollate, datctype,
       pg_catalog.pg_get_userbyid(datdba), datistemplate, datallowconn
FROM pg_catalog.pg_database ORDER BY datname
"""


@dataclass(frozen=True)
class SourceDatabase:
    name: str
    encoding: str
    collate: str
    ctype: str
    owner: str
    is_template: bool
    allows_connections: bool

    def properties(self) -> dict[str, str]:
        return {"encoding": self.encoding, "collate": self.collate, "ctype": self.ctype, "owner": self.owner}


@dataclass(frozen=True)
class DatabaseDump:
    name: str
    stream: StreamResult
    tables: list[TableContent]
    captured_at: str
    properties: dict[str, str]

    def details(self) -> dict[str, Any]:
        return {
            "file": self.stream.entry.path,
            "raw_bytes": self.stream.raw_bytes,
            "dump_seconds": round(self.stream.seconds, 3),
            "captured_at": self.captured_at,
            **self.properties,
            "tables": [table.as_dict() for table in self.tables],
        }


def executor_for(options: Mapping[str, Any], source: SourceServer) -> Executor:
    """The executor of the plan's exec_mode: tools on the worker, or `docker exec` into the container."""
    mode = options.get("exec_mode", "network")
    if mode == "network":
        return LocalExecutor()
    if mode != "docker":
        raise PostgresBackupError(
            f"services.postgres.options.exec_mode must be one of {', '.join(EXEC_MODES)}, got {mode!r}"
        )
    container = options.get("container")
    if not container:
        raise PostgresBackupError("services.postgres.options.container is required when exec_mode is docker")
    api = docker_api(options.get("docker_conn_id"), options.get("docker_url"))
    try:
        api.inspect_container(container)
    except Exception as exc:
        raise SourceUnavailable(
            f"PostgreSQL connection {source.conn_id!r} ({source.address}): container {container!r} "
            f"is not reachable through Docker: {exc}"
        ) from exc
    return DockerExecutor(api, container)


def tool_versions(executor: Executor, bindir: str | None = None) -> dict[str, str]:
    versions = {}
    for name in ("pg_dump", "pg_dumpall"):
        try:
            versions[name] = executor.run(tool_version_command(name, bindir)).decode().strip()
        except CommandError as exc:
            raise PostgresBackupError(f"{name} is not usable ({executor.where}): {exc}") from exc
    versions["zstandard"] = zstandard.__version__
    versions["psycopg"] = psycopg.__version__
    return versions


def _stream_labelled(chunks: Iterable[bytes], set_dir: Path, relative: str, label: str, level: int) -> StreamResult:
    return stream_to_file(chunks, set_dir, relative, compress=True, level=level, label=label)


def dump_globals(
    source: SourceServer, executor: Executor, endpoint: PgEndpoint, set_dir: Path, *,
    level: int, no_role_passwords: bool = False, bindir: str | None = None,
) -> StreamResult:
    command = pg_dumpall_globals_command(
        endpoint, source.maintenance_db, no_role_passwords=no_role_passwords, bindir=bindir
    )
    try:
        return _stream_labelled(
            executor.stream(command), set_dir, GLOBALS_FILE, f"pg_dumpall --globals-only ({source.address})", level
        )
    except CommandError as exc:
        raise PostgresBackupError(
            f"pg_dumpall --globals-only from connection {source.conn_id!r} ({source.address}) failed; "
            f"partial {GLOBALS_FILE} removed: {exc}"
        ) from exc


def dump_database(
    source: SourceServer, dbname: str, executor: Executor, endpoint: PgEndpoint, set_dir: Path, *,
    level: int, properties: dict[str, str] | None = None, bindir: str | None = None,
) -> DatabaseDump:
    """pg_dump one database from a snapshot while the same snapshot's inventory runs in a thread."""
    relative = dump_file_for(dbname)
    conn = source.connect(dbname, autocommit=False)
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        conn.execute("SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', '0', false)")
        pg_content.apply_session_settings(conn)
        snapshot, captured_at = conn.execute("SELECT pg_catalog.pg_export_snapshot(), now()").fetchone()
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-inventory") as pool:
            tables_future = pool.submit(pg_content.inventory, conn, None, stop.is_set)
            try:
                result = _stream_labelled(
                    executor.stream(pg_dump_command(endpoint, dbname, snapshot, bindir=bindir)),
                    set_dir, relative, f"pg_dump {dbname} ({source.address})", level,
                )
            except BaseException as exc:
                stop.set()
                conn.cancel_safe()
                tables_future.exception()  # wait for the thread; the dump error is the one to report
                if isinstance(exc, CommandError):
                    raise PostgresBackupError(
                        f"pg_dump of database {dbname!r} from connection {source.conn_id!r} ({source.address}) "
                        f"failed; partial file {relative} removed: {exc}"
                    ) from exc
                raise
            try:
                tables = tables_future.result()
            except psycopg.Error as exc:
                raise PostgresBackupError(
                    f"inventory of database {dbname!r} ({source.address}) failed after its dump: {exc}"
                ) from exc
        conn.rollback()
    finally:
        conn.close()
    return DatabaseDump(dbname, result, tables, captured_at.isoformat(), properties or {})


def _select_databases(found: list[SourceDatabase], options: Mapping[str, Any]) -> list[SourceDatabase]:
    """Connectable non-template databases, narrowed by options `databases` / `exclude_databases`."""
    eligible = [db for db in found if not db.is_template and db.allows_connections]
    wanted = options.get("databases")
    if wanted:
        unknown = sorted(set(wanted) - {db.name for db in eligible})
        if unknown:
            raise PostgresBackupError(
                f"services.postgres.options.databases names {', '.join(map(repr, unknown))}, which the source "
                f"does not have or which are templates / do not allow connections"
            )
        eligible = [db for db in eligible if db.name in set(wanted)]
    excluded = set(options.get("exclude_databases") or ())
    return [db for db in eligible if db.name not in excluded]


def backup_full(ctx: BackupContext) -> BackupOutcome:
    conn_id = ctx.conn_id("source")
    source = SourceServer.from_connection(conn_id, ctx.connection("source"))
    options = ctx.options
    exec_mode = options.get("exec_mode", "network")
    level = int(options.get("compress_level", 3))
    bindir = options.get("pg_bindir") if exec_mode == "network" else None
    set_dir = ctx.set_dir
    set_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    with source.connect(source.maintenance_db, autocommit=True) as admin:
        server_version = admin.execute("SHOW server_version").fetchone()[0]
        server_version_num = admin.info.server_version
        databases = _select_databases([SourceDatabase(*row) for row in admin.execute(_DATABASES)], options)
        roles = [row[0] for row in admin.execute(
            "SELECT rolname FROM pg_catalog.pg_roles WHERE rolname !~ '^pg_' ORDER BY rolname"
        )]

    executor = executor_for(options, source)
    endpoint = source.tool_endpoint(exec_mode)
    tools = tool_versions(executor, bindir)
    log.info(
        "backing up %d database(s) from %s (%s, PostgreSQL %s) via %s",
        len(databases), conn_id, source.address, server_version, executor.where,
    )
    globals_result = dump_globals(
        source, executor, endpoint, set_dir, level=level,
        no_role_passwords=bool(options.get("no_role_passwords", False)), bindir=bindir,
    )
    files: list[FileEntry] = [globals_result.entry]
    dumps: dict[str, Any] = {}
    for database in databases:
        dump = dump_database(
            source, database.name, executor, endpoint, set_dir, level=level,
            properties=database.properties(), bindir=bindir,
        )
        files.append(dump.stream.entry)
        dumps[database.name] = dump.details()

    return BackupOutcome(
        files=files,
        source={
            "conn_id": conn_id, "host": source.host, "port": source.port, "login": source.user,
            "maintenance_db": source.maintenance_db, "exec_mode": exec_mode,
            **({"container": options.get("container")} if exec_mode == "docker" else {}),
        },
        tools=tools,
        details={
            "server_version": server_version,
            "server_version_num": server_version_num,
            "globals": {"file": GLOBALS_FILE, "raw_bytes": globals_result.raw_bytes},
            "roles": roles,
            "databases": dumps,
            "filename_encoding": FILENAME_ENCODING,
            "content_hash": CONTENT_HASH,
            "raw_bytes": globals_result.raw_bytes + sum(d["raw_bytes"] for d in dumps.values()),
        },
    )


# ---------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------


def verify_full(backup_set: BackupSet, manifest: Manifest, *, bindir: str | None = None) -> list[str]:
    """Every .zst decompresses (frame checksum), every dump's TOC reads and lists its tables."""
    set_dir = backup_set.path
    problems: list[str] = []
    dumps = {entry["file"]: (name, entry) for name, entry in manifest.details.get("databases", {}).items()}
    executor = LocalExecutor()
    for file_entry in manifest.files:
        path = set_dir / file_entry.path
        if not path.is_file():
            problems.append(f"{file_entry.path}: missing from {set_dir}")
            continue
        with tempfile.TemporaryDirectory(prefix="erp-pg-verify-") as tmp:
            raw = Path(tmp) / "raw"
            try:
                decompress_to(path, raw)
            except (zstandard.ZstdError, OSError) as exc:
                problems.append(f"{file_entry.path}: does not decompress: {exc}")
                continue
            if file_entry.path not in dumps:
                continue
            dbname, entry = dumps[file_entry.path]
            try:
                listing = executor.run(pg_restore_list_command(raw, bindir=bindir)).decode(errors="replace")
            except CommandError as exc:
                problems.append(f"{file_entry.path} (database {dbname!r}): TOC is not readable: {exc}")
                continue
        missing = [
            f"{t['schema']}.{t['name']}" for t in entry.get("tables", [])
            if f" TABLE {t['schema']} {t['name']} " not in listing
        ]
        if missing:
            problems.append(f"{file_entry.path} (database {dbname!r}): TOC lacks tables {', '.join(missing)}")
    for name, entry in manifest.details.get("databases", {}).items():
        if not any(f.path == entry["file"] for f in manifest.files):
            problems.append(f"database {name!r}: its dump {entry['file']} is not among the manifest's files")
    return problems


# ---------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------


class _RestoreLog:
    """Collects the decisions a restore makes (the same in a dry run) and logs them."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.actions: list[str] = []

    def __call__(self, message: str) -> None:
        self.actions.append(message)
        log.info("restore%s: %s", " (dry run)" if self.dry_run else "", message)


def _selected_databases(manifest: Manifest, databases: Iterable[str] | None, schema: str | None) -> list[str]:
    catalog = manifest.details.get("databases", {})
    if databases is not None:
        wanted = list(databases)
        unknown = [name for name in wanted if name not in catalog]
        if unknown:
            raise RestoreError(
                f"backup {manifest.backup_id} has no database {', '.join(map(repr, unknown))} "
                f"(it has: {', '.join(sorted(catalog))})"
            )
    else:
        wanted = sorted(catalog)
    if schema is not None:
        wanted = [name for name in wanted if any(t["schema"] == schema for t in catalog[name]["tables"])]
        if not wanted:
            raise RestoreError(f"backup {manifest.backup_id} has no tables in schema {schema!r} in the selected databases")
    return wanted


def _run(executor: Executor, command: Command, what: str, stdin: bytes | None = None) -> bytes:
    try:
        return executor.run(command, stdin=stdin)
    except CommandError as exc:
        raise RestoreError(f"{what} failed: {exc}") from exc


def _restore_globals(
    set_dir: Path, manifest: Manifest, server: PgEndpoint, existing_roles: set[str], decide: _RestoreLog,
    executor: Executor, bindir: str | None,
) -> dict[str, Any]:
    started = time.monotonic()
    script = read_zst_text(set_dir / manifest.details["globals"]["file"])
    roles = roles_created_by(script)
    present = sorted(set(roles) & existing_roles)
    decide(f"apply globals to {server.describe()}: {len(roles)} roles ({len(present)} exist already, not re-created)")
    if decide.dry_run:
        return {"roles": len(roles)}
    _run(
        executor, psql_script_command(server, server.maintenance_db, bindir=bindir),
        f"applying the globals of backup {manifest.backup_id} to {server.describe()}",
        stdin=skip_existing_roles(script, existing_roles).encode("utf-8", errors="surrogateescape"),
    )
    with server.connect(server.maintenance_db, autocommit=True) as conn:
        now_present = {row[0] for row in conn.execute("SELECT rolname FROM pg_catalog.pg_roles")}
    missing = sorted(set(roles) - now_present)
    if missing:
        raise RestoreVerificationError(f"roles missing on {server.describe()} after applying globals: {', '.join(missing)}")
    not_in_globals = sorted(set(manifest.details.get("roles", [])) - set(roles))
    return {"roles": len(roles), "roles_not_in_globals": not_in_globals, "seconds": round(time.monotonic() - started, 3)}


def _restore_database(
    set_dir: Path, manifest: Manifest, dbname: str, server: PgEndpoint, *, exists: bool, schema: str | None,
    jobs: int, decide: _RestoreLog, executor: Executor, work_dir: str | None, bindir: str | None,
) -> dict[str, Any]:
    entry = manifest.details["databases"][dbname]
    archive_file = set_dir / entry["file"]
    expected = [TableContent.from_dict(t) for t in entry["tables"] if schema is None or t["schema"] == schema]
    scope = f"{dbname}.{schema}" if schema else dbname
    schema_exists = False
    if exists:
        with server.connect(dbname, autocommit=True) as conn:
            present = set(pg_content.list_tables(conn, schema))
            schema_exists = schema is not None and conn.execute(
                "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (schema,)
            ).fetchone() is not None
        conflicts = [t.qualified for t in expected if (t.schema, t.name) in present]
        if conflicts:
            raise RestoreConflict(
                f"target {server.describe()} database {dbname!r} already has {len(conflicts)} of the tables to restore "
                f"({', '.join(conflicts[:5])}{', ...' if len(conflicts) > 5 else ''}): drop them or restore elsewhere"
            )
    how = "create database and restore" if not exists else "restore into existing database"
    decide(f"{scope}: {how} from {entry['file']} with pg_restore --jobs={jobs} ({len(expected)} tables to verify)")
    if decide.dry_run:
        return {"tables": len(expected), "create": not exists}

    report: dict[str, Any] = {"file": entry["file"], "compressed_bytes": archive_file.stat().st_size}
    with tempfile.TemporaryDirectory(prefix="erp-pg-restore-", dir=work_dir) as tmp:
        archive = Path(tmp) / "database.dump"
        started = time.monotonic()
        report["restored_bytes"] = decompress_to(archive_file, archive)
        report["decompress_seconds"] = round(time.monotonic() - started, 3)

        started = time.monotonic()
        connect_to = dbname if exists else server.maintenance_db
        what = f"pg_restore of {scope} (backup {manifest.backup_id}) into {server.describe()}"
        if schema is None:
            _run(executor, pg_restore_command(server, connect_to, archive, jobs=jobs, create=not exists, bindir=bindir), what)
        else:
            if not schema_exists:
                listing = _run(executor, pg_restore_list_command(archive, bindir=bindir), what).decode(errors="replace")
                header = Path(tmp) / "schema.list"
                header.write_text("\n".join(schema_header_entries(listing, schema)) + "\n")
                _run(executor, pg_restore_command(
                    server, connect_to, archive, create=not exists, use_list=header, bindir=bindir), what)
            _run(executor, pg_restore_command(server, dbname, archive, jobs=jobs, schema=schema, bindir=bindir), what)
        report["restore_seconds"] = round(time.monotonic() - started, 3)

    started = time.monotonic()
    with server.connect(dbname, autocommit=False) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        pg_content.apply_session_settings(conn)
        actual = pg_content.inventory(conn, schema)
        conn.rollback()
    report["verify_seconds"] = round(time.monotonic() - started, 3)
    problems = pg_content.compare(dbname, expected, actual)
    if problems:
        raise RestoreVerificationError(
            f"restore of backup {manifest.backup_id} into {server.describe()} does not match the manifest: "
            + "; ".join(problems)
        )
    report["tables_checked"] = len(expected)
    report["rows_checked"] = sum(t.rows for t in expected if t.kind == "r")
    return report


def restore_full(
    set_dir: Path,
    manifest: Manifest,
    target: str,
    *,
    databases: Iterable[str] | None = None,
    schema: str | None = None,
    jobs: int = 2,
    dry_run: bool = False,
    apply_globals: bool = True,
    bindir: str | None = None,
    work_dir: str | None = None,
) -> dict[str, Any]:
    """Restore a full set into the server `target` (libpq conninfo or URI), then verify it.

    Globals first (existing roles are kept, any other error fails), then per
    database: create it if missing (``pg_restore --create``, which brings its
    owner, settings and grants), decompress to a temp file, ``pg_restore -j``
    (``--schema`` for one tenant: the schema itself first, then its objects),
    and compare row counts and content hashes with the manifest.
    """
    set_dir = Path(set_dir)
    server = PgEndpoint.parse(target)
    selected = _selected_databases(manifest, databases, schema)
    decide = _RestoreLog(dry_run)
    executor = LocalExecutor()
    with server.connect(server.maintenance_db, autocommit=True) as admin:
        existing_dbs = {row[0] for row in admin.execute("SELECT datname FROM pg_catalog.pg_database")}
        existing_roles = {row[0] for row in admin.execute("SELECT rolname FROM pg_catalog.pg_roles")}

    report: dict[str, Any] = {
        "backup_id": manifest.backup_id, "target": server.describe(), "dry_run": dry_run, "schema": schema,
        "jobs": jobs, "databases": {},
    }
    if apply_globals:
        report["globals"] = _restore_globals(set_dir, manifest, server, existing_roles, decide, executor, bindir)
    for dbname in selected:
        report["databases"][dbname] = _restore_database(
            set_dir, manifest, dbname, server, exists=dbname in existing_dbs, schema=schema, jobs=jobs,
            decide=decide, executor=executor, work_dir=work_dir, bindir=bindir,
        )
    per_db = report["databases"].values()
    report["actions"] = decide.actions
    report["durations"] = {
        "globals": report.get("globals", {}).get("seconds", 0.0),
        **{step: round(sum(d.get(f"{step}_seconds", 0.0) for d in per_db), 3) for step in ("decompress", "restore", "verify")},
    }
    report["bytes"] = {
        "compressed": sum(d.get("compressed_bytes", 0) for d in per_db),
        "restored": sum(d.get("restored_bytes", 0) for d in per_db),
    }
    report["tables_checked"] = sum(d.get("tables_checked", 0) for d in per_db)
    report["rows_checked"] = sum(d.get("rows_checked", 0) for d in per_db)
    return report


# ---------------------------------------------------------------------------
# Dispatch on the backup type
# ---------------------------------------------------------------------------

_BACKUPS: dict[str, Callable[[BackupContext], BackupOutcome]] = {
    "full": backup_full,
    "wal": postgres_wal.backup,
    "snapshot": postgres_snapshot.backup,
}
_VERIFIES: dict[str, Callable[..., list[str]]] = {
    "full": verify_full,
    "wal": postgres_wal.verify,
    "snapshot": postgres_snapshot.verify,
}
_RESTORES: dict[str, Callable[..., dict[str, Any]]] = {
    "full": restore_full,
    "wal": postgres_pitr.restore,
    "snapshot": postgres_snapshot.restore,
}
SUPPORTED_TYPES = frozenset(_BACKUPS)


def _handler(table: Mapping[str, Callable[..., Any]], backup_type: str, verb: str) -> Callable[..., Any]:
    try:
        return table[backup_type]
    except KeyError:
        raise ValueError(
            f"postgres cannot {verb} backup type {backup_type!r} (supported: {', '.join(sorted(table))})"
        ) from None


def backup(ctx: BackupContext) -> BackupOutcome:
    return _handler(_BACKUPS, ctx.job.backup_type, "back up")(ctx)


def verify(backup_set: BackupSet, manifest: Manifest) -> list[str]:
    return _handler(_VERIFIES, manifest.backup_type, "verify")(backup_set, manifest)


def restore(set_dir: Path, manifest: Manifest, target: Any, **options: Any) -> dict[str, Any]:
    return _handler(_RESTORES, manifest.backup_type, "restore")(set_dir, manifest, target, **options)


def protected_sets(plan: Plan, job: BackupJob, *, now: datetime, offsite: Any = None) -> Mapping[str, str]:
    """WAL and base backups retention must keep so the PITR chain stays whole (postgres_chain)."""
    if job.backup_type not in (postgres_chain.WAL_TYPE, postgres_chain.SNAPSHOT_TYPE):
        return {}
    wal_retention = plan.job(job.service, postgres_chain.WAL_TYPE).retention
    return postgres_chain.chain_protection(plan.backup_root, now, wal_retention, offsite)[job.backup_type]


def after_prune(plan: Plan, job: BackupJob, *, now: datetime, dry_run: bool) -> dict[str, Any]:
    """For the WAL job: drop raw archive files already held in offsite-verified WAL sets."""
    if job.backup_type != postgres_chain.WAL_TYPE:
        return {}
    archive_dir = postgres_wal.archive_dir_for(plan.backup_root, job.options)
    keep = postgres_wal.duration_option(job.options, "archive_keep", timedelta(days=1))
    removed = postgres_wal.prune_local_archive(plan.backup_root, archive_dir, now, keep, dry_run=dry_run)
    return {"archive_dir": str(archive_dir), "archive_files_removed": len(removed), "dry_run": dry_run}
