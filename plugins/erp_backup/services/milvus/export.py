"""Milvus collection export (`full`): rows into parquet files, definitions and sample searches into the manifest.

For each collection the rows, vectors included, are read with
``query_iterator(output_fields=["*"])`` one partition at a time and streamed batch by batch
into zstd-compressed parquet files ``collections/<collection>/<partition>/<nnnnn>.parquet``
(SHA-256 computed as the bytes are written, page checksums on). Each collection is read at
its own timestamp (pinned by the iterator), not all collections at one instant; a released
collection is loaded for the export and released again.

A fixed sample of rows is used as search queries against the source; the queries and the
top-k ids are recorded, so a restore is checked against the manifest alone (counts per
partition and the same ids). On a collection written to during the backup, the source
search may already see newer rows: a restore check then names the collection and query.

Plan options (services.milvus.options): collections (default: all), batch_size (4096,
≤16384), rows_per_file (0: one file per partition), parquet_level (3), search_samples (5),
search_top_k (10), timeout_s (30).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from erp_backup.manifest import DIR_MODE, FileEntry, Manifest
from erp_backup.services.base import BackupContext, BackupOutcome
from erp_backup.services.milvus.endpoints import SOURCE_ROLE, connect, milvus_target
from erp_backup.services.milvus.schema import (
    Layout,
    UnsupportedCollection,
    arrow_layout,
    clean_index,
    collection_definition,
    primary_field,
    rows_to_batch,
)
from erp_backup.sets import BackupSet
from erp_backup.stream import Chain, open_chain

log = logging.getLogger(__name__)

COLLECTIONS_DIR = "collections"
EXPORT_FORMAT = 1
DEFAULT_BATCH_SIZE = 4096
MAX_BATCH_SIZE = 16384
DEFAULT_PARQUET_LEVEL = 3
DEFAULT_SEARCH_SAMPLES = 5
DEFAULT_SEARCH_TOP_K = 10
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


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


# The widest probe of each approximate index (IVF nprobe, HNSW ef): the sample searches and the restore check then
# both see (close to) exact neighbours, so an index rebuilt from the same rows answers the same ids.
EXHAUSTIVE_SEARCH = {"nprobe": 65536, "ef": 32768}


def search_ids(client: Any, collection: str, field_name: str, metric: str, queries: list[list[float]],
                top_k: int, pk_name: str) -> list[list[Any]]:
    results = client.search(
        collection, data=queries, anns_field=field_name, limit=top_k,
        search_params={"metric_type": metric, "params": EXHAUSTIVE_SEARCH}, output_fields=[pk_name],
        consistency_level="Strong",
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


def _definition(client: Any, name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The collection's definition, and the metric type of each indexed field."""
    indexes = [clean_index(client.describe_index(name, index_name)) for index_name in client.list_indexes(name)]
    aliases = client.list_aliases(collection_name=name).get("aliases", [])
    definition = collection_definition(client.describe_collection(name), indexes, client.list_partitions(name), aliases)
    return definition, {i["field_name"]: i["metric_type"] for i in indexes if i.get("metric_type")}


@dataclass
class _Export:
    """One collection's export in progress: where its files go and what they look like."""

    client: Any
    name: str
    set_dir: Path
    collection_dir: str
    layout: Layout
    schema: pa.Schema
    settings: ExportSettings
    sampler: QuerySampler


def _export_partition(export: _Export, partition: str, position: int) -> tuple[list[ExportedFile], dict[str, Any]]:
    writer = PartitionFiles(
        export.set_dir, f"{export.collection_dir}/{path_component(partition, position, 'p')}",
        export.schema.with_metadata({**export.schema.metadata, b"milvus.partition": partition.encode()}),
        export.layout.vector_columns, export.settings.parquet_level, export.settings.rows_per_file,
    )
    iterator = export.client.query_iterator(
        export.name, batch_size=export.settings.batch_size, output_fields=["*"], partition_names=[partition]
    )
    try:
        while rows := iterator.next():
            writer.write(rows_to_batch(rows, export.layout))
            export.sampler.offer(rows)
        exported = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        iterator.close()
    rows_total = sum(f.rows for f in exported)
    log.info("milvus %s/%s: %d rows exported", export.name, partition, rows_total)
    return exported, {"name": partition, "rows": rows_total,
                      "files": [{"path": f.entry.path, "rows": f.rows} for f in exported]}


def _sample_searches(client: Any, name: str, pk_name: str, metrics: dict[str, str], sampler: QuerySampler,
                     top_k: int) -> list[dict[str, Any]]:
    """The sampled queries of each vector field and the ids the source returns for them."""
    searches = []
    for field_name in sampler.vector_fields:
        queries = sampler.queries[field_name]
        if queries:
            searches.append({
                "field": field_name,
                "metric_type": metrics[field_name],
                "top_k": top_k,
                "queries": queries,
                "expected_ids": search_ids(client, name, field_name, metrics[field_name], queries, top_k, pk_name),
            })
    return searches


def _export_loaded_collection(
    client: Any, name: str, set_dir: Path, index: int, settings: ExportSettings
) -> tuple[list[FileEntry], dict[str, Any]]:
    from pymilvus import DataType

    definition, metrics = _definition(client, name)
    layout = arrow_layout(definition)
    vector_fields = [
        f["name"] for f in definition["fields"]
        if f["type"] == int(DataType.FLOAT_VECTOR) and f["name"] in metrics
    ]
    expected_rows = int(client.get_collection_stats(name).get("row_count", 0))
    export = _Export(
        client, name, set_dir, f"{COLLECTIONS_DIR}/{path_component(name, index, 'c')}", layout,
        layout.schema.with_metadata({"milvus.collection": name, "erp_backup.format": str(EXPORT_FORMAT)}),
        settings, QuerySampler(vector_fields, settings.search_samples, expected_rows),
    )
    files: list[FileEntry] = []
    partitions = []
    for position, partition in enumerate(definition["partitions"]):
        exported, record = _export_partition(export, partition, position)
        partitions.append(record)
        files.extend(f.entry for f in exported)
    searches = _sample_searches(client, name, primary_field(definition)["name"], metrics, export.sampler,
                                settings.search_top_k)
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
