"""The ERP document flow across three stores, for the local estate and the tests.

A document is three things that must agree:

- a row in ``<tenant>.documents`` (PostgreSQL): its key, the MinIO object key, the
  object's SHA-256 and the Milvus primary keys of its chunks;
- the object in the ``erp-documents`` bucket (MinIO, moto here);
- one vector per chunk in the ``erp_doc_chunks`` collection (Milvus), each carrying the
  document's key.

A document is written as an application writes it: the object first, then the chunk
vectors, then the row (committed last). `DocumentWriter` keeps writing documents in a
thread, so backups of the three stores taken at different moments disagree the way
production's do. The cross-service checks (`erp_backup.estate.references`) read these
through the plan's `estate.references` block; nothing here is imported by plugins/.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

TABLE = "documents"
BUCKET = "erp-documents"
COLLECTION = "erp_doc_chunks"
DIM = 8
TENANTS = ("tenant_acme", "tenant_globex", "tenant_initech")


@dataclass
class DocumentStores:
    """Where the three parts of a document live. `s3` is a boto3 S3 client."""

    pg_conninfo: str
    s3: Any
    milvus_uri: str
    tenants: Sequence[str] = TENANTS
    bucket: str = BUCKET
    collection: str = COLLECTION
    _milvus: Any = field(default=None, repr=False)

    def milvus(self) -> Any:
        if self._milvus is None:
            from pymilvus import MilvusClient

            self._milvus = MilvusClient(uri=self.milvus_uri)
        return self._milvus

    def close(self) -> None:
        if self._milvus is not None:
            self._milvus.close()
            self._milvus = None


def ensure_stores(stores: DocumentStores) -> int:
    """Create the documents tables, the bucket and the collection if missing; the next document number."""
    with psycopg.connect(stores.pg_conninfo, autocommit=True) as db:
        for tenant in stores.tenants:
            db.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(tenant)))
            db.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.{} (id bigserial PRIMARY KEY, doc_key text NOT NULL UNIQUE, "
                "object_key text NOT NULL, sha256 text NOT NULL, chunk_ids bigint[] NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            ).format(sql.Identifier(tenant), sql.Identifier(TABLE)))
        counts = [db.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(t), sql.Identifier(TABLE))).fetchone()
                  for t in stores.tenants]
    if stores.bucket not in {b["Name"] for b in stores.s3.list_buckets().get("Buckets", [])}:
        stores.s3.create_bucket(Bucket=stores.bucket)
    client = stores.milvus()
    if not client.has_collection(stores.collection):
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("chunk_id", DataType.INT64, is_primary=True)
        schema.add_field("doc_key", DataType.VARCHAR, max_length=128)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=DIM)
        index = client.prepare_index_params()
        index.add_index(field_name="vec", index_type="AUTOINDEX", metric_type="COSINE")
        client.create_collection(stores.collection, schema=schema, index_params=index)
    return sum(int(row[0]) for row in counts if row)


def document_body(number: int) -> bytes:
    return f"# Document {number}\n\nInvoice and ledger notes for document {number}.\n".encode()


def chunk_vector(chunk: int) -> list[float]:
    """A distinct unit-scale vector per chunk (no ties, so searches on a restored copy return the same ids)."""
    rng = random.Random(chunk)
    return [rng.uniform(-1.0, 1.0) for _ in range(DIM)]


def write_document(stores: DocumentStores, number: int) -> str:
    """Write document `number`: object, then its chunk vectors, then the row. Returns its key."""
    tenant = stores.tenants[number % len(stores.tenants)]
    doc_key = f"{tenant}:{number}"
    object_key = f"docs/{tenant}/{number:06d}.md"
    body = document_body(number)
    chunk_ids = [number * 10 + part for part in range(1 + number % 3)]
    stores.s3.put_object(Bucket=stores.bucket, Key=object_key, Body=body, ContentType="text/markdown")
    vectors = [{"chunk_id": chunk, "doc_key": doc_key, "vec": chunk_vector(chunk)} for chunk in chunk_ids]
    stores.milvus().insert(stores.collection, vectors)
    with psycopg.connect(stores.pg_conninfo, autocommit=True) as db:
        db.execute(sql.SQL("INSERT INTO {}.{} (doc_key, object_key, sha256, chunk_ids) VALUES (%s, %s, %s, %s)").format(
            sql.Identifier(tenant), sql.Identifier(TABLE)), (doc_key, object_key, hashlib.sha256(body).hexdigest(), chunk_ids))
    return doc_key


def seed_documents(stores: DocumentStores, count: int) -> int:
    """Create the stores and write `count` more documents; returns the number of documents after."""
    start = ensure_stores(stores)
    for number in range(start, start + count):
        write_document(stores, number)
    return start + count


class DocumentWriter(threading.Thread):
    """Keeps writing one document every `interval` seconds until `stop()`; `written` counts them."""

    def __init__(self, stores: DocumentStores, start_number: int, interval: float = 0.2):
        super().__init__(name="erp-document-writer", daemon=True)
        self.stores, self.next_number, self.interval = stores, start_number, interval
        self.written = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self._writing = threading.Lock()  # held while one document is written; pause() takes it

    def pause(self) -> Any:
        """`with writer.pause():` no document is written inside the block."""
        return self._writing

    def run(self) -> None:
        try:
            while not self._stop_event.wait(self.interval):
                with self._writing:
                    write_document(self.stores, self.next_number)
                self.next_number += 1
                self.written += 1
        except BaseException as exc:  # reported by stop(): a writer that died silently would fake a quiet estate
            self.error = exc

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=30)
        if self.error is not None:
            raise RuntimeError(f"the document writer failed after {self.written} documents: {self.error}") from self.error
        return self.written


def restore_objects(stores: DocumentStores) -> int:
    """Put back the objects of existing rows that the bucket lacks (moto keeps objects in memory only)."""
    present = set()
    for page in stores.s3.get_paginator("list_objects_v2").paginate(Bucket=stores.bucket):
        present.update(item["Key"] for item in page.get("Contents", []))
    put = 0
    with psycopg.connect(stores.pg_conninfo, autocommit=True) as db:
        for tenant in stores.tenants:
            rows = db.execute(sql.SQL("SELECT doc_key, object_key FROM {}.{}").format(
                sql.Identifier(tenant), sql.Identifier(TABLE))).fetchall()
            for doc_key, object_key in rows:
                if object_key not in present:
                    number = int(doc_key.rsplit(":", 1)[1])
                    stores.s3.put_object(Bucket=stores.bucket, Key=object_key, Body=document_body(number),
                                         ContentType="text/markdown")
                    put += 1
    return put
