"""Per-schema ownership, grants, comment and default privileges, and the grants of its tables.

Owns what "the same schema" means beside the data (``content.py``): the full backup
records it in the dump's snapshot, a restore and the drill read it again on the
target and compare. Grants are compared as sorted ``grantee=PRIVILEGE`` items
(``*``: grantable; ``PUBLIC`` for the public grantee), with a NULL ACL read as the
owner's defaults (``acldefault``); grantors are not compared.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg


def _grants(acl: str, kind: str, owner: str) -> str:
    """SQL: the sorted text[] of one ACL column (NULL: the owner's default privileges)."""
    source = f"coalesce({acl}, pg_catalog.acldefault({kind}, {owner}))" if kind else acl
    return (
        "(SELECT coalesce(pg_catalog.array_agg(g ORDER BY g), '{}') FROM ("
        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(a.grantee) END"
        " || '=' || a.privilege_type || CASE WHEN a.is_grantable THEN '*' ELSE '' END AS g"
        f" FROM pg_catalog.aclexplode({source}) a) AS grants)"
    )


_SCHEMAS = f"""
SELECT n.oid, n.nspname, pg_catalog.pg_get_userbyid(n.nspowner),
       pg_catalog.obj_description(n.oid, 'pg_namespace'),
       {_grants("n.nspacl", "'n'", "n.nspowner")}
FROM pg_catalog.pg_namespace n
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp_'
  AND (%(schema)s::text IS NULL OR n.nspname = %(schema)s::text)
ORDER BY n.nspname
"""

_DEFAULT_ACLS = f"""
SELECT d.defaclnamespace, pg_catalog.pg_get_userbyid(d.defaclrole) || ' ' || d.defaclobjtype::text || ' '
       || pg_catalog.array_to_string({_grants("d.defaclacl", "", "")}, ',')
FROM pg_catalog.pg_default_acl d WHERE d.defaclnamespace <> 0
"""

_RELATION_KIND = "(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END)::\"char\""
_TABLE_ACLS = f"""
SELECT c.relnamespace, c.relname, {_grants("c.relacl", _RELATION_KIND, "c.relowner")}
FROM pg_catalog.pg_class c WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
"""


@dataclass(frozen=True)
class SchemaMeta:
    """One schema's owner, comment and grants, its default privileges and its relations' grants."""

    name: str
    owner: str
    comment: str | None
    acl: list[str]
    default_acl: list[str] = field(default_factory=list)
    table_acls: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchemaMeta:
        return cls(
            name=data["name"], owner=data["owner"], comment=data.get("comment"), acl=list(data["acl"]),
            default_acl=list(data.get("default_acl", [])),
            table_acls={name: list(grants) for name, grants in data.get("table_acls", {}).items()},
        )


def read_schemas(conn: psycopg.Connection, schema: str | None = None) -> list[SchemaMeta]:
    """Every user schema (or the one named), sorted by name, in the connection's current snapshot."""
    schemas = conn.execute(_SCHEMAS, {"schema": schema}).fetchall()
    default_acls: dict[int, list[str]] = {}
    for oid, text in conn.execute(_DEFAULT_ACLS).fetchall():
        default_acls.setdefault(oid, []).append(text)
    table_acls: dict[int, dict[str, list[str]]] = {}
    for oid, relname, grants in conn.execute(_TABLE_ACLS).fetchall():
        table_acls.setdefault(oid, {})[relname] = list(grants)
    return [
        SchemaMeta(name, owner, comment, list(acl), sorted(default_acls.get(oid, [])), table_acls.get(oid, {}))
        for oid, name, owner, comment, acl in schemas
    ]


def _diff(where: str, what: str, got: Any, want: Any) -> list[str]:
    return [] if got == want else [f"{where}: {what} {got!r}, expected {want!r}"]


def compare(label: str, expected: Iterable[SchemaMeta], actual: Iterable[SchemaMeta]) -> list[str]:
    """Mismatches between recorded and restored schemas, each naming `label`.schema (schemas only in `actual` are fine)."""
    found = {schema.name: schema for schema in actual}
    problems: list[str] = []
    for want in expected:
        where = f"{label}.{want.name}"
        got = found.get(want.name)
        if got is None:
            problems.append(f"{where}: schema missing")
            continue
        problems += _diff(where, "schema owner", got.owner, want.owner)
        problems += _diff(where, "schema comment", got.comment, want.comment)
        problems += _diff(where, "schema grants", got.acl, want.acl)
        problems += _diff(where, "default privileges", got.default_acl, want.default_acl)
        for relation, grants in sorted(want.table_acls.items()):
            problems += _diff(f"{where}.{relation}", "grants", got.table_acls.get(relation), grants)
    return problems


def recorded(entry: dict[str, Any], schema: str | None = None) -> list[SchemaMeta] | None:
    """The schemas a manifest's database entry records (one, if named); None for sets made before they were."""
    if "schemas" not in entry:
        return None
    return [SchemaMeta.from_dict(s) for s in entry["schemas"] if schema is None or s["name"] == schema]


def checked_text(recorded_schemas: list[SchemaMeta] | None) -> str:
    """What a passed check of `recorded_schemas` adds to its database's line."""
    if recorded_schemas is None:
        return " (the set records no schema grants to compare)"
    return (f"; {len(recorded_schemas)} schemas: owner, grants, comment, default privileges "
            f"and table grants match")
