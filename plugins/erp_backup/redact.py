"""Connection strings as they may be shown: never a password in a log line, a report or an error."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_target(target: str) -> str:
    """A restore target as it may be shown: no password in a URI or a libpq conninfo."""
    if "://" in target:
        parts = urlsplit(target)
        if parts.password is None:
            return target
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit((parts.scheme, f"{user}@{netloc}" if user else netloc, parts.path, parts.query, parts.fragment))
    if "=" in target:
        try:
            from psycopg.conninfo import conninfo_to_dict, make_conninfo

            params = conninfo_to_dict(target)
        except Exception:
            return "(unparsable connection string)"
        params.pop("password", None)
        return make_conninfo("", **params)
    return target
