"""PostgreSQL restore targets as connection strings: from the command line, and as they may be shown.

A target is a libpq conninfo (``host=... port=... user=...``) or a ``postgresql://``
URL. A password belongs in PGPASSWORD or ~/.pgpass, never on the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from erp_backup.services.base import ConnectionMissing, TargetUsageError, connection_for

log = logging.getLogger(__name__)

TARGET_HELP = ("a libpq conninfo ('host=... port=... user=...') or a postgresql:// URL (password via PGPASSWORD "
               "or ~/.pgpass), or --target-conn <connection id>")


def redact_conninfo(target: str) -> str:
    """A connection string as it may be shown: no password in a URL or a libpq conninfo."""
    if "://" in target:
        parts = urlsplit(target)
        if parts.password is None:
            return target
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit((parts.scheme, f"{user}@{netloc}" if user else netloc, parts.path, parts.query, parts.fragment))
    if "=" in target:
        try:
            params = conninfo_to_dict(target)
        except ProgrammingError:
            return "(unparsable connection string)"
        params.pop("password", None)
        return make_conninfo("", **params)
    return target


def conninfo_of_connection(conn: Any) -> str:
    """A conninfo from an Airflow connection (schema = database, default postgres)."""
    params = {"host": conn.host, "port": conn.port, "user": conn.login, "dbname": conn.schema or "postgres",
              "password": conn.password}
    return make_conninfo("", **{k: str(v) for k, v in params.items() if v})


def conninfo_from_cli(target: str | None, target_conn: str | None, get_connection: Callable[[str], Any]) -> str:
    """The server a full restore goes into, from --target (or, without it, --target-conn)."""
    if target is None and target_conn:
        try:
            return conninfo_of_connection(connection_for(target_conn, get_connection))
        except ConnectionMissing as exc:
            raise TargetUsageError(f"--target-conn: {exc}") from exc
    if not target:
        raise TargetUsageError(f"postgres restores need --target: {TARGET_HELP}")
    try:
        params = conninfo_to_dict(target)
    except ProgrammingError as exc:
        raise TargetUsageError(f"--target is not a PostgreSQL connection string or URL ({TARGET_HELP}): {exc}") from exc
    if "password" in params:
        log.warning("--target contains a password, which other users can see in the process list: "
                    "use PGPASSWORD or ~/.pgpass instead")
    return target
