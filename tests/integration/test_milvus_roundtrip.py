"""Milvus collection export against milvus-lite: back up → verify → restore into a new database → compare."""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from pymilvus import MilvusClient

from erp_backup.manifest import sha256_file
from erp_backup.scratch.base import free_port
from erp_backup.services import milvus
from erp_backup.services.base import CheckContext, SourceUnavailable
from erp_backup.sets import BackupSet
from tests.fixtures.milvus import (
    CHUNKS,
    DOCS,
    DOCS_ALIAS,
    EMPTY,
    MILVUS_CONN_ID,
    Backup,
    MilvusSample,
    make_context,
    milvus_connection,
    write_outcome_manifest,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(milvus_sample: MilvusSample, tmp_path_factory: pytest.TempPathFactory) -> Backup:
    """One full backup of the sample database, with its manifest written as the runner would."""
    root = tmp_path_factory.mktemp("milvus-backups")
    ctx = make_context("full", root, {MILVUS_CONN_ID: milvus_connection(milvus_sample.uri)})
    started = datetime.now(timezone.utc)
    clock = time.monotonic()
    outcome = milvus.backup(ctx)
    seconds = time.monotonic() - clock
    manifest = write_outcome_manifest(ctx, outcome, started, datetime.now(timezone.utc))
    return Backup(ctx.backup_set, manifest, outcome, seconds)


def _copy_set(backup: Backup, root: Path) -> BackupSet:
    copied = BackupSet(root, backup.backup_set.service, backup.backup_set.backup_type, backup.backup_set.backup_id)
    shutil.copytree(backup.backup_set.path, copied.path)
    return copied


def _normalized(definition: dict[str, Any]) -> dict[str, Any]:
    """A definition without what legitimately differs between source and copy."""
    return {k: v for k, v in definition.items() if k not in ("name", "aliases")}


def _source_definition(client: MilvusClient, name: str) -> dict[str, Any]:
    indexes = [milvus.clean_index(client.describe_index(name, i)) for i in client.list_indexes(name)]
    aliases = client.list_aliases(collection_name=name)["aliases"]
    partitions = client.list_partitions(name)
    return milvus.collection_definition(client.describe_collection(name), indexes, partitions, aliases)


def test_backup_records_every_collection_partition_and_sample(exported: Backup, milvus_sample: MilvusSample) -> None:
    details = exported.outcome.details
    assert details["kind"] == "collection_export"
    collections = details["collections"]
    assert set(collections) == {DOCS, CHUNKS, EMPTY}
    for name, partitions in milvus_sample.counts.items():
        assert {p["name"]: p["rows"] for p in collections[name]["partitions"]} == partitions
    assert details["rows"] == milvus_sample.total_rows >= 10_000

    docs = collections[DOCS]["definition"]
    assert docs["auto_id"] is True and docs["enable_dynamic_field"] is True
    assert docs["aliases"] == [DOCS_ALIAS]
    assert docs["properties"] == {"collection.ttl.seconds": "0"}
    assert {i["field_name"]: (i["index_type"], i["metric_type"]) for i in docs["indexes"]} == {
        "vec": ("AUTOINDEX", "COSINE"), "tenant": ("INVERTED", None),
    }
    for index in docs["indexes"]:
        assert not set(index["params"]) & milvus.RUNTIME_INDEX_KEYS
    chunks = collections[CHUNKS]["definition"]
    assert [(f["name"], f["input_field_names"], f["output_field_names"]) for f in chunks["functions"]] == [
        ("text_bm25", ["text"], ["sparse"])
    ]
    assert collections[CHUNKS]["loaded_for_export"] is True  # it was released; the export loaded it

    searches = collections[DOCS]["searches"]
    assert [(s["field"], s["metric_type"], len(s["queries"])) for s in searches] == [("vec", "COSINE", 5)]
    assert all(len(ids) == 10 for ids in searches[0]["expected_ids"])

    assert exported.manifest.source == {"conn_id": MILVUS_CONN_ID, "uri": milvus_sample.uri, "db_name": "default"}
    for entry in exported.outcome.files:
        path = exported.backup_set.path / entry.path
        assert sha256_file(path) == (entry.size, entry.sha256)
        assert path.stat().st_mode & 0o777 == 0o600


def test_backup_leaves_the_load_state_as_it_found_it(exported: Backup, milvus_sample: MilvusSample) -> None:
    from pymilvus.client.types import LoadState

    client = MilvusClient(uri=milvus_sample.uri)
    try:
        assert client.get_load_state(CHUNKS)["state"] == LoadState.NotLoad
    finally:
        client.close()


def test_exported_rows_equal_the_source(exported: Backup, milvus_sample: MilvusSample) -> None:
    partition = next(p for p in exported.outcome.details["collections"][DOCS]["partitions"] if p["name"] == "tenant_a")
    table = pq.read_table(exported.backup_set.path / partition["files"][0]["path"])
    assert table.num_rows == 3500
    exported_rows = {row["id"]: row for row in table.slice(0, 300).to_pylist()}
    client = MilvusClient(uri=milvus_sample.uri)
    try:
        client.load_collection(DOCS)
        source_rows = client.get(DOCS, ids=list(exported_rows), output_fields=["*"])
    finally:
        client.close()
    assert len(source_rows) == 300
    for source in source_rows:
        backed_up = exported_rows[source["id"]]
        assert backed_up["vec"] == source["vec"]  # float32 round trip is exact
        assert (backed_up["title"], backed_up["tenant"]) == (source["title"], source["tenant"])
        assert (json.loads(backed_up["meta"]) if backed_up["meta"] else None) == source["meta"]
        dynamic = {k: source[k] for k in ("source", "page") if k in source}
        assert (json.loads(backed_up["$meta"]) if backed_up["$meta"] else {}) == dynamic


def test_verify_passes_then_names_damaged_files(exported: Backup, tmp_path: Path) -> None:
    assert milvus.verify(exported.backup_set, exported.manifest) == []

    damaged = _copy_set(exported, tmp_path)
    docs = exported.outcome.details["collections"][DOCS]["partitions"]
    truncated = damaged.path / docs[0]["files"][0]["path"]
    truncated.write_bytes(truncated.read_bytes()[:5000])
    details = copy.deepcopy(exported.manifest.details)
    details["collections"][CHUNKS]["partitions"][0]["files"][0]["rows"] = 3999
    details["collections"][CHUNKS]["partitions"][0]["rows"] = 3999
    problems = milvus.verify(damaged, replace(exported.manifest, details=details))
    assert any(docs[0]["files"][0]["path"] in p and "not a readable parquet file" in p for p in problems)
    assert any("holds 4000 rows, the manifest says 3999" in p for p in problems)
    assert any(f"{DOCS}/_default has 0 readable rows" in p for p in problems)


def test_restore_into_a_new_database_recreates_everything(
    exported: Backup, milvus_sample: MilvusSample, fresh_milvus_uri: str
) -> None:
    report = milvus.restore(exported.backup_set.path, exported.manifest, fresh_milvus_uri)

    assert report.problems == [] and report.details["rows"] == milvus_sample.total_rows
    docs_report = report.details["collections"][DOCS]
    assert docs_report["checks"]["rows"] == {"*": 8000, "_default": 2500, "tenant_a": 3500, "tenant_b": 2000}
    assert docs_report["checks"]["search"] == {"queries": 5, "min_overlap": 1.0}
    assert report.details["collections"][CHUNKS]["checks"]["search"]["queries"] == 5
    assert docs_report["aliases"] == {"created": [DOCS_ALIAS]}

    source = MilvusClient(uri=milvus_sample.uri)
    target = MilvusClient(uri=fresh_milvus_uri)
    try:
        for name in (DOCS, CHUNKS, EMPTY):
            restored = _source_definition(target, name)
            assert _normalized(restored) == _normalized(exported.outcome.details["collections"][name]["definition"])
        assert target.list_aliases(collection_name=DOCS)["aliases"] == [DOCS_ALIAS]
        assert "allow_insert_auto_id" not in target.describe_collection(DOCS)["properties"]

        source.load_collection(DOCS)
        for partition in ("tenant_a", "tenant_b"):
            query = {"filter": "tenant >= 0", "output_fields": ["id"], "partition_names": [partition], "limit": 16000}
            source_ids = {row["id"] for row in source.query(DOCS, **query)}
            assert {row["id"] for row in target.query(DOCS, **query)} == source_ids  # auto_id keys kept

        crawl = {"filter": 'source == "crawl"', "output_fields": ["id", "page"], "limit": 16000}
        crawled = sorted(r["id"] for r in source.query(DOCS, **crawl))
        assert len(crawled) > 1000
        assert sorted(r["id"] for r in target.query(DOCS, **crawl)) == crawled  # dynamic field is queryable

        source.load_collection(CHUNKS)
        full_text = {"data": ["chunk1234 ledger"], "anns_field": "sparse", "limit": 1, "output_fields": ["chunk_id"],
                     "search_params": {"metric_type": "BM25"}}
        for client in (source, target):  # BM25 vectors were regenerated from the restored text
            assert [h["chunk_id"] for h in client.search(CHUNKS, **full_text)[0]] == ["doc308#2"]
        weights = target.query(CHUNKS, filter='chunk_id in ["doc0#0", "doc0#1"]', output_fields=["weight", "tags"])
        assert sorted((r["weight"], r["tags"]) for r in weights) == [(0.25, [1, 1]), (1.5, [0, 0])]
    finally:
        source.release_collection(CHUNKS)
        source.close()
        target.close()


def test_restore_with_suffix_and_reassigned_keys(exported: Backup, fresh_milvus_uri: str) -> None:
    report = milvus.restore(
        exported.backup_set.path, exported.manifest, fresh_milvus_uri,
        options={"suffix": "_restored", "collections": [DOCS], "keep_primary_keys": False},
    )
    restored = report.details["collections"][DOCS]
    assert restored["restored_as"] == f"{DOCS}_restored"
    assert restored["primary_keys"] == "reassigned"
    assert restored["checks"]["rows"]["*"] == 8000
    assert restored["checks"]["search"]["skipped"] == "primary keys were reassigned"
    assert restored["aliases"] == {"skipped": [DOCS_ALIAS], "reason": "collection was renamed"}
    client = MilvusClient(uri=fresh_milvus_uri)
    try:
        assert client.list_collections() == [f"{DOCS}_restored"]
        assert client.list_aliases(collection_name=f"{DOCS}_restored")["aliases"] == []
    finally:
        client.close()


def test_restore_refuses_an_existing_collection_unless_told_to_drop_it(
    exported: Backup, fresh_milvus_uri: str
) -> None:
    client = MilvusClient(uri=fresh_milvus_uri)
    try:
        client.create_collection(CHUNKS, dimension=4)
        client.insert(CHUNKS, [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4]}])
        client.flush(CHUNKS)

        with pytest.raises(milvus.RestoreConflict, match=f"collection '{CHUNKS}' already exists.*suffix"):
            milvus.restore(exported.backup_set.path, exported.manifest, fresh_milvus_uri,
                           options={"collections": [CHUNKS]})

        report = milvus.restore(exported.backup_set.path, exported.manifest, fresh_milvus_uri, dry_run=True,
                                options={"collections": [CHUNKS], "drop_existing": True})
        assert report.dry_run is True
        assert report.details["collections"][CHUNKS]["would"].startswith(f"drop and create '{CHUNKS}' with 4000 rows")
        assert client.get_collection_stats(CHUNKS)["row_count"] == 1

        client.create_alias(CHUNKS, "chunks_in_use")
        report = milvus.restore(exported.backup_set.path, exported.manifest, fresh_milvus_uri,
                                options={"collections": [CHUNKS], "drop_existing": True})
        assert report.details["collections"][CHUNKS]["checks"]["rows"]["*"] == 4000
        assert client.list_aliases()["aliases"] == []  # the old collection's alias went with it
        assert "emb" in {f["name"] for f in client.describe_collection(CHUNKS)["fields"]}
    finally:
        client.close()


def test_restore_check_fails_when_the_sample_ids_differ(exported: Backup, fresh_milvus_uri: str) -> None:
    details = copy.deepcopy(exported.manifest.details)
    details["collections"][CHUNKS]["searches"][0]["expected_ids"][2] = ["doc999#0"] * 10
    tampered = replace(exported.manifest, details=details)
    report = milvus.restore(exported.backup_set.path, tampered, fresh_milvus_uri, options={"collections": [CHUNKS]})
    assert len(report.problems) == 1 and not report.ok
    assert f"{CHUNKS}: search #2 on emb returned" in report.problems[0]
    assert report.details["collections"][CHUNKS]["checks"]["rows"]["*"] == 4000


def test_unreachable_source_names_connection_and_host(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    ctx = make_context("full", tmp_path, {MILVUS_CONN_ID: milvus_connection(url)}, options={"timeout_s": 3})
    with pytest.raises(SourceUnavailable, match=f"connection '{MILVUS_CONN_ID}' \\({url}\\) is unreachable"):
        milvus.backup(ctx)

    missing = tmp_path / "nowhere.db"
    ctx = make_context("full", tmp_path / "b", {MILVUS_CONN_ID: milvus_connection(str(missing))})
    with pytest.raises(SourceUnavailable, match=f"milvus-lite database {missing} does not exist"):
        milvus.backup(ctx)
    assert not missing.exists()


def test_a_dry_run_creates_nothing_and_the_drill_check_counts_every_collection(
    exported: Backup, fresh_milvus_uri: str
) -> None:
    manifest = exported.manifest
    sizes = {entry.path: entry.size for entry in manifest.files}
    collections = manifest.details["collections"]
    parquet = {name: sum(sizes[f["path"]] for p in c["partitions"] for f in p["files"]) for name, c in collections.items()}

    dry = milvus.restore(exported.backup_set.path, manifest, fresh_milvus_uri, dry_run=True)
    assert not Path(fresh_milvus_uri).exists()  # not even an empty milvus-lite database
    assert dry.dry_run and dry.problems == [] and dry.restored_bytes == 0
    assert dry.actions == [
        f"create {name!r} with {collections[name]['rows']} rows ({parquet[name]} bytes of parquet) "
        f"from backup {manifest.backup_id}"
        for name in sorted(collections)
    ]

    report = milvus.restore(exported.backup_set.path, manifest, fresh_milvus_uri)
    assert report.problems == [] and report.restored_bytes == sum(parquet.values())
    guarded: list[tuple[str, int]] = []
    context = CheckContext(guard=lambda host, port: guarded.append((host, port)))
    found = milvus.check_restored(fresh_milvus_uri, exported.backup_set.path, manifest, report, context)
    assert found.problems == []
    assert {f"collection {DOCS}: 8000 rows", f"collection {CHUNKS}: 4000 rows", f"collection {EMPTY}: 0 rows",
            f"collection {DOCS}: 5 sample searches, min top-k overlap 1.0"} <= set(found.checks)

    details = copy.deepcopy(manifest.details)
    details["collections"][CHUNKS]["rows"] = 4001
    wrong = milvus.check_restored(fresh_milvus_uri, exported.backup_set.path, replace(manifest, details=details), report,
                                  context)
    assert wrong.problems == [f"collection {CHUNKS}: 4000 rows after restore, the backup has 4001"]
