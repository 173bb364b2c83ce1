"""A Milvus collection as plain JSON, and its rows as arrow batches.

Definitions: the schema (auto_id, dynamic field flag, functions, properties), index
parameters without runtime counters, partitions and aliases, as JSON for the manifest
(`collection_definition`), and back to pymilvus objects (`schema_from_definition`,
`index_params_from_definition`).

Rows ⇄ arrow (`arrow_layout`, `rows_to_batch`, `batch_to_rows`): dynamic fields go into a
``$meta`` JSON column, JSON fields into JSON text, float vectors into fixed-size lists,
sparse vectors into maps; function outputs (e.g. BM25 sparse vectors) are not exported:
Milvus regenerates them on insert. Binary, float16, bfloat16 and int8 vectors and struct
array fields cannot be carried: `UnsupportedCollection` names the collection and field
(use zilliztech/milvus-backup for those collections).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

META_COLUMN = "$meta"
MAX_REQUEST_BYTES = 64 * 1024 * 1024
REQUEST_HEADROOM = 0.5  # arrow sizes underestimate the gRPC encoding; stay at half the limit
RUNTIME_INDEX_KEYS = frozenset(
    {"total_rows", "indexed_rows", "pending_index_rows", "state", "index_state_fail_reason", "fail_reason"}
)


class UnsupportedCollection(ValueError):
    """A collection uses a field type the export cannot carry; the message names collection and field."""


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
    rows = [dict(zip(names, values, strict=False)) for values in zip(*columns.values(), strict=False)] if names else [
        {} for _ in range(batch.num_rows)
    ]
    if metas is not None:
        for row, meta in zip(rows, metas, strict=False):
            if meta:
                row.update(meta)
    return rows


def rows_per_request(batch_bytes: int, num_rows: int, max_request_bytes: int = MAX_REQUEST_BYTES) -> int:
    """How many rows of a batch fit one insert request, with headroom for the gRPC encoding."""
    if num_rows <= 0:
        return 1
    per_row = max(1.0, batch_bytes / num_rows)
    return max(1, min(num_rows, math.floor(max_request_bytes * REQUEST_HEADROOM / per_row)))
