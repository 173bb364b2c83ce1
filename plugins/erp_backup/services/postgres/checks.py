"""The drill's checks of a restored PostgreSQL scratch target, independent of the restore's own.

A full restore: every database of the manifest is read back in one REPEATABLE READ
snapshot and its row counts and content hashes compared with the manifest.
A point-in-time restore: the cluster was promoted, its databases accept queries,
and the last replayed commit is not after the target time.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from erp_backup.manifest import Manifest
from erp_backup.notify import one_line
from erp_backup.scratch.postgres import ScratchPostgres
from erp_backup.services.base import CheckContext, Checks, RestoreReport
from erp_backup.services.postgres import content as pg_content
from erp_backup.services.postgres import schemas as pg_schemas
from erp_backup.services.postgres.commands import DEFAULT_PORT, PgEndpoint
from erp_backup.services.postgres.content import TableContent


def _read_inventory(endpoint: PgEndpoint, dbname: str) -> tuple[list[TableContent], list[pg_schemas.SchemaMeta]]:
    with endpoint.connect(dbname, autocommit=False) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        pg_content.apply_session_settings(conn)
        actual = pg_content.inventory(conn)
        schemas = pg_schemas.read_schemas(conn)
        conn.rollback()
    return actual, schemas


def check_full_restore(target: str, manifest: Manifest, ctx: CheckContext) -> Checks:
    """Row counts, content hashes and schema grants of every database in the manifest, on the target."""
    endpoint = PgEndpoint.parse(target)
    ctx.guard(endpoint.params.get("host") or "localhost", int(endpoint.params.get("port") or DEFAULT_PORT))
    found = Checks()
    for dbname, entry in sorted(manifest.details.get("databases", {}).items()):
        expected = [TableContent.from_dict(t) for t in entry.get("tables", [])]
        try:
            actual, actual_schemas = _read_inventory(endpoint, dbname)
        except Exception as exc:  # any failure to read is a finding, named with its database
            found.problems.append(f"database {dbname!r}: cannot be read on the scratch target: {one_line(exc)}")
            continue
        mismatches = pg_content.compare(dbname, expected, actual)
        recorded = pg_schemas.recorded(entry)
        if recorded is not None:
            mismatches += pg_schemas.compare(dbname, recorded, actual_schemas)
        found.problems += mismatches
        if not mismatches:
            rows = sum(t.rows for t in expected if t.kind == "r")
            found.checks.append(f"{dbname}: {len(expected)} tables, {rows} rows: row counts and content hashes match"
                                + pg_schemas.checked_text(recorded))
    return found


def _cluster_conninfo(target: ScratchPostgres | str) -> tuple[str, int]:
    if isinstance(target, ScratchPostgres):
        return f"host=127.0.0.1 port={target.port} user=postgres dbname=postgres", target.port
    endpoint = PgEndpoint.parse(target)
    return target, int(endpoint.params.get("port") or DEFAULT_PORT)


def check_point_in_time(target: ScratchPostgres | str, at: datetime, report: RestoreReport, ctx: CheckContext) -> Checks:
    """Promoted, accepting queries, and no commit replayed after `at` (report.details: last_replayed_commit, stop)."""
    conninfo, port = _cluster_conninfo(target)
    ctx.guard("127.0.0.1", port)
    found = Checks()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row: Any = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        databases = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1")]
    if row[0]:
        found.problems.append("the cluster is still in recovery (not promoted)")
    else:
        found.checks.append("recovery finished and the cluster was promoted")
    found.checks.append(f"{len(databases)} databases accept queries: {', '.join(databases)}")
    last = report.details.get("last_replayed_commit")
    if last and datetime.fromisoformat(last) > at:
        found.problems.append(f"last replayed commit {last} is after the target time {at.isoformat()}")
    elif last:
        found.checks.append(f"last replayed commit {last} <= target {at.isoformat()} ({report.details.get('stop')})")
    return found
