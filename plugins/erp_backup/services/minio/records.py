"""The estate's reference checks read a restored bucket: every object under a prefix, with its SHA-256."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from erp_backup.services.base import RecordsUnavailable, airflow_connection
from erp_backup.services.minio.layout import DEFAULT_MAX_WORKERS
from erp_backup.services.minio.restore import RestoreTarget, target_endpoint


def read_records(target: Any, source: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`{key, size, sha256}` of every object in `source["bucket"]` under `source.get("prefix", "")` of the target."""
    from erp_backup.services.minio import _object_sha256

    bucket = source.get("bucket")
    if not bucket:
        raise RecordsUnavailable(f"minio records need a bucket (got {dict(source)})")
    fields = dict(target) if isinstance(target, Mapping) else {}
    endpoint = target_endpoint(RestoreTarget.of({**fields, "bucket": bucket, "create_bucket": False}), airflow_connection,
                               DEFAULT_MAX_WORKERS)
    rows = []
    paginator = endpoint.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=str(source.get("prefix") or "")):
        for item in page.get("Contents", []):
            size, digest = _object_sha256(endpoint.client, bucket, item["Key"])
            rows.append({"key": item["Key"], "size": size, "sha256": digest})
    return rows
