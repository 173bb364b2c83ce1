"""Where Milvus and its etcd are: targets from Airflow connections, the Milvus client, and the restore conflict.

`erp_milvus` (role `source`): host is a URI such as http://milvus:19530, or extra
``{"uri": "/path/to/milvus-lite.db"}``; token from the password, or ``login:password``
when a login is set; database from the schema field. `milvus_etcd` (role `etcd`): host
and port of ONE etcd endpoint; login/password for etcd auth (only ever in ETCDCTL_USER);
extra ``cacert``/``cert``/``key`` paths for TLS. Tokens and passwords never appear in a
repr, a message or a URI shown to anyone (`redact_uri`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from erp_backup.services.base import SourceUnavailable

SOURCE_ROLE = "source"
ETCD_ROLE = "etcd"
DEFAULT_MILVUS_PORT = 19530
DEFAULT_ETCD_PORT = 2379


class RestoreConflict(RuntimeError):
    """The restore target already has what we would create; the message says how to proceed."""


@dataclass(frozen=True)
class MilvusTarget:
    uri: str
    token: str = field(default="", repr=False)
    db_name: str = ""

    @property
    def is_local(self) -> bool:
        """milvus-lite: a local .db path instead of a server URI."""
        return "://" not in self.uri

    @property
    def display(self) -> str:
        return redact_uri(self.uri)


def redact_uri(uri: str) -> str:
    """The URI without any user:password@ part."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def milvus_target(conn: Any, conn_id: str) -> MilvusTarget:
    """Where and how to connect, from an Airflow connection."""
    extra = getattr(conn, "extra_dejson", None) or {}
    uri = extra.get("uri") or ""
    if not uri:
        host = (conn.host or "").strip()
        if not host:
            raise ValueError(
                f"connection {conn_id!r}: set host to the Milvus URI (http://host:19530) "
                'or extra {"uri": "/path/to/milvus-lite.db"}'
            )
        uri = host if "://" in host else f"http://{host}:{conn.port or DEFAULT_MILVUS_PORT}"
    password = conn.password or ""
    token = f"{conn.login}:{password}" if conn.login and password else password
    return MilvusTarget(uri=uri, token=token, db_name=conn.schema or extra.get("db_name") or "")


def connect(target: MilvusTarget, conn_id: str | None = None, timeout_s: float = 30.0, must_exist: bool = True) -> Any:
    """A MilvusClient, or SourceUnavailable naming the connection and URI (never the token)."""
    from pymilvus import MilvusClient

    where = f"connection {conn_id!r} ({target.display})" if conn_id else target.display
    if target.is_local and must_exist and not Path(target.uri).exists():
        raise SourceUnavailable(f"Milvus {where}: milvus-lite database {target.uri} does not exist")
    kwargs: dict[str, Any] = {"uri": target.uri, "timeout": timeout_s}
    if target.token:
        kwargs["token"] = target.token
    if target.db_name:
        kwargs["db_name"] = target.db_name
    try:
        return MilvusClient(**kwargs)
    except Exception as exc:
        raise SourceUnavailable(f"Milvus {where} is unreachable: {exc}") from exc


@dataclass(frozen=True)
class EtcdTarget:
    endpoint: str
    user: str = field(default="", repr=False)  # "login:password", only ever in ETCDCTL_USER
    tls_args: tuple[str, ...] = ()

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.endpoint)
        return parts.hostname or "", parts.port or DEFAULT_ETCD_PORT


def etcd_target(conn: Any, conn_id: str) -> EtcdTarget:
    """One etcd endpoint (snapshot save refuses several) and its credentials."""
    extra = getattr(conn, "extra_dejson", None) or {}
    host = (conn.host or "").strip()
    if not host:
        raise ValueError(f"connection {conn_id!r}: set host to one etcd endpoint (host, or http://host:2379)")
    if "," in host:
        raise ValueError(f"connection {conn_id!r}: host must name ONE etcd endpoint, got {host!r}")
    tls_args = tuple(f"--{key}={extra[key]}" for key in ("cacert", "cert", "key") if extra.get(key))
    if "://" in host:
        endpoint = host
    else:
        scheme = "https" if tls_args else "http"
        endpoint = f"{scheme}://{host}:{conn.port or DEFAULT_ETCD_PORT}"
    user = ""
    if conn.login:
        if not conn.password:
            raise ValueError(f"connection {conn_id!r}: login {conn.login!r} is set but the password is empty")
        user = f"{conn.login}:{conn.password}"
    return EtcdTarget(endpoint=endpoint, user=user, tls_args=tls_args)
