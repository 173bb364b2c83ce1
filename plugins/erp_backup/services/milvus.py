"""Milvus: a logical export of every collection (`full`, weekly) and an etcd snapshot (`etcd`, daily).

Owns how Milvus is backed up, verified and restored. Connections: `erp_milvus`
(role `source`: host is a URI such as http://milvus:19530, or extra
``{"uri": "/path/to/milvus-lite.db"}``; token from the password, or
``login:password`` when a login is set; database from the schema field) and
`milvus_etcd` (role `etcd`: host and port of ONE etcd endpoint; login/password
for etcd auth, passed as ETCDCTL_USER in the environment, never in argv; extra
``cacert``/``cert``/``key`` paths for TLS).

Collection export (`full`)
--------------------------
For each collection: the schema (auto_id, dynamic field flag, functions,
properties), index parameters without runtime counters, partitions and
aliases go into the manifest details; the rows, vectors included, are read
with ``query_iterator(output_fields=["*"])`` one partition at a time and
streamed batch by batch into zstd-compressed parquet files
``collections/<collection>/<partition>/<nnnnn>.parquet`` (SHA-256 computed as
the bytes are written). Dynamic fields go into a ``$meta`` JSON column, JSON
fields into JSON text; function outputs (e.g. BM25 sparse vectors) are not
exported: Milvus regenerates them on insert. Each collection is read at its
own timestamp (pinned by the iterator), not all collections at one instant.

At backup time a fixed sample of rows is used as search queries against the
source; the queries and the top-k ids are recorded, so a restore is checked
against the manifest alone (counts per partition and the same ids). On a
collection written to during the backup, the source search may already see
newer rows: a restore check failure then names the collection and query.

Restore recreates each collection (optionally renamed with a suffix) with its
schema, indexes, properties and partitions, inserts in requests under the
64 MB gRPC limit, flushes, then runs those checks. Aliases are recreated only
when not renamed. Primary keys of auto_id collections are kept by creating the
collection with the property ``allow_insert_auto_id=true`` (recent Milvus
releases; milvus-lite 3.2.2 takes explicit keys even without it) and dropping
that property afterwards if the source did not have it. A server that does not
know the property rejects the keyed inserts: restore with
``keep_primary_keys=False`` there; Milvus then assigns new keys and the search
id check is skipped for those collections. Per-partition counts are checked
with partition statistics (milvus-lite 3.2.2 ignores partition_names in
``count(*)``), the total with ``count(*)``.

Not exported (the backup fails naming the collection and field): binary,
float16, bfloat16 and int8 vectors, and struct array fields; use
zilliztech/milvus-backup for those collections.

Plan options (services.milvus.options): collections (default: all),
batch_size (4096, ≤16384), rows_per_file (0: one file per partition),
parquet_level (3), search_samples (5), search_top_k (10), timeout_s (30);
for etcd: etcdctl, etcd_command_timeout_s (600), compress_level (3).
Restore options: full: suffix, collections, drop_existing, dry_run,
keep_primary_keys, max_request_bytes, read_batch_rows, min_search_overlap
(1.0; lower it for approximate indexes on a real cluster), token, db_name,
timeout_s; etcd: name, peer_url, etcdctl, dry_run.

etcd snapshot (`etcd`)
----------------------
``ETCDCTL_API=3 etcdctl --endpoints=<one> snapshot save`` writes a file, not
stdout: it is saved to a hidden temp file in the set directory, checked with
``snapshot status -w json`` (hash, revision, keys: recorded in the details),
streamed through zstd into ``etcd/snapshot.db.zst`` and removed. We compress
because a bbolt file is mostly free pages and compresses well; the price is
one decompression before ``snapshot restore`` or ``status``. Restore goes into a
new data dir (``etcdctl snapshot restore --data-dir <new>``, a new cluster id);
`erp_backup.scratch.etcd` starts etcd on it for the check.

Why an etcd snapshot and a MinIO copy can disagree
--------------------------------------------------
A Milvus cluster's state is etcd metadata (collections, segments, the paths of
binlog and index files) plus the object data in MinIO. The two are written
independently, and the data coordinator's garbage collection deletes files
that compaction or dropping made obsolete. An etcd snapshot from 02:30 and a
bucket mirror from 03:00 are therefore two different moments: segments flushed
or compacted in between are missing from one side, and GC may already have
deleted files the older snapshot still references (milvus#30620). Restoring
that pair gives collections that fail to load. The daily etcd snapshot alone
is for metadata forensics and for restoring together with a bucket copy taken
in the same cold window; the weekly collection export is the portable backup
that does not depend on either.

Supported procedure for a consistent physical copy (cold):
1. Stop Milvus (every component), or at least pause GC and stop writes:
   ``GET http://<milvus>:9091/management/datacoord/garbage_collection/pause?pause_seconds=<N>``
   (what milvus-backup does; newer versions return a ticket for ``.../resume``),
   or ``dataCoord.enableGarbageCollection: false`` plus a restart.
2. Snapshot etcd (backup_milvus_etcd, or ``etcdctl snapshot save``).
3. Mirror the Milvus bucket (backup_minio_full of that bucket).
4. Restart Milvus, or resume GC.
Restore the pair together: etcd from that snapshot into a new data dir, the
bucket from that mirror, then start Milvus on both.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.parquet as pq

from erp_backup.manifest import DIR_MODE, FileEntry, Manifest
from erp_backup.runner import Command, CommandError, LocalExecutor
from erp_backup.services.base import BackupContext, BackupOutcome, SourceUnavailable
from erp_backup.sets import BackupSet
from erp_backup.stream import Chain, decompress_to, open_chain, stream_to_file

log = logging.getLogger(__name__)

SUPPORTED_TYPES = frozenset({"full", "etcd"})

SOURCE_ROLE = "source"
ETCD_ROLE = "etcd"
DEFAULT_MILVUS_PORT = 19530
DEFAULT_ETCD_PORT = 2379

COLLECTIONS_DIR = "collections"
META_COLUMN = "$meta"
EXPORT_FORMAT = 1
DEFAULT_BATCH_SIZE = 4096
MAX_BATCH_SIZE = 16384
DEFAULT_PARQUET_LEVEL = 3
DEFAULT_SEARCH_SAMPLES = 5
DEFAULT_SEARCH_TOP_K = 10
MAX_REQUEST_BYTES = 64 * 1024 * 1024
REQUEST_HEADROOM = 0.5  # arrow sizes underestimate the gRPC encoding; stay at half the limit
RUNTIME_INDEX_KEYS = frozenset(
    {"total_rows", "indexed_rows", "pending_index_rows", "state", "index_state_fail_reason", "fail_reason"}
)
ALLOW_INSERT_AUTO_ID = "allow_insert_auto_id"

SNAPSHOT_FILE = "etcd/snapshot.db.zst"
SNAPSHOT_TEMP = ".etcd-snapshot.db"
DEFAULT_ETCD_COMMAND_TIMEOUT_S = 600  # etcdctl's default of 5 s would cut a large snapshot short
DEFAULT_ETCD_MEMBER = "default"
DEFAULT_ETCD_PEER_URL = "http://localhost:2380"
READ_CHUNK = 1 << 20

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_UNREACHABLE_HINTS = ("context deadline exceeded", "connection refused", "no such host", "unavailable")


class UnsupportedCollection(ValueError):
    """A collection uses a field type the export cannot carry; the message names collection and field."""


class RestoreConflict(RuntimeError):
    """The restore target already has what we would create; the message says how to proceed."""


class RestoreCheckFailed(RuntimeError):
    """A restore finished but its checks failed. `report` has the details."""

    def __init__(self, problems: list[str], report: dict[str, Any], where: str = "restore"):
        self.problems, self.report = problems, report
        super().__init__(f"{where}: checks failed:\n- " + "\n- ".join(problems))


# ───────────────────────── connections ─────────────────────────


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


# ───────────────────────── etcd commands ─────────────────────────


def etcdctl_env(target: EtcdTarget | None = None) -> dict[str, str]:
    env = {"ETCDCTL_API": "3"}
    if target is not None and target.user:
        env["ETCDCTL_USER"] = target.user
    return env


def snapshot_save_command(
    target: EtcdTarget, path: Path, etcdctl: str = "etcdctl", command_timeout_s: int = DEFAULT_ETCD_COMMAND_TIMEOUT_S
) -> Command:
    return Command(
        (
            etcdctl,
            f"--endpoints={target.endpoint}",
            *target.tls_args,
            "--dial-timeout=10s",
            f"--command-timeout={command_timeout_s}s",
            "snapshot", "save", str(path),
        ),
        env=etcdctl_env(target),
    )


def snapshot_status_command(path: Path, etcdctl: str = "etcdctl") -> Command:
    return Command((etcdctl, "snapshot", "status", str(path), "--write-out=json"), env=etcdctl_env())


def snapshot_restore_command(
    path: Path,
    data_dir: Path,
    etcdctl: str = "etcdctl",
    name: str = DEFAULT_ETCD_MEMBER,
    peer_url: str = DEFAULT_ETCD_PEER_URL,
) -> Command:
    return Command(
        (
            etcdctl, "snapshot", "restore", str(path),
            "--data-dir", str(data_dir),
            "--name", name,
            "--initial-cluster", f"{name}={peer_url}",
            "--initial-advertise-peer-urls", peer_url,
        ),
        env=etcdctl_env(),
    )


def etcdctl_version_command(etcdctl: str = "etcdctl") -> Command:
    return Command((etcdctl, "version"), env=etcdctl_env())


def parse_snapshot_status(output: bytes) -> dict[str, int]:
    """`snapshot status -w json` → {"hash", "revision", "total_keys", "total_size"}."""
    data = json.loads(output)
    return {
        "hash": int(data["hash"]),
        "revision": int(data["revision"]),
        "total_keys": int(data["totalKey"]),
        "total_size": int(data["totalSize"]),
    }


def parse_etcdctl_version(output: bytes) -> str:
    for line in output.decode(errors="replace").splitlines():
        if line.startswith("etcdctl version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# ───────────────────────── collection definitions ─────────────────────────


def _default_value(value: Any) -> Any:
    """A protobuf ValueField (as describe_collection returns it) → a plain JSON value."""
    if value is None or not hasattr(value, "WhichOneof"):
        return value
    kind = value.WhichOneof("data")
    if kind is None:
        return None
    if kind == "bytes_data":
        raise UnsupportedCollection("binary default values are not supported by the export")
    return getattr(value, kind)


def _field_definition(collection: str, raw: dict[str, Any]) -> dict[str, Any]:
    from pymilvus import DataType

    definition: dict[str, Any] = {
        "name": raw["name"],
        "type": int(raw["type"]),
        "description": raw.get("description") or "",
        "params": dict(raw.get("params") or {}),
    }
    for flag in ("is_primary", "auto_id", "is_partition_key", "is_clustering_key", "nullable", "is_function_output"):
        if raw.get(flag):
            definition[flag] = True
    if raw.get("element_type") and int(raw["element_type"]) != int(DataType.NONE):
        definition["element_type"] = int(raw["element_type"])
    if raw.get("default_value") is not None:
        try:
            definition["default_value"] = _default_value(raw["default_value"])
        except UnsupportedCollection as exc:
            raise UnsupportedCollection(f"collection {collection!r}, field {raw['name']!r}: {exc}") from None
    if raw.get("external_field"):
        definition["external_field"] = raw["external_field"]
    return definition


def clean_index(described: dict[str, Any]) -> dict[str, Any]:
    """describe_index output → reusable index parameters (runtime counters and state removed)."""
    info = {key: value for key, value in described.items() if key not in RUNTIME_INDEX_KEYS}
    field_name = info.pop("field_name")
    index_name = info.pop("index_name", "") or field_name
    index_type = info.pop("index_type", "") or ""
    metric_type = info.pop("metric_type", None)
    params = dict(info.pop("params", None) or {})
    params.update(info)
    return {
        "field_name": field_name,
        "index_name": index_name,
        "index_type": index_type,
        "metric_type": None if metric_type in (None, "", "NONE") else metric_type,
        "params": params,
    }


def collection_definition(
    described: dict[str, Any], indexes: list[dict[str, Any]], partitions: list[str], aliases: list[str]
) -> dict[str, Any]:
    """Everything needed to recreate a collection, as plain JSON (for the manifest)."""
    name = described["collection_name"]
    if described.get("struct_array_fields") or described.get("struct_fields"):
        raise UnsupportedCollection(
            f"collection {name!r} has struct array fields, which the export cannot carry; use milvus-backup"
        )
    # the hidden $meta field of a dynamic schema is implied by enable_dynamic_field
    fields = [_field_definition(name, raw) for raw in described["fields"] if not raw.get("is_dynamic")]
    partition_key = any(f.get("is_partition_key") for f in fields)
    definition: dict[str, Any] = {
        "name": name,
        "description": described.get("description") or "",
        "auto_id": bool(described.get("auto_id")),
        "enable_dynamic_field": bool(described.get("enable_dynamic_field")),
        "fields": fields,
        "functions": [
            {
                "name": fn["name"],
                "type": int(fn["type"]),
                "description": fn.get("description") or "",
                "input_field_names": list(fn.get("input_field_names") or []),
                "output_field_names": list(fn.get("output_field_names") or []),
                "params": dict(fn.get("params") or {}),
            }
            for fn in described.get("functions") or []
        ],
        "properties": {str(key): str(value) for key, value in (described.get("properties") or {}).items()},
        "consistency_level": described.get("consistency_level_name") or described.get("consistency_level"),
        "num_shards": described.get("num_shards"),
        "partition_key": partition_key,
        "num_partitions": described.get("num_partitions") if partition_key else None,
        "indexes": indexes,
        "partitions": list(partitions),
        "aliases": sorted(aliases),
    }
    arrow_layout(definition)  # fail now, naming the field, rather than mid-export
    return definition


def primary_field(definition: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in definition["fields"] if f.get("is_primary"))


def schema_from_definition(definition: dict[str, Any]) -> Any:
    """The pymilvus CollectionSchema for a recorded definition."""
    from pymilvus import CollectionSchema, DataType, FieldSchema, Function, FunctionType

    fields = []
    for raw in definition["fields"]:
        kwargs: dict[str, Any] = dict(raw.get("params") or {})
        for flag in ("is_primary", "auto_id", "is_partition_key", "is_clustering_key", "nullable"):
            if raw.get(flag):
                kwargs[flag] = True
        if "element_type" in raw:
            kwargs["element_type"] = DataType(raw["element_type"])
        if "default_value" in raw:
            kwargs["default_value"] = raw["default_value"]
        if raw.get("external_field"):
            kwargs["external_field"] = raw["external_field"]
        fields.append(FieldSchema(raw["name"], DataType(raw["type"]), raw.get("description", ""), **kwargs))
    functions = [
        Function(
            fn["name"], FunctionType(fn["type"]), fn["input_field_names"], fn["output_field_names"],
            fn.get("description", ""), fn.get("params") or {},
        )
        for fn in definition["functions"]
    ]
    return CollectionSchema(
        fields,
        description=definition.get("description", ""),
        functions=functions,
        enable_dynamic_field=definition["enable_dynamic_field"],
        auto_id=definition["auto_id"],
    )


def index_params_from_definition(definition: dict[str, Any]) -> Any:
    from pymilvus.milvus_client.index import IndexParams

    params = IndexParams()
    for index in definition["indexes"]:
        kwargs: dict[str, Any] = {}
        if index.get("metric_type"):
            kwargs["metric_type"] = index["metric_type"]
        if index.get("params"):
            kwargs["params"] = dict(index["params"])
        params.add_index(
            field_name=index["field_name"], index_type=index.get("index_type", ""),
            index_name=index.get("index_name", ""), **kwargs,
        )
    return params


# ───────────────────────── rows ⇄ arrow ─────────────────────────


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # plain | json | float_vector | sparse | meta
    arrow_type: pa.DataType
    dim: int = 0


@dataclass(frozen=True)
class Layout:
    """How one collection's rows map to parquet columns."""

    columns: tuple[Column, ...]
    known_names: frozenset[str]  # schema fields (incl. function outputs): not dynamic
    dynamic: bool

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow_type, nullable=True) for c in self.columns])

    @property
    def vector_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.kind == "float_vector"]


def _plain_arrow_types() -> dict[int, pa.DataType]:
    from pymilvus import DataType

    return {
        int(DataType.BOOL): pa.bool_(),
        int(DataType.INT8): pa.int8(),
        int(DataType.INT16): pa.int16(),
        int(DataType.INT32): pa.int32(),
        int(DataType.INT64): pa.int64(),
        int(DataType.FLOAT): pa.float32(),
        int(DataType.DOUBLE): pa.float64(),
        int(DataType.STRING): pa.string(),
        int(DataType.VARCHAR): pa.string(),
        int(DataType.TEXT): pa.string(),
        int(DataType.GEOMETRY): pa.string(),  # WKT
        int(DataType.TIMESTAMPTZ): pa.string(),  # ISO 8601
    }


def arrow_layout(definition: dict[str, Any]) -> Layout:
    from pymilvus import DataType

    plain = _plain_arrow_types()
    columns: list[Column] = []
    for raw in definition["fields"]:
        if raw.get("is_function_output"):
            continue  # regenerated by Milvus from the function's input on insert
        name, dtype = raw["name"], raw["type"]
        if dtype in plain:
            columns.append(Column(name, "plain", plain[dtype]))
        elif dtype == DataType.JSON:
            columns.append(Column(name, "json", pa.string()))
        elif dtype == DataType.ARRAY and raw.get("element_type") in plain:
            columns.append(Column(name, "plain", pa.list_(plain[raw["element_type"]])))
        elif dtype == DataType.FLOAT_VECTOR:
            dim = int(raw["params"]["dim"])
            columns.append(Column(name, "float_vector", pa.list_(pa.float32(), dim), dim))
        elif dtype == DataType.SPARSE_FLOAT_VECTOR:
            columns.append(Column(name, "sparse", pa.map_(pa.int64(), pa.float32())))
        else:
            raise UnsupportedCollection(
                f"collection {definition['name']!r}: field {name!r} has type {DataType(dtype).name}, "
                "which the collection export cannot carry; back this collection up with milvus-backup"
            )
    if definition["enable_dynamic_field"]:
        columns.append(Column(META_COLUMN, "meta", pa.string()))
    known = frozenset(raw["name"] for raw in definition["fields"]) | {META_COLUMN}
    return Layout(tuple(columns), known, definition["enable_dynamic_field"])


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _dynamic_values(row: dict[str, Any], layout: Layout) -> str | None:
    extra = {key: value for key, value in row.items() if key not in layout.known_names}
    nested = row.get(META_COLUMN)
    if isinstance(nested, dict):
        extra = {**nested, **extra}
    return _json_text(extra) if extra else None


def _float_vectors(values: list[Any], column: Column) -> pa.Array:
    import numpy as np

    if not values or any(value is None for value in values):
        return pa.array(values, type=column.arrow_type)
    matrix = np.asarray(values, dtype=np.float32).reshape(len(values), -1)
    if matrix.shape[1] != column.dim:
        raise ValueError(f"field {column.name!r}: got vectors of dim {matrix.shape[1]}, schema says {column.dim}")
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel(), type=pa.float32()), column.dim)


def rows_to_batch(rows: list[dict[str, Any]], layout: Layout) -> pa.RecordBatch:
    """Query-iterator rows → one arrow record batch in the layout's schema."""
    arrays = []
    for column in layout.columns:
        if column.kind == "meta":
            arrays.append(pa.array([_dynamic_values(row, layout) for row in rows], type=pa.string()))
            continue
        values = [row.get(column.name) for row in rows]
        if column.kind == "json":
            arrays.append(pa.array([_json_text(v) for v in values], type=pa.string()))
        elif column.kind == "float_vector":
            arrays.append(_float_vectors(values, column))
        elif column.kind == "sparse":
            pairs = [None if v is None else sorted((int(k), float(x)) for k, x in dict(v).items()) for v in values]
            arrays.append(pa.array(pairs, type=column.arrow_type))
        else:
            arrays.append(pa.array(values, type=column.arrow_type))
    return pa.RecordBatch.from_arrays(arrays, schema=layout.schema)


def batch_to_rows(batch: pa.RecordBatch, layout: Layout, skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """An exported record batch → rows for `insert` (dynamic keys merged back, JSON parsed)."""
    columns: dict[str, list[Any]] = {}
    for column in layout.columns:
        if column.name in skip:
            continue
        values = batch.column(column.name).to_pylist()
        if column.kind in ("json", "meta"):
            values = [None if v is None else json.loads(v) for v in values]
        elif column.kind == "sparse":
            values = [None if v is None else dict(v) for v in values]
        columns[column.name] = values
    metas = columns.pop(META_COLUMN, None)
    names = list(columns)
    rows = [dict(zip(names, values)) for values in zip(*columns.values())] if names else [
        {} for _ in range(batch.num_rows)
    ]
    if metas is not None:
        for row, meta in zip(rows, metas):
            if meta:
                row.update(meta)
    return rows


def rows_per_request(batch_bytes: int, num_rows: int, max_request_bytes: int = MAX_REQUEST_BYTES) -> int:
    """How many rows of a batch fit one insert request, with headroom for the gRPC encoding."""
    if num_rows <= 0:
        return 1
    per_row = max(1.0, batch_bytes / num_rows)
    return max(1, min(num_rows, math.floor(max_request_bytes * REQUEST_HEADROOM / per_row)))


# ───────────────────────── parquet through the stream chain ─────────────────────────


class ChainFile:
    """A write-only file object over an `erp_backup.stream` chain, for pyarrow's ParquetWriter."""

    def __init__(self, chain: Chain):
        self._chain = chain
        self._position = 0
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._chain.write(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        """Nothing to do: the chain's sink flushes and fsyncs on finish."""

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


@dataclass
class ExportedFile:
    entry: FileEntry
    rows: int


def _private_dirs(set_dir: Path, relative: str) -> None:
    """Create set_dir/relative with every level 0700 (mkdir(parents=True) leaves parents at the umask)."""
    current = set_dir
    for part in Path(relative).parts:
        current = current / part
        current.mkdir(mode=DIR_MODE, exist_ok=True)


class PartitionFiles:
    """Writes one partition's batches to parquet files, starting a new file every `rows_per_file` rows."""

    def __init__(self, set_dir: Path, rel_dir: str, schema: pa.Schema, vector_columns: list[str],
                 level: int, rows_per_file: int):
        self.set_dir, self.rel_dir, self.schema = set_dir, rel_dir, schema
        self.vector_columns, self.level, self.rows_per_file = vector_columns, level, rows_per_file
        self.done: list[ExportedFile] = []
        self._chain: Chain | None = None
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        self._open()

    def _open(self) -> None:
        _private_dirs(self.set_dir, self.rel_dir)
        relative = f"{self.rel_dir}/{len(self.done):05d}.parquet"
        self._chain = open_chain(self.set_dir, relative, compress=False)  # parquet is zstd inside
        dictionary = [name for name in self.schema.names if name not in self.vector_columns]
        self._writer = pq.ParquetWriter(
            ChainFile(self._chain), self.schema,
            compression="zstd", compression_level=self.level,
            use_dictionary=dictionary,
            # float bytes split into streams compress ~10% better; names are parquet leaf paths
            use_byte_stream_split=[f"{name}.list.element" for name in self.vector_columns] or False,
            write_page_checksum=True,
        )
        self._rows = 0

    def _close_current(self) -> None:
        assert self._writer is not None and self._chain is not None
        self._writer.close()
        result = self._chain.finish()
        self.done.append(ExportedFile(result.entry, self._rows))
        self._writer = self._chain = None

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self.rows_per_file and self._rows >= self.rows_per_file:
                self._close_current()
                self._open()
            room = self.rows_per_file - self._rows if self.rows_per_file else batch.num_rows
            part = batch.slice(0, room)
            assert self._writer is not None
            self._writer.write_batch(part)
            self._rows += part.num_rows
            batch = batch.slice(part.num_rows)

    def finish(self) -> list[ExportedFile]:
        self._close_current()
        return self.done

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # the chain is being discarded anyway
                pass
        if self._chain is not None:
            self._chain.abort()
        for exported in self.done:
            (self.set_dir / exported.entry.path).unlink(missing_ok=True)


# ───────────────────────── backup: collection export ─────────────────────────


@dataclass(frozen=True)
class ExportSettings:
    collections: tuple[str, ...] | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    rows_per_file: int = 0  # 0: one file per partition
    parquet_level: int = DEFAULT_PARQUET_LEVEL
    search_samples: int = DEFAULT_SEARCH_SAMPLES
    search_top_k: int = DEFAULT_SEARCH_TOP_K
    timeout_s: float = 30.0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ExportSettings:
        def number(key: str, default: int, low: int, high: int) -> int:
            value = options.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"services.milvus.options.{key} must be an integer in [{low}, {high}], got {value!r}")
            return value

        collections = options.get("collections")
        if collections is not None and not (isinstance(collections, list) and all(isinstance(c, str) for c in collections)):
            raise ValueError(f"services.milvus.options.collections must be a list of names, got {collections!r}")
        return cls(
            collections=tuple(collections) if collections is not None else None,
            batch_size=number("batch_size", DEFAULT_BATCH_SIZE, 1, MAX_BATCH_SIZE),
            rows_per_file=number("rows_per_file", 0, 0, 1 << 40),
            parquet_level=number("parquet_level", DEFAULT_PARQUET_LEVEL, 1, 22),
            search_samples=number("search_samples", DEFAULT_SEARCH_SAMPLES, 0, 100),
            search_top_k=number("search_top_k", DEFAULT_SEARCH_TOP_K, 1, 1000),
            timeout_s=float(options.get("timeout_s", 30.0)),
        )


def path_component(name: str, index: int, prefix: str) -> str:
    """A file-system-safe directory name for a collection or partition ('~' never occurs in a safe name)."""
    return name if _SAFE_NAME.match(name) else f"~{prefix}{index:04d}"


class QuerySampler:
    """Keeps every `stride`-th exported row's vectors as search queries, up to `wanted`."""

    def __init__(self, vector_fields: list[str], wanted: int, expected_rows: int):
        self.vector_fields, self.wanted = vector_fields, wanted
        self.stride = max(1, expected_rows // max(wanted, 1))
        self.seen = 0
        self.queries: dict[str, list[list[float]]] = {name: [] for name in vector_fields}
        self.taken = 0

    def offer(self, rows: list[dict[str, Any]]) -> None:
        if self.vector_fields and self.taken < self.wanted:
            first = (-self.seen) % self.stride
            for offset in range(first, len(rows), self.stride):
                if self.taken >= self.wanted:
                    break
                row = rows[offset]
                if all(row.get(name) is not None for name in self.vector_fields):
                    for name in self.vector_fields:
                        self.queries[name].append([float(x) for x in row[name]])
                    self.taken += 1
        self.seen += len(rows)


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


def _search_ids(client: Any, collection: str, field_name: str, metric: str, queries: list[list[float]],
                top_k: int, pk_name: str) -> list[list[Any]]:
    results = client.search(
        collection, data=queries, anns_field=field_name, limit=top_k,
        search_params={"metric_type": metric}, output_fields=[pk_name], consistency_level="Strong",
    )
    return [[hit.id for hit in hits] for hits in results]


def export_collection(
    client: Any, name: str, set_dir: Path, index: int, settings: ExportSettings
) -> tuple[list[FileEntry], dict[str, Any]]:
    """Export one collection: definition and searches into details, rows into parquet files."""
    started = time.monotonic()
    loaded_for_export = _ensure_loaded(client, name)
    try:
        files, details = _export_loaded_collection(client, name, set_dir, index, settings)
    finally:
        if loaded_for_export:
            log.info("releasing %s again: it was loaded only for the export", name)
            client.release_collection(name)
    details["loaded_for_export"] = loaded_for_export
    details["seconds"] = round(time.monotonic() - started, 3)
    return files, details


def _ensure_loaded(client: Any, name: str) -> bool:
    """Load a released collection (query_iterator needs it). True if we loaded it."""
    from pymilvus.client.types import LoadState

    if client.get_load_state(name).get("state") == LoadState.Loaded:
        return False
    log.info("loading %s for the export (it was not loaded)", name)
    try:
        client.load_collection(name)
    except Exception as exc:
        raise RuntimeError(
            f"collection {name!r} is not loaded and cannot be loaded for the export ({exc}); "
            "it usually lacks an index on a vector field"
        ) from exc
    return True


def _export_loaded_collection(
    client: Any, name: str, set_dir: Path, index: int, settings: ExportSettings
) -> tuple[list[FileEntry], dict[str, Any]]:
    from pymilvus import DataType

    indexes = [clean_index(client.describe_index(name, index_name)) for index_name in client.list_indexes(name)]
    aliases = client.list_aliases(collection_name=name).get("aliases", [])
    definition = collection_definition(client.describe_collection(name), indexes, client.list_partitions(name), aliases)
    layout = arrow_layout(definition)
    metrics = {i["field_name"]: i["metric_type"] for i in indexes if i.get("metric_type")}
    vector_fields = [
        f["name"] for f in definition["fields"]
        if f["type"] == int(DataType.FLOAT_VECTOR) and f["name"] in metrics
    ]
    expected_rows = int(client.get_collection_stats(name).get("row_count", 0))
    sampler = QuerySampler(vector_fields, settings.search_samples, expected_rows)
    collection_dir = f"{COLLECTIONS_DIR}/{path_component(name, index, 'c')}"
    schema = layout.schema.with_metadata({"milvus.collection": name, "erp_backup.format": str(EXPORT_FORMAT)})

    files: list[FileEntry] = []
    partitions = []
    for position, partition in enumerate(definition["partitions"]):
        writer = PartitionFiles(
            set_dir, f"{collection_dir}/{path_component(partition, position, 'p')}",
            schema.with_metadata({**schema.metadata, b"milvus.partition": partition.encode()}),
            layout.vector_columns, settings.parquet_level, settings.rows_per_file,
        )
        iterator = client.query_iterator(
            name, batch_size=settings.batch_size, output_fields=["*"], partition_names=[partition]
        )
        try:
            while rows := iterator.next():
                writer.write(rows_to_batch(rows, layout))
                sampler.offer(rows)
            exported = writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            iterator.close()
        rows_total = sum(f.rows for f in exported)
        partitions.append({
            "name": partition,
            "rows": rows_total,
            "files": [{"path": f.entry.path, "rows": f.rows} for f in exported],
        })
        files.extend(f.entry for f in exported)
        log.info("milvus %s/%s: %d rows exported", name, partition, rows_total)

    pk_name = primary_field(definition)["name"]
    searches = []
    for field_name in vector_fields:
        queries = sampler.queries[field_name]
        if queries:
            searches.append({
                "field": field_name,
                "metric_type": metrics[field_name],
                "top_k": settings.search_top_k,
                "queries": queries,
                "expected_ids": _search_ids(
                    client, name, field_name, metrics[field_name], queries, settings.search_top_k, pk_name
                ),
            })
    details = {
        "definition": definition,
        "partitions": partitions,
        "rows": sum(p["rows"] for p in partitions),
        "searches": searches,
    }
    return files, details


def backup_full(ctx: BackupContext) -> BackupOutcome:
    import pymilvus

    conn_id = ctx.conn_id(SOURCE_ROLE)
    target = milvus_target(ctx.connection(SOURCE_ROLE), conn_id)
    settings = ExportSettings.from_options(ctx.options)
    client = connect(target, conn_id, settings.timeout_s)
    started = time.monotonic()
    try:
        try:
            server_version = str(client.get_server_version())
        except Exception:  # milvus-lite and old servers may not say
            server_version = "unknown"
        names = sorted(client.list_collections())
        if settings.collections is not None:
            missing = sorted(set(settings.collections) - set(names))
            if missing:
                raise ValueError(
                    f"services.milvus.options.collections names {missing} which connection {conn_id!r} "
                    f"({target.display}) does not have"
                )
            names = [n for n in names if n in settings.collections]
        files: list[FileEntry] = []
        collections: dict[str, Any] = {}
        for index, name in enumerate(names):
            collection_files, collections[name] = export_collection(client, name, ctx.set_dir, index, settings)
            files.extend(collection_files)
    finally:
        client.close()
    details = {
        "kind": "collection_export",
        "format": EXPORT_FORMAT,
        "row_format": "parquet (zstd)",
        "db_name": target.db_name or "default",
        "collections": collections,
        "rows": sum(c["rows"] for c in collections.values()),
        "seconds": round(time.monotonic() - started, 3),
    }
    return BackupOutcome(
        files=files,
        source={"conn_id": conn_id, "uri": target.display, "db_name": target.db_name or "default"},
        tools={"pymilvus": pymilvus.__version__, "pyarrow": pa.__version__, "milvus": server_version},
        details=details,
    )


# ───────────────────────── backup: etcd snapshot ─────────────────────────


def _ensure_reachable(target: EtcdTarget, conn_id: str, timeout_s: float = 5.0) -> None:
    host, port = target.host_port
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise SourceUnavailable(f"etcd connection {conn_id!r} ({target.endpoint}) is unreachable: {exc}") from exc


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            yield chunk


def backup_etcd(ctx: BackupContext) -> BackupOutcome:
    conn_id = ctx.conn_id(ETCD_ROLE)
    target = etcd_target(ctx.connection(ETCD_ROLE), conn_id)
    etcdctl = ctx.options.get("etcdctl", "etcdctl")
    command_timeout = int(ctx.options.get("etcd_command_timeout_s", DEFAULT_ETCD_COMMAND_TIMEOUT_S))
    level = int(ctx.options.get("compress_level", 3))
    executor = LocalExecutor()
    _ensure_reachable(target, conn_id)
    temp = ctx.set_dir / SNAPSHOT_TEMP
    try:
        started = time.monotonic()
        try:
            executor.run(snapshot_save_command(target, temp, etcdctl, command_timeout), timeout=command_timeout + 60)
        except CommandError as exc:
            if any(hint in exc.stderr.lower() for hint in _UNREACHABLE_HINTS):
                raise SourceUnavailable(
                    f"etcd connection {conn_id!r} ({target.endpoint}) did not serve a snapshot: {exc}"
                ) from exc
            raise
        save_seconds = time.monotonic() - started
        status = parse_snapshot_status(executor.run(snapshot_status_command(temp, etcdctl)))
        result = stream_to_file(_file_chunks(temp), ctx.set_dir, SNAPSHOT_FILE, compress=True, level=level)
        version = parse_etcdctl_version(executor.run(etcdctl_version_command(etcdctl)))
    finally:
        temp.unlink(missing_ok=True)
        temp.with_name(temp.name + ".part").unlink(missing_ok=True)
    log.info(
        "etcd snapshot of %s: revision %d, %d keys, %d bytes → %d compressed",
        target.endpoint, status["revision"], status["total_keys"], result.raw_bytes, result.entry.size,
    )
    return BackupOutcome(
        files=[result.entry],
        source={"conn_id": conn_id, "endpoint": target.endpoint},
        tools={"etcdctl": version},
        details={
            "kind": "etcd_snapshot",
            "file": SNAPSHOT_FILE,
            "compression": "zstd",
            "snapshot": status,
            "raw_bytes": result.raw_bytes,
            "save_seconds": round(save_seconds, 3),
            "compress_seconds": round(result.seconds, 3),
        },
    )


# ───────────────────────── verify ─────────────────────────


def verify_full(backup_set: BackupSet, manifest: Manifest) -> list[str]:
    """Every parquet file reads back completely (page checksums on) with the recorded row counts."""
    problems: list[str] = []
    listed = {entry.path for entry in manifest.files}
    collections = manifest.details.get("collections")
    if not isinstance(collections, dict):
        return [f"backup {backup_set.key}: manifest details have no 'collections'"]
    for name, collection in collections.items():
        try:
            expected_columns = arrow_layout(collection["definition"]).schema.names
        except (KeyError, UnsupportedCollection) as exc:
            problems.append(f"backup {backup_set.key}: collection {name!r} has an unusable definition: {exc!r}")
            continue
        for partition in collection["partitions"]:
            counted = 0
            for recorded in partition["files"]:
                relative = recorded["path"]
                if relative not in listed:
                    problems.append(f"backup {backup_set.key}: {relative} is in the details but not in the file list")
                try:
                    with pq.ParquetFile(backup_set.path / relative, page_checksum_verification=True) as parquet:
                        if parquet.schema_arrow.names != expected_columns:
                            problems.append(
                                f"backup {backup_set.key}: {relative} has columns {parquet.schema_arrow.names}, "
                                f"expected {expected_columns}"
                            )
                        rows = sum(batch.num_rows for batch in parquet.iter_batches(batch_size=65536))
                except Exception as exc:
                    problems.append(f"backup {backup_set.key}: {relative} is not a readable parquet file: {exc}")
                    continue
                if rows != recorded["rows"]:
                    problems.append(
                        f"backup {backup_set.key}: {relative} holds {rows} rows, the manifest says {recorded['rows']}"
                    )
                counted += rows
            if counted != partition["rows"]:
                problems.append(
                    f"backup {backup_set.key}: {name}/{partition['name']} has {counted} readable rows, "
                    f"the manifest says {partition['rows']}"
                )
    return problems


def _snapshot_status_of(compressed: Path, workdir: Path, etcdctl: str) -> tuple[Path, dict[str, int]]:
    raw = workdir / "snapshot.db"
    decompress_to(compressed, raw)
    return raw, parse_snapshot_status(LocalExecutor().run(snapshot_status_command(raw, etcdctl)))


def _status_mismatches(key: str, recorded: dict[str, Any], actual: dict[str, int]) -> list[str]:
    return [
        f"backup {key}: snapshot {name} is {actual[name]}, the manifest says {recorded.get(name)}"
        for name in ("hash", "revision", "total_keys")
        if actual[name] != recorded.get(name)
    ]


def verify_etcd(backup_set: BackupSet, manifest: Manifest, etcdctl: str = "etcdctl") -> list[str]:
    """The decompressed snapshot's `etcdctl snapshot status` matches the recorded hash, revision and keys."""
    recorded = manifest.details.get("snapshot") or {}
    relative = manifest.details.get("file", SNAPSHOT_FILE)
    with tempfile.TemporaryDirectory(prefix=f".{backup_set.backup_id}-verify-", dir=backup_set.path.parent) as work:
        try:
            _, status = _snapshot_status_of(backup_set.path / relative, Path(work), etcdctl)
        except Exception as exc:
            return [f"backup {backup_set.key}: {relative} is not a readable etcd snapshot: {exc}"]
    return _status_mismatches(backup_set.key, recorded, status)


# ───────────────────────── restore: collections ─────────────────────────


@dataclass(frozen=True)
class RestoreSettings:
    suffix: str = ""
    collections: tuple[str, ...] | None = None
    drop_existing: bool = False
    dry_run: bool = False
    keep_primary_keys: bool = True
    max_request_bytes: int = MAX_REQUEST_BYTES
    read_batch_rows: int = DEFAULT_BATCH_SIZE
    min_search_overlap: float = 1.0
    token: str = field(default="", repr=False)
    db_name: str = ""
    timeout_s: float = 30.0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RestoreSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown Milvus restore option(s) {unknown} (known: {', '.join(sorted(known))})")
        values = dict(options)
        if values.get("collections") is not None:
            values["collections"] = tuple(values["collections"])
        return cls(**values)


def _count_rows(client: Any, collection: str) -> int:
    result = client.query(collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(result[0]["count(*)"])


def _partition_rows(client: Any, collection: str, partition: str) -> int:
    """Rows in one partition from its statistics (exact after flush on a fresh collection).

    Not count(*) with partition_names: milvus-lite 3.2.2 ignores partition_names there.
    """
    return int(client.get_partition_stats(collection, partition)["row_count"])


def _insert_file(client: Any, target_name: str, path: Path, layout: Layout, partition: str | None,
                 skip: frozenset[str], settings: RestoreSettings) -> int:
    inserted = 0
    kwargs = {"partition_name": partition} if partition else {}
    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(batch_size=settings.read_batch_rows):
            step = rows_per_request(batch.nbytes, batch.num_rows, settings.max_request_bytes)
            for start in range(0, batch.num_rows, step):
                rows = batch_to_rows(batch.slice(start, step), layout, skip)
                client.insert(target_name, rows, **kwargs)
                inserted += len(rows)
    return inserted


def _restore_collection(
    client: Any, set_dir: Path, collection: dict[str, Any], settings: RestoreSettings
) -> dict[str, Any]:
    definition = collection["definition"]
    target_name = f"{definition['name']}{settings.suffix}"
    started = time.monotonic()
    properties = dict(definition["properties"])
    keep_keys = not definition["auto_id"] or settings.keep_primary_keys
    added_auto_id_property = definition["auto_id"] and keep_keys and ALLOW_INSERT_AUTO_ID not in properties
    if added_auto_id_property:
        properties[ALLOW_INSERT_AUTO_ID] = "true"
    create_kwargs: dict[str, Any] = {"properties": properties}
    if definition.get("consistency_level") is not None:
        create_kwargs["consistency_level"] = definition["consistency_level"]
    if definition.get("num_shards"):
        create_kwargs["num_shards"] = int(definition["num_shards"])
    if definition.get("partition_key") and definition.get("num_partitions"):
        create_kwargs["num_partitions"] = int(definition["num_partitions"])
    index_params = index_params_from_definition(definition)
    client.create_collection(
        target_name, schema=schema_from_definition(definition),
        index_params=index_params if len(index_params) else None, **create_kwargs,
    )
    if not definition.get("partition_key"):
        existing = set(client.list_partitions(target_name))
        for partition in definition["partitions"]:
            if partition not in existing:
                client.create_partition(target_name, partition)

    layout = arrow_layout(definition)
    skip = frozenset() if keep_keys else frozenset({primary_field(definition)["name"]})
    inserted: dict[str, int] = {}
    for partition in collection["partitions"]:
        into = None if definition.get("partition_key") else partition["name"]
        inserted[partition["name"]] = 0
        for exported in partition["files"]:
            try:
                inserted[partition["name"]] += _insert_file(
                    client, target_name, set_dir / exported["path"], layout, into, skip, settings
                )
            except Exception as exc:
                hint = (
                    " (this server may not accept primary keys for auto_id collections: "
                    "restore with keep_primary_keys=False)"
                    if definition["auto_id"] and keep_keys else ""
                )
                raise RuntimeError(
                    f"restore of {target_name}: inserting {exported['path']} into partition "
                    f"{partition['name']!r} failed: {exc}{hint}"
                ) from exc
    client.flush(target_name)
    notes = []
    if added_auto_id_property:
        try:
            client.drop_collection_properties(target_name, property_keys=[ALLOW_INSERT_AUTO_ID])
        except Exception as exc:
            notes.append(f"{ALLOW_INSERT_AUTO_ID}=true left on {target_name}: could not drop it ({exc})")
    return {
        "restored_as": target_name,
        "rows_inserted": inserted,
        "primary_keys": "kept" if keep_keys else "reassigned",
        "notes": notes,
        "seconds": round(time.monotonic() - started, 3),
    }


def _check_collection(client: Any, collection: dict[str, Any], restored: dict[str, Any],
                      settings: RestoreSettings) -> tuple[dict[str, Any], list[str]]:
    definition = collection["definition"]
    target_name = restored["restored_as"]
    problems: list[str] = []
    expected_total = sum(p["rows"] for p in collection["partitions"])
    counts: dict[str, int] = {"*": _count_rows(client, target_name)}
    if counts["*"] != expected_total:
        problems.append(f"{target_name}: count(*) is {counts['*']} after restore, the backup has {expected_total} rows")
    if not definition.get("partition_key"):
        for partition in collection["partitions"]:
            counts[partition["name"]] = _partition_rows(client, target_name, partition["name"])
            if counts[partition["name"]] != partition["rows"]:
                problems.append(
                    f"{target_name}/{partition['name']}: {counts[partition['name']]} rows after restore, "
                    f"the backup has {partition['rows']}"
                )
    search_report: dict[str, Any] = {"queries": 0, "min_overlap": None}
    if restored["primary_keys"] == "reassigned":
        search_report["skipped"] = "primary keys were reassigned"
    else:
        pk_name = primary_field(definition)["name"]
        overlaps = []
        for sample in collection.get("searches", []):
            got = _search_ids(client, target_name, sample["field"], sample["metric_type"], sample["queries"],
                              sample["top_k"], pk_name)
            for number, (expected_ids, got_ids) in enumerate(zip(sample["expected_ids"], got)):
                overlap = len(set(expected_ids) & set(got_ids)) / len(expected_ids) if expected_ids else 1.0
                overlaps.append(overlap)
                if overlap < settings.min_search_overlap:
                    problems.append(
                        f"{target_name}: search #{number} on {sample['field']} returned {got_ids}, "
                        f"the source returned {expected_ids} (overlap {overlap:.2f})"
                    )
        search_report = {"queries": len(overlaps), "min_overlap": min(overlaps) if overlaps else None}
    return {"rows": counts, "search": search_report}, problems


def restore_full(set_dir: Path, manifest: Manifest, target: str, **options: Any) -> dict[str, Any]:
    """Recreate the exported collections in the Milvus at `target` (a URI or milvus-lite path), then check them."""
    settings = RestoreSettings.from_options(options)
    collections: dict[str, Any] = manifest.details["collections"]
    names = sorted(collections)
    if settings.collections is not None:
        missing = sorted(set(settings.collections) - set(names))
        if missing:
            raise ValueError(f"backup {manifest.backup_id} has no collection(s) {missing} (it has {names})")
        names = [n for n in names if n in settings.collections]
    destination = MilvusTarget(uri=str(target), token=settings.token, db_name=settings.db_name)
    client = connect(destination, timeout_s=settings.timeout_s, must_exist=False)
    report: dict[str, Any] = {
        "target": destination.display, "backup_id": manifest.backup_id, "suffix": settings.suffix,
        "dry_run": settings.dry_run, "collections": {}, "problems": [],
    }
    started = time.monotonic()
    try:
        for name in names:
            target_name = f"{name}{settings.suffix}"
            exists = client.has_collection(target_name)
            if exists and not settings.drop_existing:
                raise RestoreConflict(
                    f"collection {target_name!r} already exists in {destination.display}: restore with a suffix "
                    "(suffix='_restored') or drop_existing=True"
                )
            rows = collections[name]["rows"]
            action = (
                f"{'drop and ' if exists else ''}create {target_name!r} with {rows} rows "
                f"from backup {manifest.backup_id}"
            )
            if settings.dry_run:
                log.info("dry run: would %s", action)
                report["collections"][name] = {"restored_as": target_name, "would": action}
                continue
            if exists:
                _drop_collection(client, target_name, f"drop_existing=True for restore of backup {manifest.backup_id}")
            log.info("restore: %s", action)
            report["collections"][name] = _restore_collection(client, set_dir, collections[name], settings)
        if not settings.dry_run:
            for name in names:
                restored = report["collections"][name]
                aliases = collections[name]["definition"]["aliases"]
                if settings.suffix:
                    restored["aliases"] = {"skipped": aliases, "reason": "collection was renamed"}
                else:
                    restored["aliases"] = {"created": _create_aliases(client, restored["restored_as"], aliases,
                                                                      report["problems"])}
                restored["checks"], problems = _check_collection(client, collections[name], restored, settings)
                report["problems"].extend(problems)
    finally:
        client.close()
    report["rows"] = sum(collections[n]["rows"] for n in names)
    report["seconds"] = round(time.monotonic() - started, 3)
    if report["problems"]:
        raise RestoreCheckFailed(
            report["problems"], report, f"restore of backup {manifest.backup_id} into {destination.display}"
        )
    return report


def _drop_collection(client: Any, name: str, reason: str) -> None:
    """Drop a collection and the aliases pointing at it (Milvus refuses to drop an aliased collection)."""
    for alias in client.list_aliases(collection_name=name).get("aliases", []):
        log.info("dropping alias %s of %s: %s", alias, name, reason)
        client.drop_alias(alias)
    log.info("dropping collection %s: %s", name, reason)
    client.drop_collection(name)


def _create_aliases(client: Any, collection: str, aliases: list[str], problems: list[str]) -> list[str]:
    created = []
    for alias in aliases:
        try:
            client.create_alias(collection, alias)
            created.append(alias)
        except Exception as exc:
            problems.append(f"alias {alias!r} → {collection}: {exc} (point it by hand with alter_alias)")
    return created


# ───────────────────────── restore: etcd ─────────────────────────


def restore_etcd(set_dir: Path, manifest: Manifest, target: str | Path, **options: Any) -> dict[str, Any]:
    """`etcdctl snapshot restore` into a NEW data dir `target`; start etcd on it with scratch.etcd to check."""
    known = {"name", "peer_url", "etcdctl", "dry_run"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown etcd restore option(s) {unknown} (known: {', '.join(sorted(known))})")
    data_dir = Path(target)
    name = options.get("name", DEFAULT_ETCD_MEMBER)
    peer_url = options.get("peer_url", DEFAULT_ETCD_PEER_URL)
    etcdctl = options.get("etcdctl", "etcdctl")
    if data_dir.exists():
        raise RestoreConflict(f"etcd data dir {data_dir} already exists: restore into a new, non-existing directory")
    recorded = manifest.details.get("snapshot") or {}
    if options.get("dry_run"):
        log.info("dry run: would restore etcd snapshot %s (revision %s) into %s", manifest.backup_id,
                 recorded.get("revision"), data_dir)
        return {"dry_run": True, "data_dir": str(data_dir), "snapshot": recorded}
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".etcd-restore-", dir=data_dir.parent) as work:
        raw, status = _snapshot_status_of(set_dir / manifest.details.get("file", SNAPSHOT_FILE), Path(work), etcdctl)
        mismatches = _status_mismatches(manifest.backup_id, recorded, status)
        if mismatches:
            raise RestoreCheckFailed(mismatches, {"data_dir": str(data_dir), "snapshot": status},
                                     f"restore of etcd backup {manifest.backup_id}")
        decompressed = time.monotonic()
        LocalExecutor().run(snapshot_restore_command(raw, data_dir, etcdctl, name=name, peer_url=peer_url))
    finished = time.monotonic()
    log.info("etcd snapshot %s restored into %s (member %s)", manifest.backup_id, data_dir, name)
    return {
        "dry_run": False,
        "data_dir": str(data_dir),
        "member_name": name,
        "peer_url": peer_url,
        "snapshot": status,
        "decompress_seconds": round(decompressed - started, 3),
        "restore_seconds": round(finished - decompressed, 3),
        "seconds": round(finished - started, 3),
    }


# ───────────────────────── the service verbs ─────────────────────────


def _check_type(backup_type: str) -> None:
    if backup_type not in SUPPORTED_TYPES:
        raise ValueError(f"milvus has no backup type {backup_type!r} (supported: {', '.join(sorted(SUPPORTED_TYPES))})")


def backup(ctx: BackupContext) -> BackupOutcome:
    _check_type(ctx.job.backup_type)
    return backup_full(ctx) if ctx.job.backup_type == "full" else backup_etcd(ctx)


def verify(backup_set: BackupSet, manifest: Manifest) -> list[str]:
    _check_type(manifest.backup_type)
    return verify_full(backup_set, manifest) if manifest.backup_type == "full" else verify_etcd(backup_set, manifest)


def restore(set_dir: Path, manifest: Manifest, target: Any, **options: Any) -> dict[str, Any]:
    _check_type(manifest.backup_type)
    if manifest.backup_type == "full":
        return restore_full(Path(set_dir), manifest, target, **options)
    return restore_etcd(Path(set_dir), manifest, target, **options)
