"""The estate's reference checks read a table of a restored cluster: the same table in every schema that has it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

from erp_backup.scratch.postgres import ScratchPostgres
from erp_backup.services.base import RecordsUnavailable


def _conninfo(target: Any, dbname: str) -> str:
    if isinstance(target, ScratchPostgres):
        return target.conninfo(dbname)
    return psycopg.conninfo.make_conninfo(str(target), dbname=dbname)


def read_records(target: Any, source: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of `source["table"]` in database `source["database"]`, every schema, columns `source["fields"]` values.

    Each row also carries `schema`. A table in no schema gives no rows (a site without documents yet).
    """
    table, database = source.get("table"), source.get("database")
    columns = [str(c) for c in (source.get("fields") or {}).values()]
    if not table or not database or not columns:
        raise RecordsUnavailable(f"postgres records need database, table and fields (got {dict(source)})")
    with psycopg.connect(_conninfo(target, str(database)), autocommit=True) as db:
        schemas = [row[0] for row in db.execute(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = %s ORDER BY 1", (table,))]
        rows: list[dict[str, Any]] = []
        for schema in schemas:
            query = sql.SQL("SELECT {} FROM {}.{}").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in columns), sql.Identifier(schema), sql.Identifier(str(table)))
            cursor = db.execute(query)
            rows += [{"schema": schema, **dict(zip(columns, values, strict=True))} for values in cursor.fetchall()]
    return rows
