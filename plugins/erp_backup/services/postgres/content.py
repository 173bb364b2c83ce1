"""PostgreSQL table inventory: row counts and content hashes, per table.

Owns what "the same data" means for PostgreSQL backups. The full backup takes
the inventory inside the transaction whose snapshot pg_dump uses, a restore
recomputes it on the target, and the DR drill compares the two.

- Tables: relkind r (ordinary tables and leaf partitions, read with ONLY) and
  p (partitioned parents), outside pg_catalog, information_schema and pg_toast.
- Content hash: the sum, as an exact numeric, of a 64-bit hash of every row.
  Order-independent and streaming (one aggregate, no sort). Duplicate rows
  count twice. The row hash is hash_record_extended(row, 0), the stable hash
  that hash partitioning relies on (about 3x cheaper than hashing the row's
  text, BENCHMARKS.md). A table with a column type that has no extended hash
  (json, xml, point...) falls back to the first 64 bits of md5(row text). The
  choice depends only on column types, so source and target always agree.
- A partitioned parent is not scanned again: its rows and hash are the sums
  over its leaf partitions (the hash is additive), so each row is read once.
  Foreign-table partitions are not counted.
- Row text depends on session settings, so every session that hashes sets
  SESSION_SETTINGS first; the source and target then agree across clusters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql

# Settings that make the text output of every type identical across clusters.
SESSION_SETTINGS: dict[str, str] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "search_path": "pg_catalog",
}

_LIST_TABLES = """
SELECT c.oid, n.nspname, c.relname, c.relkind
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_toast'
  AND n.nspname !~ '^pg_temp_'
  AND (%(schema)s::text IS NULL OR n.nspname = %(schema)s::text)
ORDER BY n.nspname, c.relname
"""

_LEAF_PARTITIONS = """
SELECT t.relid, n.nspname, c.relname, c.relkind
FROM pg_catalog.pg_partition_tree(%s::oid) t
JOIN pg_catalog.pg_class c ON c.oid = t.relid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE t.isleaf
"""

_TABLE_CONTENT = sql.SQL(
    "SELECT count(*), coalesce(sum(hash_record_extended(ROW(t.*), 0)::numeric), 0) FROM ONLY {}.{} AS t"
)
_TABLE_CONTENT_TEXT = sql.SQL(
    "SELECT count(*), coalesce(sum(('x' || left(md5(ROW(t.*)::text), 16))::bit(64)::bigint::numeric), 0) "
    "FROM ONLY {}.{} AS t"
)


@dataclass(frozen=True)
class TableContent:
    schema: str
    name: str
    kind: str  # "r": table or leaf partition; "p": partitioned parent (sum of its leaves)
    rows: int
    content_hash: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableContent:
        return cls(
            schema=data["schema"], name=data["name"], kind=data["kind"],
            rows=int(data["rows"]), content_hash=str(data["content_hash"]),
        )


class InventoryCancelled(RuntimeError):
    """The inventory was stopped because the dump it accompanies failed."""


def apply_session_settings(conn: psycopg.Connection) -> None:
    """Set SESSION_SETTINGS for the rest of the session (also inside an open transaction)."""
    for name, value in SESSION_SETTINGS.items():
        conn.execute("SELECT pg_catalog.set_config(%s, %s, false)", (name, value))


def list_tables(conn: psycopg.Connection, schema: str | None = None) -> list[tuple[str, str]]:
    """(schema, name) of the tables an inventory covers, optionally of one schema."""
    return [(row[1], row[2]) for row in conn.execute(_LIST_TABLES, {"schema": schema}).fetchall()]


def hash_table(conn: psycopg.Connection, schema: str, name: str) -> tuple[int, int]:
    """(row count, content hash) of one table's own rows."""
    table = (sql.Identifier(schema), sql.Identifier(name))
    try:
        with conn.transaction():  # a savepoint: a type without an extended hash fails only this query
            row = conn.execute(_TABLE_CONTENT.format(*table)).fetchone()
    except psycopg.errors.UndefinedFunction:
        row = conn.execute(_TABLE_CONTENT_TEXT.format(*table)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def inventory(
    conn: psycopg.Connection,
    schema: str | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> list[TableContent]:
    """Every table's rows and content hash (optionally of one schema), sorted by schema and name.

    The caller sets SESSION_SETTINGS (apply_session_settings) and the transaction.
    `cancelled` is checked between tables.
    """
    tables = conn.execute(_LIST_TABLES, {"schema": schema}).fetchall()
    hashed: dict[int, tuple[int, int]] = {}

    def content(oid: int, nspname: str, relname: str) -> tuple[int, int]:
        if oid not in hashed:
            if cancelled():
                raise InventoryCancelled(f"inventory stopped before {nspname}.{relname}")
            hashed[oid] = hash_table(conn, nspname, relname)
        return hashed[oid]

    result = []
    for oid, nspname, relname, relkind in tables:
        if relkind == "r":
            rows, digest = content(oid, nspname, relname)
        else:
            rows = digest = 0
            for leaf_oid, leaf_schema, leaf_name, leaf_kind in conn.execute(_LEAF_PARTITIONS, (oid,)).fetchall():
                if leaf_kind == "r":
                    leaf_rows, leaf_digest = content(leaf_oid, leaf_schema, leaf_name)
                    rows, digest = rows + leaf_rows, digest + leaf_digest
        result.append(TableContent(nspname, relname, relkind, rows, str(digest)))
    return result


def compare(
    label: str, expected: Iterable[TableContent], actual: Iterable[TableContent]
) -> list[str]:
    """Mismatches between two inventories, each naming `label`.schema.table.

    Tables only in `actual` are not mismatches (a target may hold more).
    """
    found = {(t.schema, t.name): t for t in actual}
    problems = []
    for want in expected:
        got = found.get((want.schema, want.name))
        where = f"{label}.{want.qualified}"
        if got is None:
            problems.append(f"{where}: table missing")
        elif got.rows != want.rows:
            problems.append(f"{where}: {got.rows} rows, expected {want.rows}")
        elif got.content_hash != want.content_hash:
            problems.append(f"{where}: content hash {got.content_hash}, expected {want.content_hash} (same row count)")
    return problems
