"""The estate's reference checks read a restored collection: its primary key and the fields the plan names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from erp_backup.services.base import RecordsUnavailable
from erp_backup.services.milvus.endpoints import MilvusTarget, connect
from erp_backup.services.milvus.export import _ensure_loaded

BATCH = 4096


def read_records(target: Any, source: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of `source["collection"]` with the fields named in `source["fields"]` (values: field names)."""
    collection = source.get("collection")
    fields = [str(f) for f in (source.get("fields") or {}).values()]
    if not collection or not fields:
        raise RecordsUnavailable(f"milvus records need a collection and fields (got {dict(source)})")
    milvus = target if isinstance(target, MilvusTarget) else MilvusTarget(uri=str(target))
    client = connect(milvus)
    try:
        if not client.has_collection(collection):
            return []
        _ensure_loaded(client, collection)
        iterator = client.query_iterator(collection, batch_size=BATCH, output_fields=fields)
        rows: list[dict[str, Any]] = []
        try:
            while batch := iterator.next():
                rows += [{name: row.get(name) for name in fields} for row in batch]
        finally:
            iterator.close()
        return rows
    finally:
        client.close()
