"""Pure logic of the Milvus service: commands, connections, schema definitions, rows ⇄ parquet."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from airflow.sdk import Connection
from pymilvus import DataType
from pymilvus.grpc_gen import schema_pb2

from erp_backup.manifest import Manifest, sha256_file
from erp_backup.plan import load_plan
from erp_backup.services import get_service, milvus
from erp_backup.services.base import (
    CliTarget,
    ConnectionMissing,
    ContainerSpec,
    PointInTimeUnavailable,
    ScratchSpec,
    TargetUsageError,
)
from erp_backup.services.milvus import (
    ExportSettings,
    MilvusTarget,
    PartitionFiles,
    QuerySampler,
    RestoreSettings,
    UnsupportedCollection,
    arrow_layout,
    batch_to_rows,
    clean_index,
    collection_definition,
    etcd_target,
    milvus_target,
    parse_etcdctl_version,
    parse_snapshot_status,
    path_component,
    redact_uri,
    rows_per_request,
    rows_to_batch,
    schema_from_definition,
    snapshot_restore_command,
    snapshot_save_command,
    snapshot_status_command,
)
from tests.fixtures.factories import make_manifest

# ───────────────────────── connections ─────────────────────────


def test_milvus_target_from_uri_host_with_token_and_database() -> None:
    conn = Connection(conn_id="erp_milvus", conn_type="generic", host="http://milvus:19530",
                      password="s3cret", schema="erp")
    target = milvus_target(conn, "erp_milvus")
    assert (target.uri, target.token, target.db_name) == ("http://milvus:19530", "s3cret", "erp")
    assert target.is_local is False
    assert "s3cret" not in repr(target)


def test_milvus_target_builds_uri_from_host_and_port_and_user_token() -> None:
    conn = Connection(conn_id="erp_milvus", conn_type="generic", host="erp-milvus", port=29530,
                      login="backup", password="pw")
    target = milvus_target(conn, "erp_milvus")
    assert (target.uri, target.token) == ("http://erp-milvus:29530", "backup:pw")


def test_milvus_target_milvus_lite_path_from_extra() -> None:
    conn = Connection(conn_id="erp_milvus", conn_type="generic", extra=json.dumps({"uri": "/data/erp.db"}))
    target = milvus_target(conn, "erp_milvus")
    assert (target.uri, target.is_local, target.token) == ("/data/erp.db", True, "")


def test_milvus_target_without_host_names_the_connection() -> None:
    with pytest.raises(ValueError, match="connection 'erp_milvus': set host"):
        milvus_target(Connection(conn_id="erp_milvus", conn_type="generic"), "erp_milvus")


def test_redact_uri_drops_credentials() -> None:
    assert redact_uri("https://root:Milvus@milvus.example:19530/db") == "https://milvus.example:19530/db"
    assert redact_uri("/data/erp.db") == "/data/erp.db"


def test_etcd_target_plain_and_tls() -> None:
    plain = etcd_target(Connection(conn_id="milvus_etcd", conn_type="generic", host="milvus-etcd"), "milvus_etcd")
    assert (plain.endpoint, plain.user, plain.tls_args) == ("http://milvus-etcd:2379", "", ())
    tls = etcd_target(
        Connection(conn_id="milvus_etcd", conn_type="generic", host="etcd.internal", port=2379,
                   extra=json.dumps({"cacert": "/etc/etcd/ca.pem", "cert": "/etc/etcd/c.pem",
                                     "key": "/etc/etcd/k.pem"})),
        "milvus_etcd",
    )
    assert tls.endpoint == "https://etcd.internal:2379"
    assert tls.tls_args == ("--cacert=/etc/etcd/ca.pem", "--cert=/etc/etcd/c.pem", "--key=/etc/etcd/k.pem")
    assert tls.host_port == ("etcd.internal", 2379)


def test_etcd_target_refuses_several_endpoints_and_login_without_password() -> None:
    with pytest.raises(ValueError, match="ONE etcd endpoint"):
        etcd_target(Connection(conn_id="milvus_etcd", conn_type="generic", host="a:2379,b:2379"), "milvus_etcd")
    with pytest.raises(ValueError, match="login 'root' is set but the password is empty"):
        etcd_target(Connection(conn_id="milvus_etcd", conn_type="generic", host="etcd", login="root"), "milvus_etcd")


# ───────────────────────── etcd commands ─────────────────────────


def test_snapshot_save_command_puts_credentials_only_in_env() -> None:
    target = etcd_target(
        Connection(conn_id="milvus_etcd", conn_type="generic", host="milvus-etcd", port=2379,
                   login="root", password="etcd-pw"),
        "milvus_etcd",
    )
    command = snapshot_save_command(target, Path("/backup/set/.etcd-snapshot.db"))
    assert command.argv == (
        "etcdctl", "--endpoints=http://milvus-etcd:2379", "--dial-timeout=10s", "--command-timeout=600s",
        "snapshot", "save", "/backup/set/.etcd-snapshot.db",
    )
    assert command.env == {"ETCDCTL_API": "3", "ETCDCTL_USER": "root:etcd-pw"}
    assert "etcd-pw" not in " ".join(command.argv)
    assert "etcd-pw" not in command.describe()


def test_snapshot_status_restore_and_version_commands() -> None:
    assert snapshot_status_command(Path("/w/snapshot.db")).argv == (
        "etcdctl", "snapshot", "status", "/w/snapshot.db", "--write-out=json",
    )
    restore = snapshot_restore_command(Path("/w/snapshot.db"), Path("/var/lib/etcd-new"))
    assert restore.argv == (
        "etcdctl", "snapshot", "restore", "/w/snapshot.db",
        "--data-dir", "/var/lib/etcd-new",
        "--name", "default",
        "--initial-cluster", "default=http://localhost:2380",
        "--initial-advertise-peer-urls", "http://localhost:2380",
    )
    assert restore.env == {"ETCDCTL_API": "3"}
    assert milvus.etcdctl_version_command("/usr/bin/etcdctl").argv == ("/usr/bin/etcdctl", "version")


def test_parse_snapshot_status_and_version() -> None:
    status = parse_snapshot_status(b'{"hash":1667501423,"revision":2,"totalKey":5,"totalSize":20480}\n')
    assert status == {"hash": 1667501423, "revision": 2, "total_keys": 5, "total_size": 20480}
    assert parse_etcdctl_version(b"etcdctl version: 3.4.23\nAPI version: 3.4\n") == "3.4.23"


# ───────────────────────── definitions ─────────────────────────


def _described() -> dict:
    """What describe_collection returns for a typical collection (milvus-lite 3.2.2 / pymilvus 3.0.2 shape)."""
    return {
        "collection_name": "erp_chunks",
        "auto_id": False,
        "num_shards": 1,
        "description": "chunks",
        "fields": [
            {"field_id": 100, "name": "chunk_id", "description": "", "type": DataType.VARCHAR,
             "params": {"max_length": 64}, "is_primary": True},
            {"field_id": 101, "name": "text", "description": "", "type": DataType.VARCHAR,
             "params": {"max_length": 512, "enable_analyzer": "true"}},
            {"field_id": 102, "name": "sparse", "description": "", "type": DataType.SPARSE_FLOAT_VECTOR,
             "params": {}, "is_function_output": True},
            {"field_id": 103, "name": "emb", "description": "", "type": DataType.FLOAT_VECTOR, "params": {"dim": 4}},
            {"field_id": 104, "name": "tags", "description": "", "type": DataType.ARRAY,
             "params": {"max_capacity": 8}, "element_type": DataType.INT64},
            {"field_id": 105, "name": "meta", "description": "", "type": DataType.JSON, "params": {}, "nullable": True},
            {"field_id": 106, "name": "weight", "description": "", "type": DataType.FLOAT, "params": {},
             "default_value": schema_pb2.ValueField(float_data=1.5)},
            {"field_id": 107, "name": "$meta", "description": "", "type": DataType.JSON, "params": {},
             "is_dynamic": True},
        ],
        "functions": [{"name": "bm25", "id": 7, "description": "", "type": 1, "params": {},
                       "input_field_names": ["text"], "input_field_ids": [101],
                       "output_field_names": ["sparse"], "output_field_ids": [102]}],
        "aliases": [],
        "collection_id": 4711,
        "consistency_level": 2,
        "consistency_level_name": "Bounded",
        "properties": {"collection.ttl.seconds": 86400},
        "num_partitions": 1,
        "enable_dynamic_field": True,
    }


def test_clean_index_strips_runtime_counters() -> None:
    described = {"M": "16", "efConstruction": "200", "metric_type": "COSINE", "index_type": "HNSW",
                 "field_name": "emb", "index_name": "emb_idx", "total_rows": 9, "indexed_rows": 9,
                 "pending_index_rows": 0, "state": "Finished"}
    assert clean_index(described) == {
        "field_name": "emb", "index_name": "emb_idx", "index_type": "HNSW", "metric_type": "COSINE",
        "params": {"M": "16", "efConstruction": "200"},
    }
    scalar = clean_index({"index_type": "INVERTED", "metric_type": "NONE", "field_name": "tenant",
                          "index_name": "tenant", "state": "Finished"})
    assert scalar["metric_type"] is None and scalar["params"] == {}


def test_collection_definition_is_json_and_rebuilds_the_schema() -> None:
    definition = collection_definition(_described(), [], ["_default", "p1"], ["chunks_live"])
    decoded = json.loads(json.dumps(definition))
    assert decoded == definition
    weight = next(f for f in definition["fields"] if f["name"] == "weight")
    assert weight["default_value"] == 1.5
    assert definition["functions"][0] == {
        "name": "bm25", "type": 1, "description": "", "input_field_names": ["text"],
        "output_field_names": ["sparse"], "params": {},
    }
    assert definition["properties"] == {"collection.ttl.seconds": "86400"}
    assert (definition["consistency_level"], definition["enable_dynamic_field"]) == ("Bounded", True)
    assert definition["partitions"] == ["_default", "p1"] and definition["aliases"] == ["chunks_live"]

    schema = schema_from_definition(decoded)
    by_name = {f.name: f for f in schema.fields}
    assert schema.enable_dynamic_field is True and schema.auto_id is False
    assert by_name["chunk_id"].is_primary and by_name["chunk_id"].params["max_length"] == 64
    assert by_name["tags"].element_type == DataType.INT64
    assert by_name["weight"].default_value.float_data == 1.5
    assert by_name["meta"].nullable is True
    assert by_name["sparse"].is_function_output is True
    assert [f.name for f in schema.functions] == ["bm25"]


def test_auto_id_survives_the_definition() -> None:
    described = _described()
    described["auto_id"] = True
    described["fields"][0] = {"field_id": 100, "name": "id", "type": DataType.INT64, "params": {},
                              "is_primary": True, "auto_id": True}
    schema = schema_from_definition(collection_definition(described, [], ["_default"], []))
    assert schema.auto_id is True and schema.primary_field.name == "id"


@pytest.mark.parametrize("dtype", [DataType.BINARY_VECTOR, DataType.FLOAT16_VECTOR, DataType.BFLOAT16_VECTOR,
                                   DataType.INT8_VECTOR])
def test_unsupported_vector_types_fail_naming_collection_and_field(dtype: DataType) -> None:
    described = _described()
    described["fields"].append({"name": "raw", "type": dtype, "params": {"dim": 16}})
    with pytest.raises(UnsupportedCollection, match=r"collection 'erp_chunks': field 'raw' has type .*milvus-backup"):
        collection_definition(described, [], ["_default"], [])


# ───────────────────────── rows ⇄ arrow ─────────────────────────


def test_rows_round_trip_through_arrow() -> None:
    definition = collection_definition(_described(), [], ["_default"], [])
    layout = arrow_layout(definition)
    assert [c.name for c in layout.columns] == ["chunk_id", "text", "emb", "tags", "meta", "weight", "$meta"]
    rows = [
        {"chunk_id": "a#0", "text": "invoice ledger", "sparse": {3: 0.5}, "emb": [0.5, 0.25, -0.125, 3.0],
         "tags": [1, 2], "meta": {"lang": "ko", "n": [1, 2]}, "weight": 1.5, "source": "crawl", "page": 3},
        {"chunk_id": "a#1", "text": "payroll", "sparse": {9: 1.0}, "emb": [1.0, 0.0, -1.0, 2.5],
         "tags": [], "meta": None, "weight": 0.25},
    ]
    batch = rows_to_batch(rows, layout)
    assert batch.num_rows == 2
    back = batch_to_rows(batch, layout)
    # the function output is regenerated by Milvus; dynamic keys come back as top-level keys
    assert back == [{k: v for k, v in row.items() if k != "sparse"} for row in rows]
    assert batch_to_rows(batch, layout, skip=frozenset({"chunk_id"}))[1].get("chunk_id") is None


def test_sparse_vectors_round_trip() -> None:
    definition = {"name": "s", "enable_dynamic_field": False, "fields": [
        {"name": "pk", "type": int(DataType.INT64), "params": {}, "is_primary": True},
        {"name": "sv", "type": int(DataType.SPARSE_FLOAT_VECTOR), "params": {}},
    ]}
    layout = arrow_layout(definition)
    rows = [{"pk": 1, "sv": {7: 0.5, 2: 1.25}}, {"pk": 2, "sv": {}}]
    assert batch_to_rows(rows_to_batch(rows, layout), layout) == rows


def test_vectors_of_the_wrong_dim_are_refused() -> None:
    layout = arrow_layout(collection_definition(_described(), [], ["_default"], []))
    row = {"chunk_id": "x", "text": "t", "emb": [0.1, 0.2], "tags": [], "meta": None, "weight": 1.0}
    with pytest.raises(ValueError, match="dim"):
        rows_to_batch([row, dict(row)], layout)


def test_rows_per_request_stays_under_the_limit() -> None:
    assert rows_per_request(batch_bytes=4096 * 6200, num_rows=4096) == 4096  # 1536-dim float vectors fit
    rows = rows_per_request(batch_bytes=1000 * 200_000, num_rows=1000)  # 200 kB per row
    assert rows * 200_000 <= milvus.MAX_REQUEST_BYTES * milvus.REQUEST_HEADROOM and rows == 167
    assert rows_per_request(batch_bytes=10 * 100_000_000, num_rows=10) == 1  # one oversize row still goes alone
    assert rows_per_request(batch_bytes=0, num_rows=0) == 1


def test_query_sampler_takes_every_stride_row_across_batches() -> None:
    sampler = QuerySampler(["v"], wanted=3, expected_rows=30)
    assert sampler.stride == 10
    for start in (0, 7, 14, 21, 28):
        sampler.offer([{"v": [float(i)]} for i in range(start, min(start + 7, 30))])
    assert sampler.queries["v"] == [[0.0], [10.0], [20.0]]


def test_partition_files_stream_hash_and_rotate(tmp_path: Path) -> None:
    definition = collection_definition(_described(), [], ["_default"], [])
    layout = arrow_layout(definition)
    rows = [{"chunk_id": f"c{i}", "text": "t", "emb": [float(i)] * 4, "tags": [i], "meta": {"i": i},
             "weight": 1.0} for i in range(25)]
    files = PartitionFiles(tmp_path, "collections/erp_chunks/_default", layout.schema, layout.vector_columns,
                           level=3, rows_per_file=10)
    files.write(rows_to_batch(rows[:13], layout))
    files.write(rows_to_batch(rows[13:], layout))
    exported = files.finish()
    assert [(e.entry.path, e.rows) for e in exported] == [
        ("collections/erp_chunks/_default/00000.parquet", 10),
        ("collections/erp_chunks/_default/00001.parquet", 10),
        ("collections/erp_chunks/_default/00002.parquet", 5),
    ]
    for e in exported:
        path = tmp_path / e.entry.path
        assert sha256_file(path) == (e.entry.size, e.entry.sha256)
        assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "collections").stat().st_mode & 0o777 == 0o700
    read_back = [
        row
        for e in exported
        for batch in pq.ParquetFile(tmp_path / e.entry.path).iter_batches()
        for row in batch_to_rows(batch, layout)
    ]
    assert [r["chunk_id"] for r in read_back] == [f"c{i}" for i in range(25)]
    encodings = pq.ParquetFile(tmp_path / exported[0].entry.path).metadata.row_group(0).column(2).encodings
    assert "BYTE_STREAM_SPLIT" in encodings


def test_path_component_keeps_safe_names_only() -> None:
    assert path_component("tenant_a", 3, "p") == "tenant_a"
    assert path_component("../etc", 3, "p") == "~p0003"
    assert path_component("테넌트", 12, "c") == "~c0012"


# ───────────────────────── options and dispatch ─────────────────────────


def test_export_settings_validate_and_name_the_option() -> None:
    assert ExportSettings.from_options({}).batch_size == milvus.DEFAULT_BATCH_SIZE
    with pytest.raises(ValueError, match=r"services\.milvus\.options\.batch_size must be an integer in \[1, 16384\]"):
        ExportSettings.from_options({"batch_size": 20000})
    with pytest.raises(ValueError, match=r"options\.collections must be a list"):
        ExportSettings.from_options({"collections": "erp_docs"})


def test_restore_settings_reject_unknown_options() -> None:
    assert RestoreSettings.from_options({"suffix": "_r", "collections": ["a"]}).collections == ("a",)
    with pytest.raises(TypeError, match="unknown Milvus restore option"):
        RestoreSettings.from_options({"sufix": "_r"})


def test_service_is_dispatched_by_name_and_type() -> None:
    assert get_service("milvus") is milvus
    assert milvus.SUPPORTED_TYPES == {"full", "etcd"}
    with pytest.raises(ValueError, match="milvus has no backup type 'wal'"):
        milvus._check_type("wal")


# ───────────────────────── the rest of the service contract ─────────────────────────


def _manifest(backup_type: str, details: dict, tools: dict | None = None) -> Manifest:
    moment = datetime(2026, 11, 22, 20, tzinfo=timezone.utc)
    return make_manifest(service="milvus", backup_type=backup_type, captured_started_at=moment,
                         tools=tools or {}, details=details)


def _no_connections(conn_id: str) -> Connection:
    raise LookupError(f"The conn_id `{conn_id}` isn't defined")


def test_the_contract_types_and_defaults() -> None:
    assert milvus.RESTORE_TYPES == milvus.DRILL_TYPES == {"full", "etcd"} and milvus.PITR_TYPES == frozenset()
    plan = load_plan()
    moment = datetime(2026, 11, 22, 20, tzinfo=timezone.utc)
    assert milvus.protected_sets(plan, plan.job("milvus", "full"), now=moment) == {}
    assert milvus.after_prune(plan, plan.job("milvus", "etcd"), now=moment, dry_run=True) == {}
    with pytest.raises(PointInTimeUnavailable):
        milvus.plan_point_in_time([], moment)
    with pytest.raises(PointInTimeUnavailable):
        milvus.restore_to_time(Path("/nowhere"), moment, "/nowhere.db")


def test_cli_full_target_carries_the_token_but_never_shows_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MILVUS_TOKEN", "root:s3cret-token")
    remote = milvus.target_from_cli("full", "http://milvus-dr:19530", None, _no_connections)
    assert remote.target == MilvusTarget(uri="http://milvus-dr:19530", token="root:s3cret-token")
    assert remote.description == "Milvus http://milvus-dr:19530 (token from $MILVUS_TOKEN)"
    assert "s3cret" not in remote.description and "s3cret" not in repr(remote)
    lite = milvus.target_from_cli("full", str(tmp_path / "restored.db"), None, _no_connections)
    assert (lite.target.uri, lite.target.is_local) == (str(tmp_path / "restored.db"), True)
    monkeypatch.delenv("MILVUS_TOKEN")
    with_password = milvus.target_from_cli("full", "https://admin:pw-in-uri@milvus-dr:19530", None, _no_connections)
    assert with_password.target.token == "" and "pw-in-uri" not in with_password.description


def test_cli_full_target_from_a_connection() -> None:
    conn = Connection(conn_id="milvus_dr", conn_type="generic", host="http://milvus-dr:19530", password="conn-pw")
    chosen = milvus.target_from_cli("full", None, "milvus_dr", {"milvus_dr": conn}.__getitem__)
    assert (chosen.target.uri, chosen.target.token) == ("http://milvus-dr:19530", "conn-pw")
    assert chosen.description == "Milvus http://milvus-dr:19530 (connection milvus_dr)"
    with pytest.raises(ConnectionMissing, match="AIRFLOW_CONN_MILVUS_DR"):
        milvus.target_from_cli("full", None, "milvus_dr", _no_connections)


def test_cli_etcd_target_is_a_new_directory(tmp_path: Path) -> None:
    chosen = milvus.target_from_cli("etcd", str(tmp_path / "etcd-new"), None, _no_connections)
    assert chosen == CliTarget(tmp_path / "etcd-new", f"new etcd data dir {tmp_path / 'etcd-new'}")


@pytest.mark.parametrize(("backup_type", "target", "target_conn", "message"), [
    ("full", None, None, "milvus restores need --target: a Milvus URI"),
    ("etcd", None, None, "this restore needs --target: the new etcd data directory"),
    ("etcd", "EXISTING", None, "already exists: the new etcd data directory must be a new directory"),
    ("etcd", "/tmp/etcd-new", "milvus_etcd", "not --target-conn"),
    ("wal", "/tmp/x", None, "milvus has no backup type 'wal'"),
])
def test_bad_cli_targets_say_what_is_expected(tmp_path: Path, backup_type: str, target: str | None,
                                              target_conn: str | None, message: str) -> None:
    with pytest.raises(TargetUsageError, match=re.escape(message)):
        milvus.target_from_cli(backup_type, str(tmp_path) if target == "EXISTING" else target, target_conn,
                               _no_connections)


def test_scratch_spec_follows_the_recorded_server_version() -> None:
    spec = milvus.scratch_spec("full", {"milvus": "v2.4.15-gpu", "etcd": "3.5.16"})
    assert spec == ScratchSpec("milvus_lite", ContainerSpec(
        "milvusdb/milvus:v2.4.15", 19530,
        {"ETCD_USE_EMBED": "true", "ETCD_DATA_DIR": "/var/lib/milvus/etcd", "COMMON_STORAGETYPE": "local"},
        ("milvus", "run", "standalone"), uri_scheme="http",
    ))
    assert spec.container is not None and spec.container.secret_env == ()
    assert milvus.scratch_spec("full", {}).container.image == "milvusdb/milvus:v2.5.4"  # type: ignore[union-attr]
    assert milvus.scratch_spec("etcd", {"etcd": "3.5.16"}) == ScratchSpec("etcd", None)
    with pytest.raises(ValueError, match="no backup type 'wal'"):
        milvus.scratch_spec("wal", {})


def test_scratch_target_is_the_uri_of_the_started_target() -> None:
    assert milvus.scratch_target(SimpleNamespace(kind="milvus_lite", uri="/drill/x/milvus.db")) == "/drill/x/milvus.db"
    assert milvus.scratch_target(SimpleNamespace(kind="milvus_lite", uri="http://10.1.2.3:19530")) == "http://10.1.2.3:19530"
    assert milvus.scratch_target(SimpleNamespace(kind="etcd", uri="/drill/x/etcd-data")) == "/drill/x/etcd-data"
    with pytest.raises(ValueError, match="kind 's3'"):
        milvus.scratch_target(SimpleNamespace(kind="s3", uri="http://127.0.0.1:9000"))


def test_versions_and_source_size_read_what_each_manifest_records() -> None:
    full = _manifest("full", {"kind": "collection_export", "rows": 10},
                     {"pymilvus": "3.0.2", "milvus": "v2.5.4"})
    assert milvus.versions(full) == {"milvus": "v2.5.4"}
    assert milvus.source_size(full) is None
    assert milvus.versions(_manifest("full", {"server_version": "2.4.15"}, {"milvus": "unknown"})) == {"milvus": "2.4.15"}
    assert milvus.versions(_manifest("full", {}, {"milvus": "unknown"})) == {}
    etcd = _manifest("etcd", {"kind": "etcd_snapshot", "raw_bytes": 20480, "snapshot": {"revision": 2}},
                     {"etcdctl": "3.5.16"})
    assert milvus.versions(etcd) == {"etcd": "3.5.16"}
    assert milvus.source_size(etcd) == 20480
    assert milvus.source_size(_manifest("etcd", {"raw_bytes": True})) is None
