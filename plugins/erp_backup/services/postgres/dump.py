"""The PostgreSQL `full` backup type: pg_dumpall globals plus one pg_dump per database, and its verification.

A full set holds:

- ``globals.sql.zst``: ``pg_dumpall --globals-only`` (roles, memberships, tablespaces).
- ``databases/<name>.dump.zst``: one ``pg_dump -Fc -Z0`` per connectable non-template
  database, compressed with zstd by us while it streams. ``<name>`` is the database
  name percent-encoded (``urllib.parse.quote(name, safe="")``: letters, digits and
  ``_.-~`` stay, everything else, ``%`` included, becomes ``%XX`` of its UTF-8
  bytes), so any name gives one safe, unique file name. The manifest maps names to files.
- or, for a database of at least the plan's ``parallel_dump_min_mb``:
  ``databases/<name>.dir/<file>.zst``, a ``pg_dump -Fd -j dump_jobs`` directory
  whose files are each compressed as pg_dump finishes them (``parallel.py``).

Each dump runs with ``--snapshot`` exported by a REPEATABLE READ, READ ONLY
transaction that computes the table inventory (``erp_backup.services.postgres.content``) in a
thread while the dump streams, so counts and hashes describe exactly the dumped data.
The restore of a full set is in ``restore.py``; the commands in ``commands.py``.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import zstandard

from erp_backup.manifest import FileEntry, Manifest
from erp_backup.runner import CommandError, DockerExecutor, Executor, LocalExecutor, docker_api
from erp_backup.services.base import BackupContext, BackupOutcome, SourceUnavailable
from erp_backup.services.postgres import content as pg_content
from erp_backup.services.postgres import schemas as pg_schemas
from erp_backup.services.postgres.access import check_backup_role
from erp_backup.services.postgres.commands import (
    GLOBALS_FILE,
    PgEndpoint,
    PostgresBackupError,
    SourceServer,
    dump_dir_for,
    dump_file_for,
    pg_dump_command,
    pg_dumpall_globals_command,
    pg_restore_list_command,
    tool_version_command,
)
from erp_backup.services.postgres.content import TableContent
from erp_backup.services.postgres.parallel import (
    LAYOUT_CUSTOM,
    LAYOUT_DIRECTORY,
    DumpFiles,
    dump_directory,
    layout_for,
)
from erp_backup.sets import BackupSet
from erp_backup.stream import StreamResult, decompress_to, stream_to_file

log = logging.getLogger(__name__)

EXEC_MODES = ("network", "docker")
FILENAME_ENCODING = "percent-encoded database name (urllib.parse.quote, safe='')"
CONTENT_HASH = (
    "sum over rows of the first 64 bits of md5(ROW(t.*)::text) as signed bigint, exact numeric; "
    "partitioned parents: sum over leaf partitions; session settings: " + str(pg_content.SESSION_SETTINGS)
)

_DATABASES = """
SELECT datname, pg_catalog.pg_encoding_to_char(encoding), datcollate, datctype,
       pg_catalog.pg_get_userbyid(datdba), datistemplate, datallowconn,
       CASE WHEN datallowconn AND pg_catalog.has_database_privilege(oid, 'CONNECT')
            THEN pg_catalog.pg_database_size(oid) ELSE 0 END
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
    size_bytes: int = 0

    def properties(self) -> dict[str, str]:
        return {"encoding": self.encoding, "collate": self.collate, "ctype": self.ctype, "owner": self.owner}


@dataclass(frozen=True)
class DatabaseDump:
    name: str
    written: DumpFiles
    tables: list[TableContent]
    captured_at: str
    properties: dict[str, str]
    schemas: list[pg_schemas.SchemaMeta]

    def details(self) -> dict[str, Any]:
        layout: dict[str, Any] = {"format": self.written.layout}
        if self.written.layout == LAYOUT_DIRECTORY:
            layout.update(files=[entry.path for entry in self.written.entries], dump_jobs=self.written.jobs)
        return {
            "file": self.written.file,
            **layout,
            "raw_bytes": self.written.raw_bytes,
            "dump_seconds": round(self.written.seconds, 3),
            "captured_at": self.captured_at,
            **self.properties,
            "tables": [table.as_dict() for table in self.tables],
            "schemas": [schema.as_dict() for schema in self.schemas],
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


def _write_dump(source: SourceServer, dbname: str, executor: Executor, endpoint: PgEndpoint, set_dir: Path,
                snapshot: str, *, level: int, bindir: str | None, layout: tuple[str, int]) -> DumpFiles:
    label = f"pg_dump {dbname} ({source.address})"
    if layout[0] == LAYOUT_DIRECTORY:
        return dump_directory(endpoint, dbname, snapshot, set_dir, jobs=layout[1], level=level, bindir=bindir,
                              label=label)
    relative = dump_file_for(dbname)
    result = _stream_labelled(executor.stream(pg_dump_command(endpoint, dbname, snapshot, bindir=bindir)),
                              set_dir, relative, label, level)
    return DumpFiles([result.entry], relative, LAYOUT_CUSTOM, result.raw_bytes, result.seconds)


def dump_database(
    source: SourceServer, dbname: str, executor: Executor, endpoint: PgEndpoint, set_dir: Path, *,
    level: int, properties: dict[str, str] | None = None, bindir: str | None = None,
    layout: tuple[str, int] = (LAYOUT_CUSTOM, 1),
) -> DatabaseDump:
    """pg_dump one database from a snapshot while the same snapshot's inventory runs in a thread.

    `layout`: (LAYOUT_CUSTOM, 1), one -Fc stream; or (LAYOUT_DIRECTORY, jobs), pg_dump -Fd -j jobs.
    """
    relative = dump_file_for(dbname) if layout[0] == LAYOUT_CUSTOM else dump_dir_for(dbname)
    conn = source.connect(dbname, autocommit=False)
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        conn.execute("SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', '0', false)")
        pg_content.apply_session_settings(conn)
        exported = conn.execute("SELECT pg_catalog.pg_export_snapshot(), now()").fetchone()
        assert exported is not None
        snapshot, captured_at = exported
        schemas = pg_schemas.read_schemas(conn)
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-inventory") as pool:
            tables_future = pool.submit(pg_content.inventory, conn, None, stop.is_set)
            try:
                written = _write_dump(source, dbname, executor, endpoint, set_dir, snapshot, level=level,
                                      bindir=bindir, layout=layout)
            except BaseException as exc:
                stop.set()
                conn.cancel_safe()
                tables_future.exception()  # wait for the thread; the dump error is the one to report
                if isinstance(exc, CommandError):
                    raise PostgresBackupError(
                        f"pg_dump of database {dbname!r} from connection {source.conn_id!r} ({source.address}) "
                        f"failed; partial {'file' if layout[0] == LAYOUT_CUSTOM else 'directory'} {relative} removed: {exc}"
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
    return DatabaseDump(dbname, written, tables, captured_at.isoformat(), properties or {}, schemas)


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


@dataclass(frozen=True)
class SourceSurvey:
    """What the source server is and holds, read before the dumps start."""

    server_version: str
    server_version_num: int
    databases: list[SourceDatabase]
    roles: list[str]


def survey_source(source: SourceServer, options: Mapping[str, Any]) -> SourceSurvey:
    with source.connect(source.maintenance_db, autocommit=True) as admin:
        version_row = admin.execute("SHOW server_version").fetchone()
        assert version_row is not None
        server_version = version_row[0]
        databases = _select_databases([SourceDatabase(*row) for row in admin.execute(_DATABASES)], options)
        roles = [row[0] for row in admin.execute(
            "SELECT rolname FROM pg_catalog.pg_roles WHERE rolname !~ '^pg_' ORDER BY rolname"
        )]
        return SourceSurvey(server_version, admin.info.server_version, databases, roles)


def backup_full(ctx: BackupContext) -> BackupOutcome:
    conn_id = ctx.conn_id("source")
    source = SourceServer.from_connection(conn_id, ctx.connection("source"))
    options = ctx.options
    exec_mode = options.get("exec_mode", "network")
    level = int(options.get("compress_level", 3))
    bindir = options.get("pg_bindir") if exec_mode == "network" else None
    set_dir = ctx.set_dir
    set_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    survey = survey_source(source, options)
    no_role_passwords = bool(options.get("no_role_passwords", False))
    check_backup_role(source, [db.name for db in survey.databases], no_role_passwords=no_role_passwords)

    executor = executor_for(options, source)
    endpoint = source.tool_endpoint(exec_mode)
    tools = tool_versions(executor, bindir)
    log.info(
        "backing up %d database(s) from %s (%s, PostgreSQL %s) via %s",
        len(survey.databases), conn_id, source.address, survey.server_version, executor.where,
    )
    globals_result = dump_globals(
        source, executor, endpoint, set_dir, level=level,
        no_role_passwords=no_role_passwords, bindir=bindir,
    )
    files: list[FileEntry] = [globals_result.entry]
    dumps: dict[str, Any] = {}
    for database in survey.databases:
        dump = dump_database(
            source, database.name, executor, endpoint, set_dir, level=level,
            properties=database.properties(), bindir=bindir, layout=layout_for(database.size_bytes, options),
        )
        files.extend(dump.written.entries)
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
            "server_version": survey.server_version,
            "server_version_num": survey.server_version_num,
            "globals": {"file": GLOBALS_FILE, "raw_bytes": globals_result.raw_bytes},
            "roles": survey.roles,
            "databases": dumps,
            "filename_encoding": FILENAME_ENCODING,
            "content_hash": CONTENT_HASH,
            "raw_bytes": globals_result.raw_bytes + sum(d["raw_bytes"] for d in dumps.values()),
        },
    )


# ---------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------


def _dump_toc_files(manifest: Manifest) -> dict[str, tuple[str, dict[str, Any], str]]:
    """Set file -> (database, its entry, the name pg_restore --list reads it under) for each dump's TOC."""
    found = {}
    for name, entry in manifest.details.get("databases", {}).items():
        if entry.get("format") == LAYOUT_DIRECTORY:
            found[f"{entry['file']}/toc.dat.zst"] = (name, entry, "dump/toc.dat")
        else:
            found[entry["file"]] = (name, entry, "raw")
    return found


def _entry_files(entry: dict[str, Any]) -> list[str]:
    return list(entry["files"]) if entry.get("format") == LAYOUT_DIRECTORY else [entry["file"]]


def verify_full(backup_set: BackupSet, manifest: Manifest, *, bindir: str | None = None) -> list[str]:
    """Every .zst decompresses (frame checksum), every dump's TOC reads and lists its tables (both layouts)."""
    set_dir = backup_set.path
    problems: list[str] = []
    dumps = _dump_toc_files(manifest)
    executor = LocalExecutor()
    for file_entry in manifest.files:
        path = set_dir / file_entry.path
        if not path.is_file():
            problems.append(f"{file_entry.path}: missing from {set_dir}")
            continue
        with tempfile.TemporaryDirectory(prefix="erp-pg-verify-") as tmp:
            dbname, entry, name = dumps.get(file_entry.path, ("", {}, "raw"))
            raw = Path(tmp) / name
            raw.parent.mkdir(exist_ok=True)
            try:
                decompress_to(path, raw)
            except (zstandard.ZstdError, OSError) as exc:
                problems.append(f"{file_entry.path}: does not decompress: {exc}")
                continue
            if file_entry.path not in dumps:
                continue
            try:
                archive = raw if name == "raw" else raw.parent
                listing = executor.run(pg_restore_list_command(archive, bindir=bindir)).decode(errors="replace")
            except CommandError as exc:
                problems.append(f"{file_entry.path} (database {dbname!r}): TOC is not readable: {exc}")
                continue
        missing = [
            f"{t['schema']}.{t['name']}" for t in entry.get("tables", [])
            if f" TABLE {t['schema']} {t['name']} " not in listing
        ]
        if missing:
            problems.append(f"{file_entry.path} (database {dbname!r}): TOC lacks tables {', '.join(missing)}")
    listed = {f.path for f in manifest.files}
    for name, entry in manifest.details.get("databases", {}).items():
        absent = [file for file in _entry_files(entry) if file not in listed]
        if absent:
            problems.append(f"database {name!r}: its dump {', '.join(absent)} is not among the manifest's files")
    return problems
