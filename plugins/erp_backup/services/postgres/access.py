"""What the backup role cannot read, checked before anything is dumped.

`pg_dump` stops at the first object it may not read, after minutes of work:
`pg_read_all_data` covers tables, sequences and schemas, but not large objects
owned by other roles, nor tables under row-level security. This check runs
first, in every database to back up, and fails naming every object the role lacks:

- a schema without USAGE; a table, partitioned table or sequence without SELECT;
- a table with row-level security the role is not exempt from (not its owner,
  or FORCE ROW LEVEL SECURITY, and no BYPASSRLS): `pg_dump` refuses those;
- a large object the role neither owns (directly or through a role it inherits)
  nor has SELECT on (for itself, PUBLIC or such a role), unless `lo_compat_privileges`;
- role passwords (`pg_authid`) when the role is not a superuser and the plan does
  not set `no_role_passwords`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from erp_backup.services.postgres.commands import PostgresBackupError, SourceServer

log = logging.getLogger(__name__)

MAX_NAMED_PER_DATABASE = 200  # the error names at most this many per database; the log names all

_USER_SCHEMA = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_)'"

_UNREADABLE = f"""
SELECT 'schema ' || pg_catalog.quote_ident(n.nspname) || ' (no USAGE)'
FROM pg_catalog.pg_namespace n
WHERE {_USER_SCHEMA} AND NOT pg_catalog.has_schema_privilege(n.oid, 'USAGE')
UNION ALL
SELECT CASE c.relkind WHEN 'S' THEN 'sequence ' ELSE 'table ' END
       || pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname)
       || ' (no SELECT; owner ' || pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(c.relowner)) || ')'
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE {_USER_SCHEMA} AND c.relkind IN ('r', 'p', 'S') AND NOT pg_catalog.has_table_privilege(c.oid, 'SELECT')
UNION ALL
SELECT 'table ' || pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname)
       || ' (row-level security; needs BYPASSRLS)'
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE {_USER_SCHEMA} AND c.relkind IN ('r', 'p') AND c.relrowsecurity
  AND NOT (SELECT r.rolsuper OR r.rolbypassrls FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)
  AND (c.relforcerowsecurity OR NOT pg_catalog.pg_has_role(c.relowner, 'USAGE'))
UNION ALL
SELECT 'large object ' || m.oid || ' (owner ' || pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(m.lomowner)) || ')'
FROM pg_catalog.pg_largeobject_metadata m
WHERE NOT pg_catalog.current_setting('lo_compat_privileges')::boolean
  AND NOT pg_catalog.pg_has_role(m.lomowner, 'USAGE')
  AND NOT EXISTS (
      SELECT 1 FROM pg_catalog.aclexplode(m.lomacl) a
      WHERE a.privilege_type = 'SELECT' AND (a.grantee = 0 OR pg_catalog.pg_has_role(a.grantee, 'USAGE')))
"""

_ROLE = "SELECT current_user, r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user"


@dataclass(frozen=True)
class Unreadable:
    """The objects of one database (or of the globals, database None) the role cannot read."""

    database: str | None
    objects: list[str]

    def describe(self) -> str:
        where = f"database {self.database!r}" if self.database is not None else "globals"
        named = self.objects[:MAX_NAMED_PER_DATABASE]
        more = len(self.objects) - len(named)
        return f"{where}: " + ", ".join(named) + (f" and {more} more (all in the task log)" if more else "")


def unreadable_objects(source: SourceServer, databases: Iterable[str], *, no_role_passwords: bool) -> list[Unreadable]:
    """Everything the connection's role could not dump, per database (empty: it can read it all)."""
    found: list[Unreadable] = []
    with source.connect(source.maintenance_db, autocommit=True) as admin:
        row = admin.execute(_ROLE).fetchone()
        assert row is not None
        if not row[1] and not no_role_passwords:
            found.append(Unreadable(None, [
                "role passwords (pg_authid, superuser only): set services.postgres.options.no_role_passwords: true"]))
    for dbname in databases:
        with source.connect(dbname, autocommit=True) as conn:
            objects = [text for (text,) in conn.execute(_UNREADABLE).fetchall()]
        if objects:
            found.append(Unreadable(dbname, objects))
    return found


def check_backup_role(source: SourceServer, databases: Iterable[str], *, no_role_passwords: bool) -> None:
    """Raise PostgresBackupError naming every object the role cannot read; nothing is dumped before this."""
    found = unreadable_objects(source, databases, no_role_passwords=no_role_passwords)
    if not found:
        return
    for part in found:
        log.error("backup role %r cannot read, in %s: %s", source.user, part.database or "globals",
                  ", ".join(part.objects))
    count = sum(len(part.objects) for part in found)
    raise PostgresBackupError(
        f"the role {source.user!r} of connection {source.conn_id!r} ({source.address}) cannot read {count} "
        f"object(s) the backup needs, so nothing was dumped: " + "; ".join(part.describe() for part in found)
        + ". Grant it SELECT on them or make it a member of their owners (docs/deployment.md, least privilege)"
    )
