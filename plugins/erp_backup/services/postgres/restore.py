"""Restore of a `full` set into a PostgreSQL server, one database at a time, checked against the manifest.

Globals first (roles the target has are kept, any other error fails), then per
database: create it if missing (``pg_restore --create``, which brings its owner,
settings and grants), decompress the dump to a temp file (or, for the
directory layout of ``parallel.py``, a temp directory), ``pg_restore -j``
(``--schema`` for one tenant: the schema itself first, then its objects), and
compare row counts, content hashes and schema grants with the manifest. Each
database's verification runs while the next database is restored.

A database whose content differs from the manifest is a problem in the report and
the others are still restored. Tables the restore would create that the target
already holds stop it before anything is changed (``RestoreConflict``); a failing
tool or an unreachable target raises ``RestoreError``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from erp_backup.manifest import Manifest
from erp_backup.runner import Command, CommandError, Executor, LocalExecutor
from erp_backup.services.base import RestoreReport
from erp_backup.services.postgres import content as pg_content
from erp_backup.services.postgres import schemas as pg_schemas
from erp_backup.services.postgres.commands import (
    PgEndpoint,
    RestoreConflict,
    RestoreError,
    globals_for_target,
    pg_restore_command,
    pg_restore_list_command,
    psql_script_command,
    read_zst_text,
    roles_created_by,
    schema_header_entries,
)
from erp_backup.services.postgres.content import TableContent
from erp_backup.services.postgres.parallel import LAYOUT_CUSTOM, LAYOUT_DIRECTORY, restorable_directory
from erp_backup.stream import decompress_to

log = logging.getLogger(__name__)

OPTION_NAMES = ("jobs", "schema", "databases", "apply_globals", "bindir", "work_dir")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise RestoreError(f"postgres restore option {name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class FullRestoreOptions:
    """What a full restore takes besides the set and the target (the CLI's --jobs, --schema, --database)."""

    jobs: int = 2
    schema: str | None = None
    databases: tuple[str, ...] | None = None  # None: every database of the set
    apply_globals: bool = True
    bindir: str | None = None
    work_dir: str | None = None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> FullRestoreOptions:
        given = dict(options or {})
        unknown = sorted(set(given) - set(OPTION_NAMES))
        if unknown:
            raise RestoreError(f"postgres full restores take the options {', '.join(OPTION_NAMES)}; "
                               f"unknown: {', '.join(unknown)}")
        try:
            jobs = int(given.get("jobs", 2))
        except (TypeError, ValueError):
            jobs = 0
        if jobs < 1:
            raise RestoreError(f"postgres restore option jobs must be a whole number >= 1, got {given.get('jobs')!r}")
        databases = given.get("databases")
        if isinstance(databases, str):
            databases = [databases]
        return cls(jobs=jobs, schema=given.get("schema") or None,
                   databases=tuple(databases) if databases is not None else None,
                   apply_globals=_flag(given.get("apply_globals", True), "apply_globals"),
                   bindir=given.get("bindir"), work_dir=given.get("work_dir"))


class _RestoreLog:
    """Collects the decisions a restore makes (the same in a dry run) and logs them."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.actions: list[str] = []

    def __call__(self, message: str) -> None:
        self.actions.append(message)
        log.info("restore%s: %s", " (dry run)" if self.dry_run else "", message)


@dataclass(frozen=True)
class _Database:
    """One database to restore: its dump, the tables to check, and what the target already has."""

    name: str
    file: str
    expected: list[TableContent]
    exists: bool
    schema_exists: bool
    schemas: list[pg_schemas.SchemaMeta] | None  # None: a set made before schemas were recorded
    layout: str = LAYOUT_CUSTOM
    files: tuple[str, ...] = ()  # the directory layout's files

    def scope(self, schema: str | None) -> str:
        return f"{self.name}.{schema}" if schema else self.name


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


def _target_inventory(server: PgEndpoint) -> tuple[set[str], set[str]]:
    """The databases and roles the target has."""
    with server.connect(server.maintenance_db, autocommit=True) as admin:
        databases = {row[0] for row in admin.execute("SELECT datname FROM pg_catalog.pg_database")}
        roles = {row[0] for row in admin.execute("SELECT rolname FROM pg_catalog.pg_roles")}
    return databases, roles


def _plan_database(manifest: Manifest, dbname: str, server: PgEndpoint, schema: str | None, exists: bool) -> _Database:
    """What restoring `dbname` means on this target; raises RestoreConflict if it holds tables to restore."""
    entry = manifest.details["databases"][dbname]
    expected = [TableContent.from_dict(t) for t in entry["tables"] if schema is None or t["schema"] == schema]
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
    return _Database(dbname, entry["file"], expected, exists, schema_exists, pg_schemas.recorded(entry, schema),
                     entry.get("format", LAYOUT_CUSTOM), tuple(entry.get("files", ())))


def _run(executor: Executor, command: Command, what: str, stdin: bytes | None = None) -> bytes:
    try:
        return executor.run(command, stdin=stdin)
    except CommandError as exc:
        raise RestoreError(f"{what} failed: {exc}") from exc


def _restore_globals(
    set_dir: Path, manifest: Manifest, server: PgEndpoint, existing_roles: set[str], decide: _RestoreLog,
    executor: Executor, bindir: str | None, report: RestoreReport,
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
        stdin=globals_for_target(script, existing_roles, server.user).encode(
            "utf-8", errors="surrogateescape"),
    )
    with server.connect(server.maintenance_db, autocommit=True) as conn:
        now_present = {row[0] for row in conn.execute("SELECT rolname FROM pg_catalog.pg_roles")}
    missing = sorted(set(roles) - now_present)
    if missing:
        report.problems.append(f"roles missing on {server.describe()} after applying globals: {', '.join(missing)}")
    else:
        report.checks.append(f"globals: the {len(roles)} roles of the set exist on the target")
    not_in_globals = sorted(set(manifest.details.get("roles", [])) - set(roles))
    return {"roles": len(roles), "roles_not_in_globals": not_in_globals, "seconds": round(time.monotonic() - started, 3)}


def _pg_restore(archive: Path, work: Path, database: _Database, server: PgEndpoint, options: FullRestoreOptions,
                executor: Executor, what: str) -> None:
    """The whole database (created if missing), or one schema: its header entries first if the target lacks it."""
    connect_to = database.name if database.exists else server.maintenance_db
    create, jobs, bindir = not database.exists, options.jobs, options.bindir
    if options.schema is None:
        _run(executor, pg_restore_command(server, connect_to, archive, jobs=jobs, create=create, bindir=bindir), what)
        return
    if not database.schema_exists:
        listing = _run(executor, pg_restore_list_command(archive, bindir=bindir), what).decode(errors="replace")
        header = work / "schema.list"
        owners = {s.owner for s in database.schemas} if database.schemas else None
        header.write_text("\n".join(schema_header_entries(listing, options.schema, owners)) + "\n")
        _run(executor, pg_restore_command(server, connect_to, archive, create=create, use_list=header, bindir=bindir), what)
    _run(executor, pg_restore_command(server, database.name, archive, jobs=jobs, schema=options.schema, bindir=bindir),
         what)


def _load_database(set_dir: Path, backup_id: str, database: _Database, server: PgEndpoint,
                   options: FullRestoreOptions, executor: Executor) -> dict[str, Any]:
    """pg_restore one dump: a -Fc file decompressed to a temp file, or a directory fed through pipes."""
    what = f"pg_restore of {database.scope(options.schema)} (backup {backup_id}) into {server.describe()}"
    if database.layout == LAYOUT_DIRECTORY:
        return _load_directory(set_dir, database, server, options, executor, what)
    archive_file = set_dir / database.file
    details: dict[str, Any] = {"file": database.file, "compressed_bytes": archive_file.stat().st_size}
    with tempfile.TemporaryDirectory(prefix="erp-pg-restore-", dir=options.work_dir) as tmp:
        archive = Path(tmp) / "database.dump"
        started = time.monotonic()
        details["restored_bytes"] = decompress_to(archive_file, archive)
        details["decompress_seconds"] = round(time.monotonic() - started, 3)
        started = time.monotonic()
        _pg_restore(archive, Path(tmp), database, server, options, executor, what)
        details["restore_seconds"] = round(time.monotonic() - started, 3)
    return details


def _load_directory(set_dir: Path, database: _Database, server: PgEndpoint, options: FullRestoreOptions,
                    executor: Executor, what: str) -> dict[str, Any]:
    """Decompress a directory-format dump (`jobs` files at a time) and pg_restore -j it."""
    details: dict[str, Any] = {
        "file": database.file, "format": LAYOUT_DIRECTORY,
        "compressed_bytes": sum((set_dir / f).stat().st_size for f in database.files),
    }
    with tempfile.TemporaryDirectory(prefix="erp-pg-restore-", dir=options.work_dir) as tmp:
        started = time.monotonic()
        with restorable_directory(set_dir, list(database.files), Path(tmp), options.jobs) as (archive, raw_bytes):
            details["restored_bytes"] = raw_bytes
            details["decompress_seconds"] = round(time.monotonic() - started, 3)
            started = time.monotonic()
            _pg_restore(archive, Path(tmp), database, server, options, executor, what)
            details["restore_seconds"] = round(time.monotonic() - started, 3)
    return details


def _check_database(database: _Database, server: PgEndpoint, schema: str | None) -> tuple[dict[str, Any], list[str]]:
    """Row counts, content hashes and schema grants of the restored database against the manifest.

    Returns (details, mismatches).
    """
    started = time.monotonic()
    with server.connect(database.name, autocommit=False) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        pg_content.apply_session_settings(conn)
        actual = pg_content.inventory(conn, schema)
        actual_schemas = pg_schemas.read_schemas(conn, schema)
        conn.rollback()
    mismatches = pg_content.compare(database.name, database.expected, actual)
    content_matches = not mismatches
    if database.schemas is not None:
        mismatches += pg_schemas.compare(database.name, database.schemas, actual_schemas)
    return {
        "verify_seconds": round(time.monotonic() - started, 3),
        "tables_checked": len(database.expected),
        "rows_checked": sum(t.rows for t in database.expected if t.kind == "r"),
        "schemas_checked": len(database.schemas) if database.schemas is not None else None,
        "content_matches": content_matches,
    }, mismatches


def _restore_database(set_dir: Path, backup_id: str, database: _Database, server: PgEndpoint,
                      options: FullRestoreOptions, decide: _RestoreLog) -> dict[str, Any]:
    scope = database.scope(options.schema)
    how = "create database and restore" if not database.exists else "restore into existing database"
    decide(f"{scope}: {how} from {database.file} with pg_restore --jobs={options.jobs} "
           f"({len(database.expected)} tables to verify)")
    if decide.dry_run:
        return {"tables": len(database.expected), "create": not database.exists}
    return _load_database(set_dir, backup_id, database, server, options, LocalExecutor())


def _record_check(backup_id: str, database: _Database, options: FullRestoreOptions, details: dict[str, Any],
                  checked: tuple[dict[str, Any], list[str]], report: RestoreReport) -> None:
    scope = database.scope(options.schema)
    details.update(checked[0])
    mismatches = checked[1]
    if mismatches:
        log.warning("restore of %s (backup %s) does not match the manifest: %s", scope, backup_id, "; ".join(mismatches))
        report.problems.extend(mismatches)
    else:
        report.checks.append(f"{scope}: {details['tables_checked']} tables, {details['rows_checked']} rows: "
                             f"row counts and content hashes match" + pg_schemas.checked_text(database.schemas))


def _summarise(report: RestoreReport) -> None:
    details = report.details
    per_db = details["databases"].values()
    details["durations"] = {
        "globals": details.get("globals", {}).get("seconds", 0.0),
        **{step: round(sum(d.get(f"{step}_seconds", 0.0) for d in per_db), 3) for step in ("decompress", "restore", "verify")},
    }
    details["bytes"] = {
        "compressed": sum(d.get("compressed_bytes", 0) for d in per_db),
        "restored": sum(d.get("restored_bytes", 0) for d in per_db),
    }
    details["tables_checked"] = sum(d.get("tables_checked", 0) for d in per_db)
    details["rows_checked"] = sum(d.get("rows_checked", 0) for d in per_db)
    report.restored_bytes = details["bytes"]["restored"]


def restore_full(set_dir: Path, manifest: Manifest, target: str, *, dry_run: bool = False,
                 options: Mapping[str, Any] | None = None) -> RestoreReport:
    """Restore a full set into the server `target` (libpq conninfo or URI), one database at a time, and check it.

    `options`: jobs, schema, databases, apply_globals, bindir, work_dir (see FullRestoreOptions).
    Content mismatches are the report's problems; the per-database results are in its details.
    """
    chosen = FullRestoreOptions.from_mapping(options)
    set_dir = Path(set_dir)
    server = PgEndpoint.parse(target)
    selected = _selected_databases(manifest, chosen.databases, chosen.schema)
    existing_dbs, existing_roles = _target_inventory(server)
    databases = [_plan_database(manifest, name, server, chosen.schema, name in existing_dbs) for name in selected]
    decide = _RestoreLog(dry_run)
    report = RestoreReport(dry_run=dry_run, actions=decide.actions, details={
        "backup_id": manifest.backup_id, "target": server.describe(), "schema": chosen.schema, "jobs": chosen.jobs,
        "databases": {},
    })
    if chosen.apply_globals:
        report.details["globals"] = _restore_globals(
            set_dir, manifest, server, existing_roles, decide, LocalExecutor(), chosen.bindir, report)
    # Each database's verification runs while the next one is restored.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-restore-verify") as verifier:
        checks: list[tuple[_Database, dict[str, Any], Future[tuple[dict[str, Any], list[str]]]]] = []
        for database in databases:
            details = _restore_database(set_dir, manifest.backup_id, database, server, chosen, decide)
            report.details["databases"][database.name] = details
            if not dry_run:
                checks.append((database, details, verifier.submit(_check_database, database, server, chosen.schema)))
        for database, details, future in checks:
            _record_check(manifest.backup_id, database, chosen, details, future.result(), report)
    _summarise(report)
    return report
